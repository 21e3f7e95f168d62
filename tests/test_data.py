import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines import synthetic
from mgie_jax.core.images import CLIP_MEAN, CLIP_STD
from data_pipelines.ipr2pr import build
from data_pipelines.loader import LoaderConfig, Preprocess, make_dataset
from mgie_jax.text import LlamaTokenizer
from mgie_jax.run.batch import BatchSpec

skimage_data = pytest.importorskip("skimage.data", reason="needs scikit-image: pip install -e '.[test]'")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "JPEG", **kw)
  return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
  buf = io.BytesIO()
  img.save(buf, "PNG")
  return buf.getvalue()


def rgb(seed, size=32):
  return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))


def write_pair(root, folder, seed, first: bytes | None, second: bytes | None):
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  for i, data in enumerate((first, second)):
    if data is not None:
      with open(os.path.join(root, folder, f"{seed}_{i}.jpg"), "wb") as f:
        f.write(data)


def write_prompt(root, folder, raw: bytes | None):
  os.makedirs(os.path.join(root, folder), exist_ok=True)
  if raw is not None:
    with open(os.path.join(root, folder, "prompt.json"), "wb") as f:
      f.write(raw)


GOOD = json.dumps({"input": "a cat", "edit": "make it a dog", "output": "a dog"}).encode()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """20 folders in the release layout: 18 train / 1 validation / 1 test, with every kind of breakage
  and good pairs in several image modes (kept, converted to RGB by the loader)."""
  root = str(tmp_path_factory.mktemp("release"))
  big = jpeg_bytes(Image.new("RGB", (400, 400), (9, 9, 9)))
  whole = jpeg_bytes(rgb(99, 64))
  truncated = whole[:int(len(whole) * 0.7)]          # header intact, scan data cut
  modes = {10: ("L", jpeg_bytes(Image.new("L", (32, 32), 70))),
           11: ("RGBA", png_bytes(Image.new("RGBA", (32, 32), (10, 200, 30, 128)))),
           12: ("P", png_bytes(rgb(5).convert("P"))),
           13: ("CMYK", jpeg_bytes(Image.new("CMYK", (32, 32), (0, 80, 160, 0)))),
           14: ("I;16", png_bytes(Image.fromarray(np.full((32, 32), 40000, np.uint16)))),
           15: ("LA", png_bytes(Image.new("LA", (32, 32), (90, 255))))}
  seeds, expected, skipped, converted = [], {"train": [], "validation": [], "test": []}, {}, {}
  for n in range(20):
    folder = f"{n:05d}"
    seed_list = [100 + n, 200 + n] if n % 3 == 0 else [100 + n]    # several pairs per prompt too
    seeds.append([folder, seed_list])
    split = "train" if n < 18 else ("validation" if n == 18 else "test")
    prompt = GOOD
    if n == 1:
      prompt = None                                                   # no prompt.json
    elif n == 2:
      prompt = b"{not json"
    elif n == 4:
      prompt = json.dumps({"input": "x", "edit": "  ", "output": "y"}).encode()
    elif n == 5:
      prompt = '{"edit": "caf\u00e9"}'.encode("latin-1")           # not UTF-8
    elif n == 7:
      prompt = json.dumps({"edit": "only the edit"}).encode()        # some copies hold only "edit"
    write_prompt(root, folder, prompt)
    for s in seed_list:
      first, second = jpeg_bytes(rgb(s)), jpeg_bytes(rgb(s + 1))
      breakage = {8: ("missing_image", None), 9: ("truncated_image", truncated),
                  16: ("too_large", big), 17: ("unreadable_image", b"this is not an image")}
      reason = {1: "missing_prompt", 2: "malformed_prompt", 4: "empty_prompt", 5: "non_utf8_text"}.get(n)
      if n in breakage:
        reason, second = breakage[n]
      if n in modes:
        mode, second = modes[n]
        converted[mode] = converted.get(mode, 0) + 1
      write_pair(root, folder, s, first, second)
      if reason:
        skipped.setdefault(split, {}).setdefault(reason, 0)
        skipped[split][reason] += 1
      else:
        expected[split].append(f"{folder}_{s}_0")
  with open(os.path.join(root, "seeds.json"), "w") as f:
    json.dump(seeds, f)
  with open(os.path.join(root, "expressive.json"), "w") as f:
    json.dump({"00000_100_0": {"instruction": "make it a dog", "expressive": "turn the cat into a dog."}}, f)
  return root, expected, skipped, converted


def keys_of(builder, split):
  src = builder.as_data_source(split)
  return sorted(src[i]["key"].decode() for i in range(len(src)))


def test_folder_release_build(release, tmp_path):
  root, expected, skipped, converted = release
  builder = build(root, str(tmp_path), "folder", os.path.join(root, "expressive.json"),
                  missing_expressive="instruction", max_pixels=300 * 300)
  for split in ("train", "validation", "test"):
    assert keys_of(builder, split) == sorted(expected[split]), split
  meta = builder.info.metadata
  assert meta["skipped"]["train"] == skipped["train"]
  assert meta["kept"] == {k: len(v) for k, v in expected.items()}
  assert set(meta["skipped"]["train"]) == {"missing_prompt", "malformed_prompt", "empty_prompt",
                                           "non_utf8_text", "missing_image", "truncated_image",
                                           "too_large", "unreadable_image"}
  assert meta["skipped"]["validation"] == {} and meta["skipped"]["test"] == {}
  # Every good pair in another image mode is kept and counted by mode.
  assert meta["converted"]["train"] == converted == {"L": 1, "RGBA": 1, "P": 2, "CMYK": 1, "I;16": 1, "LA": 2}
  # Examples without an expressive instruction are counted (here: all but one).
  assert meta["notes"]["train"] == {"expressive_fallback": len(expected["train"]) - 1}
  records = {r["key"].decode(): r for r in builder.as_data_source("train")}
  assert records["00000_100_0"]["expressive"] == b"turn the cat into a dog."
  assert records["00000_200_0"]["expressive"] == b"make it a dog"          # no expressive: edit text
  assert records["00007_107_0"]["input_caption"] == b""                    # prompt.json with only "edit"
  with open(os.path.join(root, "00003", "103_0.jpg"), "rb") as f:
    assert records["00003_103_0"]["input_image"] == f.read()               # original bytes, no re-encoding
  # The loader converts the other modes to RGB, as the reference pipelines do (.convert("RGB")).
  pre = Preprocess(LoaderConfig(data_dir="unused", resolution=32))
  for n, mode in ((10, "L"), (11, "RGBA"), (13, "CMYK"), (14, "I;16"), (15, "LA")):
    key = f"{n:05d}_{100 + n}_0"
    out = pre(records[key])
    with open(os.path.join(root, f"{n:05d}", f"{100 + n}_1.jpg"), "rb") as f:
      ref = Image.open(f).convert("RGB")
    want = np.asarray(ref.resize((512, 512), Image.BICUBIC).resize((32, 32), Image.BICUBIC), np.float32) / 127.5 - 1
    np.testing.assert_allclose(out["edited_image"], want, atol=1e-6, err_msg=mode)


def test_skip_policy_and_empty_split(release, tmp_path):
  """--missing_expressive=skip drops (and counts) examples without one; a split left with no
  example is not written, with a warning, and the good splits are kept."""
  root, expected, _, _ = release
  builder = build(root, str(tmp_path), "folder", os.path.join(root, "expressive.json"),
                  missing_expressive="skip", max_pixels=300 * 300)
  assert keys_of(builder, "train") == ["00000_100_0"]
  meta = builder.info.metadata
  assert meta["skipped"]["train"]["no_expressive"] == len(expected["train"]) - 1
  assert sorted(meta["empty_splits"]) == ["test", "validation"]
  assert list(builder.info.splits) == ["train"]


def test_rebuild_from_another_source_is_refused_then_overwrites(release, tmp_path):
  root, expected, _, _ = release
  other = tmp_path / "other"
  synthetic.write_dataset(str(other), prompts=20, seeds=1, size=32, tokenizer=False)
  out = str(tmp_path / "tfds")
  first = build(root, out, "folder", missing_expressive="instruction", max_pixels=300 * 300)
  assert build(root, out, "folder", missing_expressive="instruction", max_pixels=300 * 300).data_dir == first.data_dir  # reused
  from data_pipelines.checked import SourceChanged
  with pytest.raises(SourceChanged, match="was built from"):
    build(str(other), out, "folder", missing_expressive="instruction", max_pixels=300 * 300)
  assert keys_of(first, "train") == sorted(expected["train"])              # the old dataset is intact
  with pytest.raises(FileNotFoundError):
    build(str(tmp_path / "nonexistent"), out, "folder", missing_expressive="instruction", max_pixels=300 * 300)
  rebuilt = build(str(other), out, "folder", missing_expressive="instruction", overwrite=True,
                  max_pixels=300 * 300)
  assert len(keys_of(rebuilt, "train")) == 18
  assert not [p for p in os.listdir(os.path.dirname(str(rebuilt.data_dir))) if "replaced" in p]


def test_parquet_build(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  rows = [dict(original_prompt="a cat", original_image={"bytes": jpeg_bytes(rgb(1)), "path": None},
               edit_prompt="make it a dog", edited_prompt="a dog", edited_image={"bytes": jpeg_bytes(rgb(2)), "path": None}),
          dict(original_prompt="x", original_image={"bytes": jpeg_bytes(rgb(3)), "path": None}, edit_prompt="",
               edited_prompt="y", edited_image={"bytes": jpeg_bytes(rgb(4)), "path": None}),
          dict(original_prompt="x", original_image={"bytes": jpeg_bytes(rgb(5))[:1000], "path": None},
               edit_prompt="blur it", edited_prompt="y", edited_image={"bytes": jpeg_bytes(rgb(6)), "path": None}),
          dict(original_prompt="x", original_image=None, edit_prompt="blur it", edited_prompt="y",
               edited_image={"bytes": jpeg_bytes(rgb(7)), "path": None})]
  src = tmp_path / "parquet"
  os.makedirs(src)
  pq.write_table(pa.Table.from_pylist(rows), src / "train-00000.parquet")
  pq.write_table(pa.Table.from_pylist([{**rows[0], "original_image": jpeg_bytes(rgb(8)),
                                        "edited_image": jpeg_bytes(rgb(9))}]), src / "train-00001.parquet")
  builder = build(str(src), str(tmp_path / "out"), "parquet", missing_expressive="instruction")
  assert list(builder.info.splits) == ["train"]
  assert keys_of(builder, "train") == ["train-00000_0", "train-00001_0"]
  assert builder.info.metadata["skipped"]["train"] == {"empty_prompt": 1, "truncated_image": 1, "missing_image": 1}


@pytest.fixture(scope="module")
def synthetic_built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("synthetic"))
  synthetic.write_dataset(root, prompts=30, seeds=2, size=96)
  builder = build(root, os.path.join(root, "tfds"), "folder", os.path.join(root, "expressive.json"))
  return root, builder


def loader_cfg(builder, root, **kw):
  base = dict(data_dir=builder.data_dir, batch_size=4, tokenizer=os.path.join(root, "tokenizer"),
              num_image_tokens=16, max_length=128, num_threads=2, prefetch=4)
  return LoaderConfig(**{**base, **kw})


def take(it, n):
  return [next(it) for _ in range(n)]


def test_two_hosts_read_disjoint_shards_covering_the_split(synthetic_built):
  root, builder = synthetic_built
  seen = []
  for host in (0, 1):
    cfg = loader_cfg(builder, root, batch_size=1, num_epochs=1, drop_remainder=False, tokenizer=None)
    seen.append([k.decode() for b in make_dataset(cfg, host, 2) for k in b["key"]])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == keys_of(builder, "train")
  assert len(seen[0]) == len(set(seen[0]))


def test_loader_is_deterministic_and_restores_exactly(synthetic_built):
  root, builder = synthetic_built
  cfg = loader_cfg(builder, root, seed=7)
  a = take(iter(make_dataset(cfg)), 3)
  it = iter(make_dataset(cfg))
  b = take(it, 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
    np.testing.assert_array_equal(x["input_image"], y["input_image"])
  state = it.get_state()
  following = take(it, 20)         # crosses the 54-example epoch boundary: a new permutation
  fresh = iter(make_dataset(cfg))
  fresh.set_state(state)
  for x, y in zip(following, take(fresh, 20)):
    np.testing.assert_array_equal(x["key"], y["key"])
    np.testing.assert_array_equal(x["edited_image"], y["edited_image"])
  other = take(iter(make_dataset(loader_cfg(builder, root, seed=8))), 3)
  assert any((x["key"] != y["key"]).any() for x, y in zip(a, other))


def test_iterator_state_through_orbax(synthetic_built, tmp_path):
  import grain
  import orbax.checkpoint as ocp
  root, builder = synthetic_built
  cfg = loader_cfg(builder, root, tokenizer=None)
  it = iter(make_dataset(cfg))
  take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = take(it, 3)
  restored = iter(make_dataset(cfg))
  with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_handlers={"data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  for x, y in zip(want, take(restored, 3)):
    np.testing.assert_array_equal(x["key"], y["key"])


def test_batch_shapes_dtypes_ranges_and_labels(synthetic_built):
  root, builder = synthetic_built
  batch = next(iter(make_dataset(loader_cfg(builder, root))))
  assert batch["input_image"].shape == batch["edited_image"].shape == (4, 256, 256, 3)
  assert batch["clip_image"].shape == (4, 224, 224, 3)
  for k in ("input_image", "edited_image", "clip_image"):
    assert batch[k].dtype == np.float32
  assert -1.0 <= batch["input_image"].min() and batch["input_image"].max() <= 1.0
  for k in ("input_ids", "labels", "attention_mask"):
    assert batch[k].shape == (4, 128) and batch[k].dtype == np.int32
  tok = LlamaTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
  img0 = tok.token_to_id("[IMG0]")
  for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
    n = int(mask.sum())
    assert (mask[:n] == 1).all() and (labels[n:] == -100).all()
    assert ids[n - 1] == tok.eos_id and (ids[n - 9:n - 1] == np.arange(img0, img0 + 8)).all()
    assert (ids == tok.token_to_id("<im_patch>")).sum() == 16


def test_preprocessing_matches_pil_reference_on_a_photograph():
  import transformers
  photo = Image.fromarray(skimage_data.chelsea())           # 451 x 300, not square
  data = jpeg_bytes(photo, quality=95)
  decoded = Image.open(io.BytesIO(data)).convert("RGB")
  # Reference, written out: center-crop square, 512 bicubic, then 256 bicubic in [-1, 1].
  w, h = decoded.size
  s = min(w, h)
  square = decoded.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
  square = square.resize((512, 512), Image.BICUBIC)
  want = np.asarray(square.resize((256, 256), Image.BICUBIC), np.float32) / 127.5 - 1
  want_clip = transformers.CLIPImageProcessor()(images=square, return_tensors="np")["pixel_values"][0]
  cfg = LoaderConfig(data_dir="unused")
  out = Preprocess(cfg)({"key": b"cat", "input_image": data, "edited_image": data})
  np.testing.assert_allclose(out["input_image"], want, atol=1e-6)
  np.testing.assert_allclose(out["clip_image"], want_clip.transpose(1, 2, 0), atol=1e-5)
  assert np.allclose(CLIP_MEAN, transformers.CLIPImageProcessor().image_mean)
  assert np.allclose(CLIP_STD, transformers.CLIPImageProcessor().image_std)


def test_loader_skips_bad_records_and_counts_them():
  pre = Preprocess(LoaderConfig(data_dir="unused"))
  good = jpeg_bytes(rgb(1))
  assert pre({"key": b"a", "input_image": good, "edited_image": b"garbage"}) is None
  assert pre({"key": b"b", "input_image": png_bytes(Image.new("RGBA", (32, 32))), "edited_image": good}) is not None
  assert pre.skipped == {"decode_error:UnidentifiedImageError": 1}
  assert pre({"key": b"c", "input_image": good, "edited_image": good})["input_image"].shape == (256, 256, 3)


def test_loader_skips_sequences_without_img_tokens(synthetic_built, monkeypatch):
  from data_pipelines import loader
  root, builder = synthetic_built
  pre = Preprocess(loader_cfg(builder, root))
  record = builder.as_data_source("train")[0]
  assert pre(record) is not None
  real = loader.training_example

  def no_img(tok, *a, **k):      # e.g. a tokenizer that does not know the [IMG] tokens
    ex = real(tok, *a, **k)
    ex.input_ids = ex.input_ids[ex.input_ids != tok.token_to_id("[IMG0]")]
    return ex
  monkeypatch.setattr(loader, "training_example", no_img)
  assert pre(record) is None and pre.skipped == {"no_img_tokens": 1}


# --- the synthetic generator ------------------------------------------------------------------

def color_at(img, xy, size):
  x, y = (int(round(v)) for v in xy)
  return np.asarray(img)[y, x].astype(int)


def close(a, b, tol=12):
  return np.abs(np.asarray(a) - np.asarray(synthetic.COLORS[b])).max() <= tol


@pytest.mark.parametrize("seed", range(40))
def test_synthetic_edits_do_what_they_say(seed):
  e = synthetic.random_edit(seed)
  size = 96
  before = synthetic.render(e.before, size, np.random.default_rng(seed))
  after = synthetic.render(e.after, size, np.random.default_rng(seed))
  c = lambda img, cell: color_at(img, synthetic.cell_center(cell, size), size)
  corner = lambda img: np.asarray(img)[1, 1].astype(int)
  changed = set(e.before.shapes) ^ set(e.after.shapes)
  if e.kind == "recolor":
    old, new = sorted(changed, key=lambda s: s in e.after.shapes)
    assert old.cell == new.cell and new.color in e.instruction and old.color != new.color
    assert close(c(before, old.cell), old.color) and close(c(after, new.cell), new.color)
  elif e.kind == "remove":
    (gone,) = changed
    assert gone.kind in e.instruction
    assert close(c(before, gone.cell), gone.color) and close(c(after, gone.cell), e.after.background)
  elif e.kind == "add":
    (new,) = changed
    assert new.color in e.instruction and new.kind in e.instruction
    assert close(c(before, new.cell), e.before.background) and close(c(after, new.cell), new.color)
  elif e.kind == "move":
    old, new = sorted(changed, key=lambda s: s in e.after.shapes)
    assert new.cell in e.instruction and old.color == new.color
    assert close(c(after, old.cell), e.after.background) and close(c(after, new.cell), new.color)
  else:
    assert e.after.background in e.instruction and e.before.background != e.after.background
    assert close(corner(before), e.before.background) and close(corner(after), e.after.background)
    for s in e.before.shapes:
      assert close(c(after, s.cell), s.color)
  # Everything the edit does not touch stays put.
  for s in set(e.before.shapes) & set(e.after.shapes):
    assert close(c(before, s.cell), s.color) and close(c(after, s.cell), s.color)


@pytest.mark.parametrize("seed", range(24))
def test_grounded_edits_do_what_they_say(seed):
  """Instructions that need the image: the edit lands on the shape the image singles out."""
  e = synthetic.random_edit(seed, grounded=1.0)
  assert e.subset == "grounded" and (e.kind, e.attribute) not in synthetic.HELDOUT
  size = 96
  before = synthetic.render(e.before, size, np.random.default_rng(seed))
  after = synthetic.render(e.after, size, np.random.default_rng(seed))
  c = lambda img, cell: color_at(img, synthetic.cell_center(cell, size), size)
  corner = lambda img: np.asarray(img)[1, 1].astype(int)
  changed = set(e.before.shapes) ^ set(e.after.shapes)
  if e.kind == "recolor_largest":
    old, new = sorted(changed, key=lambda s: s in e.after.shapes)
    assert old.size == "large" and all(s.size == "small" for s in e.before.shapes if s is not old)
    assert close(c(after, new.cell), new.color) and new.color in e.instruction and "largest" in e.instruction
    assert f"large {old.color} {old.kind}" in e.expressive
  elif e.kind == "remove_left_of":
    (gone,) = changed
    anchor = [s for s in e.before.shapes if s.kind in e.instruction.split("left of the ")[1]][0]
    col, row = synthetic.CELLS[gone.cell]
    assert synthetic.CELLS[anchor.cell][1] == row and synthetic.CELLS[anchor.cell][0] > col
    assert close(c(after, gone.cell), e.after.background) and gone.color in e.expressive
  elif e.kind == "background_like":
    ref = [s for s in e.before.shapes if s.kind in e.instruction][0]
    assert e.after.background == ref.color and close(corner(after), ref.color)
  else:
    old, new = sorted(changed, key=lambda s: s in e.after.shapes)
    ref = [s for s in e.before.shapes if s.kind == e.instruction.split("colour of the ")[1]][0]
    assert new.color == ref.color != old.color and close(c(after, new.cell), ref.color)
  for s in set(e.before.shapes) & set(e.after.shapes):
    assert close(c(before, s.cell), s.color) and close(c(after, s.cell), s.color)


def test_held_out_combinations_only_outside_training(tmp_path):
  synthetic.write_dataset(str(tmp_path), prompts=60, seeds=1, size=32, tokenizer=False, grounded=0.5)
  with open(tmp_path / "subsets.json") as f:
    subsets = json.load(f)
  with open(tmp_path / "seeds.json") as f:
    order = [folder for folder, _ in json.load(f)]
  first_held = order.index(f"{54:07d}")                 # floor(0.9 x 60): validation and test start
  held = {k for k, v in subsets.items() if v["heldout"]}
  assert held and all(order.index(k.split("_")[0]) >= first_held for k in held)
  assert {v["subset"] for v in subsets.values()} == {"plain", "grounded"}


def test_synthetic_dataset_is_deterministic_any_resolution(tmp_path):
  a, b = tmp_path / "a", tmp_path / "b"
  synthetic.write_dataset(str(a), prompts=4, seeds=2, size=80, tokenizer=False)
  synthetic.write_dataset(str(b), prompts=4, seeds=2, size=80, tokenizer=False)
  files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
  assert len(files) == 4 * (1 + 2 * 2) + 3
  for f in files:
    assert (a / f).read_bytes() == (b / f).read_bytes(), f
  img = Image.open(next(a.rglob("*_0.jpg")))
  assert img.size == (80, 80) and img.mode == "RGB"
  assert synthetic.random_edit(3) == synthetic.random_edit(3) != synthetic.random_edit(4)


def test_synthetic_tokenizer_loads_like_llama(synthetic_built):
  root, _ = synthetic_built
  tok = LlamaTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
  assert tok.bos_id == 1 and tok.eos_id == 2 and tok.token_to_id("[IMG7]") == len(tok) - 1
  text = "change the red circle at the top left to blue."
  assert tok.decode(tok.encode(text)) == text


def test_worker_processes_are_deterministic_and_restorable(synthetic_built):
  """With worker processes each worker batches its own slice, so the order differs from the
  threaded pipeline, but it is fixed by the seed and restorable."""
  root, builder = synthetic_built
  cfg = loader_cfg(builder, root, worker_count=2)
  it = iter(make_dataset(cfg))
  first = take(it, 2)
  state = it.get_state()
  following = take(it, 2)
  again = iter(make_dataset(cfg))
  for x, y in zip(first, take(again, 2)):
    np.testing.assert_array_equal(x["key"], y["key"])
  restored = iter(make_dataset(cfg))
  restored.set_state(state)
  for x, y in zip(following, take(restored, 2)):
    np.testing.assert_array_equal(x["key"], y["key"])
    np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
  assert {k.decode() for b in first + following for k in b["key"]} <= set(keys_of(builder, "train"))


def test_host_loader_batches_do_not_depend_on_the_process_count(synthetic_built, tmp_path):
  """2 data shards read by 1 process give the same global batches as 2 processes, 1 shard each."""
  from data_pipelines.loader import make_loader
  root, builder = synthetic_built
  one = make_loader(loader_cfg(builder, root, tokenizer=None), 0, 1, data_shards=2)
  hosts = [make_loader(loader_cfg(builder, root, tokenizer=None, batch_size=2), i, 2, data_shards=2) for i in (0, 1)]
  for _ in range(3):
    glob = next(one)
    parts = [next(h) for h in hosts]
    np.testing.assert_array_equal(glob["key"], np.concatenate([p["key"] for p in parts]))
  state = one.get_state()
  want = next(one)
  again = make_loader(loader_cfg(builder, root, tokenizer=None), 0, 1, data_shards=2)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["key"], want["key"])
  with pytest.raises(ValueError, match="multiple of the process count"):
    make_loader(loader_cfg(builder, root), 0, 2, data_shards=3)


@pytest.mark.parametrize("text_length", [0, 12])
def test_the_loader_makes_exactly_the_batch_spec(synthetic_built, text_length):
  """The arrays the trainer compiles for (mgie_jax.run.batch) are the loader's, name for name."""
  root, builder = synthetic_built
  spec = BatchSpec(resolution=32, clip_resolution=28, max_length=128, num_image_tokens=16, text_length=text_length)
  cfg = LoaderConfig(data_dir=builder.data_dir, batch_size=4, tokenizer=os.path.join(root, "tokenizer"),
                     num_threads=2, prefetch=4, **spec.loader_options())
  batch = next(iter(make_dataset(cfg)))
  batch.pop("key")
  got = {k: (v.shape[1:], v.dtype) for k, v in batch.items()}
  assert got == {k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.fields().items()}
