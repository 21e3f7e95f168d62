"""The full MGIE recipe on IPr2Pr, from local pretrained folders (DESIGN.md section 1.4).

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

from configs import tiny


def get_config(arg=None):
  c = tiny.get_config()
  c.model.init = "pretrained"
  c.model.dtype = "bfloat16"
  c.model.frozen_dtype = "bfloat16"
  c.model.remat = "full"
  c.model.noise = {}      # {}: the schedule in <pretrained.sd>/scheduler/scheduler_config.json
  c.model.edit_head = dict(llm_dim=4096, width=512, heads=4, ffn=2048, encoder_layers=4, decoder_layers=4,
                           num_queries=77, out_dim=768)
  # Trained, as the release: all of embed_tokens and lm_head, the edit head, the UNet.
  c.trainable = ("mllm.language_model.model.embed_tokens", "mllm.language_model.lm_head",
                 "edit_head", "unet")
  c.pretrained = dict(
      llava="",           # LLaVA v1 folder (LLaVA-Lightning-7B-v1-1) or llava-hf folder
      vision_tower="",    # CLIP ViT-L/14 folder for a v1 LLaVA folder without CLIP weights
      sd="",              # Stable Diffusion 1.5 or InstructPix2Pix folder (unet/, vae/)
      mllm_pt="",         # optional: MGIE's released mllm.pt (embed_tokens, lm_head, edit_head)
      unet_pt="",         # optional: MGIE's released unet.pt
      vae="",             # optional: another VAE folder (default: <sd>/vae)
  )
  c.data.dir = ""         # required: a built ipr2pr dataset folder
  c.data.tokenizer = ""   # default: the LLaVA folder
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
  c.train.ins_loss_weight = 1.0            # L = L_ins + 0.5 L_edit
  c.train.edit_loss_weight = 0.5
  c.train.ema_decay = 0.0                  # the release keeps no EMA (one would be another fp32
                                           # copy of the trained weights on every chip)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.checkpoint.update(every=1000, keep=3, async_save=True)
  c.compile_cache_min_seconds = 1.0
  c.log = dict(every=50, tensorboard=True, sample_every=5000, samples=4, sample_steps=50,
               sample_new_tokens=96)
  c.eval.update(split="validation", examples=64, batch_size=8, sample_steps=50, text_scale=7.5,
                image_scale=1.5, max_new_tokens=96)
  return c
