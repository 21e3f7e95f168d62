"""Time our evaluation metrics against PyTorch / scikit-image references on CPU, at the real model
sizes (random weights: no download): CLIP ViT-B/32 image and text embeddings, DINO ViT-S/16,
LPIPS AlexNet and VGG16 (written-out `lpips` v0.1 computation), SSIM at 512 px.

  python benchmarks/bench_metrics.py [--batch 8 --repeats 3]

Prints median wall time per batch, images/s on both sides and the ratio reference / ours (>1: we
are faster). fp32 everywhere.
"""

import argparse
import tempfile

import numpy as np
import torch
import transformers

from common import machine, timeit

from mgie_jax.evaluation import metrics as M
from mgie_jax.models.clip import ClipModel
from mgie_jax.models.lpips import NETS
from mgie_jax.models.vit import ViTModel
from mgie_jax.convert import from_pretrained


def torch_lpips_net(net):
  layers, taps = [], []
  for op in NETS[net]:
    if op[0] == "conv":
      while len(layers) < op[1]:
        layers.append(torch.nn.Identity())
      layers.append(torch.nn.Conv2d(op[2], op[3], op[4], stride=op[5], padding=op[6]))
    elif op[0] == "relu":
      layers.append(torch.nn.ReLU())
    elif op[0] == "pool":
      layers.append(torch.nn.MaxPool2d(op[1], op[2]))
    else:
      taps.append(len(layers) - 1)
  features = torch.nn.Sequential(*layers).eval()
  heads = [torch.rand(1, features[i - 1].out_channels, 1, 1) for i in taps]
  shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
  scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)

  def lpips(a, b):
    def feats(x):
      x, out = (x - shift) / scale, []
      for i, layer in enumerate(features):
        x = layer(x)
        if i in taps:
          out.append(x)
      return out
    total = 0
    for fa, fb, w in zip(feats(a), feats(b), heads):
      n = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
      total = total + torch.nn.functional.conv2d((n(fa) - n(fb)) ** 2, w).mean(dim=(2, 3))
    return total
  return features, heads, lpips


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args()
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  b = a.batch
  rows = []

  def record(name, t_torch, t_ours):
    rows.append((name, t_torch, t_ours))
    print(f"{name:38s} ref {t_torch:8.4f} s ({b / t_torch:7.1f} img/s)   ours {t_ours:8.4f} s "
          f"({b / t_ours:7.1f} img/s)   ref/ours {t_torch / t_ours:5.2f}", flush=True)

  with tempfile.TemporaryDirectory() as d:
    # CLIP ViT-B/32 (MagicBrush's CLIP-I / CLIP-T model), random weights
    ref = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32), projection_dim=512)).eval()
    ref.save_pretrained(f"{d}/clip")
    ours = from_pretrained(ClipModel, f"{d}/clip")
    x = rng.normal(size=(b, 224, 224, 3)).astype(np.float32)
    xt = torch.as_tensor(x.transpose(0, 3, 1, 2).copy())
    metric = M.ClipImageMetric(ours)
    with torch.no_grad():
      t_ref = timeit(lambda: ref.get_image_features(pixel_values=xt), a.repeats)
    t_ours = timeit(lambda: metric.score({"gen": x, "target": x}), a.repeats) / 2   # two images per pair
    record("CLIP ViT-B/32 image embedding", t_ref, t_ours)
    ids = rng.integers(1, 49000, (b, 77))
    with torch.no_grad():
      t_ref = timeit(lambda: ref.get_text_features(input_ids=torch.as_tensor(ids)), a.repeats)
    import jax
    from flax import nnx
    text = nnx.jit(lambda m, i: m.text_features(i))
    t_ours = timeit(lambda: jax.block_until_ready(text(ours, ids)), a.repeats)
    record("CLIP ViT-B/32 text embedding (77 tok)", t_ref, t_ours)
    del ref, ours

    # DINO ViT-S/16
    ref = transformers.ViTModel(transformers.ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                                        num_attention_heads=6, image_size=224, patch_size=16,
                                                        layer_norm_eps=1e-6), add_pooling_layer=False).eval()
    ref.save_pretrained(f"{d}/dino")
    metric = M.DinoMetric(from_pretrained(ViTModel, f"{d}/dino"))
    with torch.no_grad():
      t_ref = timeit(lambda: ref(pixel_values=xt).last_hidden_state[:, 0], a.repeats)
    t_ours = timeit(lambda: metric.score({"gen": x, "target": x}), a.repeats) / 2
    record("DINO ViT-S/16 CLS", t_ref, t_ours)

    # LPIPS, 256 px pairs
    img = rng.uniform(-1, 1, (b, 256, 256, 3)).astype(np.float32)
    img2 = np.clip(img + rng.normal(0, 0.1, img.shape), -1, 1).astype(np.float32)
    ta, tb = (torch.as_tensor(v.transpose(0, 3, 1, 2).copy()) for v in (img, img2))
    for net, name in (("alex", "lpips"), ("vgg", "lpips_vgg")):
      features, heads, torch_fn = torch_lpips_net(net)
      torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, f"{d}/{net}.pth")
      torch.save({f"lin{k}.model.1.weight": h for k, h in enumerate(heads)}, f"{d}/{net}_heads.pth")
      files = (f"{d}/{net}.pth", f"{d}/{net}_heads.pth")
      (metric,) = M.make_metrics([name], **{"lpips_alex" if net == "alex" else "lpips_vgg": files})
      with torch.no_grad():
        t_ref = timeit(lambda: torch_fn(ta, tb), a.repeats)
      t_ours = timeit(lambda: metric.score({"gen": img, "target": img2}), a.repeats)
      record(f"LPIPS {net} 256 px (pairs)", t_ref, t_ours)

  # SSIM at 512 px vs scikit-image (one image at a time: skimage has no batch)
  from skimage.metrics import structural_similarity
  u = rng.uniform(0, 1, (b, 512, 512, 3)).astype(np.float32)
  v = np.clip(u + rng.normal(0, 0.05, u.shape), 0, 1).astype(np.float32)
  t_ref = timeit(lambda: [structural_similarity(p, q, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                data_range=1.0, channel_axis=-1) for p, q in zip(u, v)], a.repeats)
  t_ours = timeit(lambda: np.asarray(M.ssim(u, v)), a.repeats)
  record("SSIM 512 px vs scikit-image (pairs)", t_ref, t_ours)
  print(machine())


if __name__ == "__main__":
  main()
