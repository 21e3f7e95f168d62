"""Evaluation-set builders on small fixtures written in each release's layout, with defects: every
good request kept (sessions and turn order too), every defect skipped and counted by reason."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from data_pipelines.eval_sets import build


def image(seed, size=24, fmt="PNG", mode="RGB"):
  img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8))
  buf = io.BytesIO()
  img.convert(mode).save(buf, fmt)
  return buf.getvalue()


def write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def records(builder, split):
  src = builder.as_data_source(split)
  return {r["key"].decode(): r for r in (src[i] for i in range(len(src)))}


def test_magicbrush_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  blob = lambda seed: {"bytes": image(seed), "path": None}
  rows = [dict(img_id="327726", turn_index=1, source_img=blob(1), mask_img=blob(2), instruction="add a hat",
               target_img=blob(3)),
          dict(img_id="327726", turn_index=2, source_img=blob(3), mask_img=blob(4), instruction="make it red",
               target_img=blob(5)),
          dict(img_id="9", turn_index=1, source_img=blob(6), mask_img=None, instruction=" ", target_img=blob(7)),
          dict(img_id="9", turn_index=2, source_img=blob(8), mask_img=None, instruction="x", target_img=None),
          dict(img_id="10", turn_index=1, source_img={"bytes": image(9)[:40], "path": None}, mask_img=None,
               instruction="y", target_img=blob(10))]
  os.makedirs(tmp_path / "src" / "data")
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "data" / "train-00000-of-00001.parquet")
  pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "src" / "data" / "dev-00000-of-00001.parquet")
  b = build("magicbrush", str(tmp_path / "src"), str(tmp_path / "out"), "parquet")
  train = records(b, "train")
  assert sorted(train) == ["327726_1", "327726_2"]
  assert train["327726_2"]["turn"] == 2 and train["327726_2"]["session"] == b"327726"
  assert train["327726_1"]["mask_image"] == image(2)
  assert b.info.metadata["skipped"]["train"] == {"empty_instruction": 1, "missing_image": 1, "unreadable_image": 1}
  assert sorted(records(b, "dev")) == ["327726_1"]


def test_magicbrush_test_folder(tmp_path):
  root = tmp_path / "test"
  sessions = {"30": [{"input": "30-input.png", "mask": "30-mask1.png", "output": "30-output1.png", "instruction": "add a dog"},
                     {"input": "30-output1.png", "mask": "30-mask2.png", "output": "30-output2.png", "instruction": "make it night"}],
              "7": [{"input": "7-input.png", "mask": "7-mask1.png", "output": "7-output1.png", "instruction": "remove the car"}],
              "8": [{"input": "8-input.png", "output": "8-output1.png", "instruction": "gone"},
                    {"mask": "8-mask2.png", "instruction": "no input"}]}
  for sid, turns in sessions.items():
    for t in turns:
      for k in ("input", "output", "mask"):
        if k in t and not (sid == "8" and k == "output"):           # 8-output1.png is missing
          write(str(root / "images" / sid / t[k]), image(hash(t[k]) % 1000, mode="L" if k == "mask" else "RGB"))
  write(str(root / "edit_sessions.json"), json.dumps(sessions))
  write(str(root / "local_descriptions.json"), json.dumps({"30": {"30-output1.png": "a dog on grass",
                                                                 "30-output2.png": "a dog at night"}}))
  b = build("magicbrush", str(tmp_path), str(tmp_path / "out"), "folder")
  test = records(b, "test")
  assert sorted(test) == ["30_1", "30_2", "7_1"]
  assert test["30_2"]["caption"] == b"a dog at night" and test["7_1"]["caption"] == b""
  with open(root / "images" / "30" / "30-output1.png", "rb") as f:
    assert test["30_2"]["input_image"] == f.read()            # turn 2 starts from turn 1's ground truth
  assert b.info.metadata["skipped"]["test"] == {"missing_image": 1, "malformed_record": 1}


def test_evr(tmp_path):
  for split, n_sents in (("train", 1), ("valid", 3), ("test", 3)):
    recs = [{"img0": f"{split}_{i}_0.jpg", "img1": f"{split}_{i}_1.jpg", "uid": f"{split}{i}",
             "sents": [f"request {k} of {i}" for k in range(n_sents)]} for i in range(3)]
    recs.append({"img0": None, "sents": ["x"], "uid": "bad"})
    write(str(tmp_path / "src" / f"{split}.json"), json.dumps(recs))
    for i in range(3):
      for j in (0, 1):
        if not (split == "test" and i == 2 and j == 1):               # one missing edited image
          write(str(tmp_path / "src" / "images" / f"{split}_{i}_{j}.jpg"), image(i * 2 + j, fmt="JPEG"))
  b = build("evr", str(tmp_path / "src"), str(tmp_path / "out"))
  assert len(records(b, "train")) == 3 and len(records(b, "validation")) == 9
  test = records(b, "test")
  assert sorted(test) == [f"test{i}_{k}" for i in range(2) for k in range(3)]
  assert test["test1_2"]["instruction"] == b"request 2 of 1"
  assert b.info.metadata["skipped"]["test"] == {"malformed_record": 1, "missing_image": 3}


def test_gier_with_bare_nan(tmp_path):
  src = tmp_path / "src"
  text = ('[{"input": "a.jpg", "output": "a_out.jpg", "request": "brighten it", '
          '"expert_summary": ["increase brightness", NaN], "amateur_summary": NaN, "id": "a"},'
          ' {"input": "b.jpg", "output": "b_out.jpg", "request": NaN, "expert_summary": NaN, '
          '"amateur_summary": ["more contrast"], "id": "b"},'
          ' {"input": "c.jpg", "output": "c_out.jpg", "request": NaN, "expert_summary": [], "id": "c"},'
          ' {"output": "d.jpg", "request": "x"}]')
  write(str(src / "test.json"), text)
  for n in ("a", "b", "c"):
    write(str(src / "images" / f"{n}.jpg"), image(ord(n), fmt="JPEG"))
    write(str(src / "images" / f"{n}_out.jpg"), image(ord(n) + 1, fmt="JPEG", mode="CMYK"))
  b = build("gier", str(src), str(tmp_path / "out"))
  test = records(b, "test")
  assert sorted(test) == ["a_0", "a_1", "b_0"]
  assert test["a_1"]["instruction"] == b"increase brightness"
  meta = b.info.metadata
  assert meta["skipped"]["test"] == {"no_request": 1, "malformed_record": 1}
  assert meta["converted"]["test"] == {"CMYK": 3}


def test_ma5k(tmp_path):
  src = tmp_path / "src"
  table = {"a0001": {"input": "a0001.jpg", "output": "a0001_C.jpg", "request": "make it warmer"},
           "a0002": {"input": "a0002.jpg", "output": "a0002_C.jpg", "request": ["darker", "less saturated"]},
           "a0003": {"input": "a0003.jpg", "output": "a0003_C.jpg", "request": "cooler"}}
  write(str(src / "FiveK.json"), json.dumps(table))
  write(str(src / "annotations" / "test_sess_1.json"), json.dumps(["a0001", {"id": "a0002"}, "a0003", "a9999"]))
  for k in ("a0001", "a0002"):
    write(str(src / "images" / f"{k}.jpg"), image(int(k[1:]), fmt="JPEG"))
    write(str(src / "images" / f"{k}_C.jpg"), image(int(k[1:]) + 7, fmt="JPEG"))
  write(str(src / "images" / "a0003.jpg"), b"\xff\xd8 broken")
  write(str(src / "images" / "a0003_C.jpg"), image(3, fmt="JPEG"))
  b = build("ma5k", str(src), str(tmp_path / "out"))
  assert sorted(records(b, "test")) == ["a0001_0", "a0002_0", "a0002_1"]
  assert b.info.metadata["skipped"]["test"] == {"malformed_record": 1, "unreadable_image": 1}
  assert list(b.info.splits) == ["test"]
