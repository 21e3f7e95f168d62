"""The full MGIE recipe on IPr2Pr, from local pretrained folders (docs/design.md, "The recipe").

  python -m mgie_jax.train --config=configs/ipr2pr.py --workdir=gs://bucket/mgie \\
      --config.pretrained.llava=/ckpt/LLaVA-Lightning-7B-v1-1 \\
      --config.pretrained.vision_tower=/ckpt/clip-vit-large-patch14 \\
      --config.pretrained.sd=/ckpt/stable-diffusion-v1-5 --config.data.dir=/data/tfds/ipr2pr/folder/1.0.0

Mesh: one slice of 8 GPUs (or a v5p-8) runs fsdp=8: the 7B LLM is frozen but differentiated
(activation gradients flow through it to embed_tokens/lm_head), so its bf16 weights (13.5 GB)
are sharded with FSDP and gathered per layer; trainable parameters (UNet 860M, edit head 32M,
embeddings + lm_head 262M) keep fp32 master copies and Adam moments, also FSDP-sharded. Use
`tensor` > 1 only when per-device memory runs out; `data` > 1 replicates across slices.
Batch: the release used 32 (8 GPUs x 4); the paper 128. `train.batch_size` is global.
"""

from configs import shared


def get_config(arg=None):
  c = shared.get_config(arg)
  c.model.update(init="pretrained", dtype="bfloat16", frozen_dtype="bfloat16", remat="full")
  c.model.edit_head = dict(llm_dim=4096, width=512, heads=4, ffn=2048, encoder_layers=4, decoder_layers=4,
                           num_queries=77, out_dim=768)     # the release's
  c.data.dir = ""         # required: a built ipr2pr dataset folder
  c.data.resolution = 256
  c.data.max_length = 512
  # A typical example is ~340 tokens (256 image + prompt + expressive text + 8 visual tokens):
  # batches are cut to the shortest of these lengths that holds them (docs/benchmarks.md).
  c.data.length_buckets = (384, 448)
  c.data.worker_count = 8
  c.train.steps = 40 * 1_000_000 // 32     # 40 epochs of ~1M pairs at batch 32
  c.train.batch_size = 32
  c.train.lr_mllm = 5e-4                   # the paper: 5e-4 MLLM,
  c.train.lr_diffusion = 5e-4              # 1e-4 diffusion (the release used 5e-4 for both)
  c.train.ema_decay = 0.0                  # the release keeps no EMA (one would be another fp32
                                           # copy of the trained weights on every chip)
  c.log.sample_every = 5000
  c.eval.update(examples=64)
  return c
