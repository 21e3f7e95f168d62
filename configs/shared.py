"""What every training recipe has, with the values that do not depend on the recipe's size: the
tiny toy (configs/tiny.py) and the full MGIE recipe (configs/ipr2pr.py) both start here and set
their own sizes, data and budgets; neither derives from the other. Plain data: nothing here
imports the library.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = dict(
      kind="mgie",                        # "mgie", or "ip2p": the text-only baseline (configs/tiny_ip2p.py)
      init="random",                      # "random" (tower sizes below) or "pretrained" (c.pretrained's folders)
      dtype="float32",                    # compute dtype of every tower
      frozen_dtype="float32",             # storage dtype of the frozen towers
      remat="none",                       # "none", "full", or a jax.checkpoint policy name
      attention_impl="auto",              # "blocked" on CPU where it wins, else "xla"; or "cudnn"
      edit_head=dict(),                   # {}: the release's (4096 -> 512 wide, 4+4 layers, 77 x 768 out)
      noise={},                           # {}: the schedule of <pretrained.sd>/scheduler, else SD's
      # LoRA adapters (rank 0: none). targets: "llm_attention", "llm_mlp", "unet_attention" or
      # regexes over Linear paths; adapters always train, their base stays as c.trainable says.
      lora=dict(rank=0, alpha=16.0, dropout=0.0, targets=()),
      # The prompt the LLaVA was trained on: "llava_v1" (the release's LLaVA-7B v1) or "llava_1_5"
      # (a llava-hf LLaVA-1.5 folder: the image first, as <image> tokens; configs/ipr2pr_llava15.py),
      # or "text_only": LGIE, the language model without the image (configs/lgie.py, tiny_lgie.py).
      template="llava_v1",
  )
  # Trained parameters, by path prefix; the others are frozen (not checkpointed, rebuilt from
  # their source). The release trains embed_tokens, lm_head, the edit head and the UNet.
  c.trainable = ("mllm.language_model.model.embed_tokens", "mllm.language_model.lm_head",
                 "edit_head", "unet")
  c.pretrained = dict(
      llava="",           # LLaVA v1 folder (LLaVA-Lightning-7B-v1-1) or llava-hf folder
      vision_tower="",    # CLIP ViT-L/14 folder for a v1 LLaVA folder without CLIP weights
      sd="",              # Stable Diffusion 1.5 or InstructPix2Pix folder (unet/, vae/)
      mllm_pt="",         # optional: MGIE's released mllm.pt (embed_tokens, lm_head, edit_head)
      unet_pt="",         # optional: MGIE's released unet.pt
      vae="",             # optional: another VAE folder (default: <sd>/vae); "synthetic": the tiny recipe's
  )

  c.data = dict(
      dir="",                              # a built TFDS dataset folder (data_pipelines.build)
      tokenizer="",                        # "": the LLaVA folder's (or the synthetic data's)
      resolution=256, max_length=512, num_threads=4, worker_count=0,
      length_buckets=(),                   # e.g. (384, 448): batches cut to the shortest that fits
                                           # (one compiled step per length; same losses)
      text_length=0,                       # > 0: the terse instruction's tokens too (kind="ip2p")
      expressive="",                       # {key: expressive instruction} JSON for a dataset without
                                           # them (a benchmark's train split); "": the instruction, counted
      features="",                         # a frozen-feature cache (python -m data_pipelines.features):
                                           # its VAE posteriors and CLIP features replace the images
      shards=0,                            # data shards (0: one per process); fix it to make runs
                                           # on different host counts read identical batches
  )

  c.train = dict(
      steps=1000,
      batch_size=32,                       # global, per optimizer step
      grad_accum=1,                        # micro-batches the batch is split into (memory)
      lr_mllm=5e-4, lr_diffusion=5e-4, warmup_frac=0.03, grad_clip=1.0,
      b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
      ins_loss_weight=1.0, edit_loss_weight=0.5,   # L = L_ins + 0.5 L_edit (the paper)
      min_snr_gamma=0.0,                   # > 0: Min-SNR-gamma weights on the diffusion loss
      # > 0: keep an EMA of the trained weights (decay warmed up as (1 + t) / (10 + t), capped
      # here); samples, validation, edit, evaluate and export then use it.
      ema_decay=0.0,
  )

  # Fine-tuning: "<workdir>/checkpoints/<step>" of another run whose trained parameters (its EMA when
  # it kept one) start this run, with a fresh optimizer, data iterator and step count. "": the seed
  # or c.pretrained (a released MGIE: pretrained.mllm_pt / unet_pt).
  c.init_from = ""

  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  c.rules = ()                             # logical axis -> mesh axes; (): mgie_jax's default rules

  # Persistent compilation cache: "auto" = <workdir>/compile_cache, "" = off, or a path.
  c.compile_cache = "auto"
  c.compile_cache_min_seconds = 1.0
  c.checkpoint = dict(every=1000, keep=3, async_save=True,
                      restore_step=placeholder(int))   # restore this step instead of the latest
  c.log = dict(every=50, tensorboard=True, sample_every=0, samples=4, sample_steps=50,
               sample_new_tokens=96)
  # Validation: edit the split's examples and compare their L1 with copying the input.
  c.eval = dict(at_end=True, every=0, split="validation", examples=0, batch_size=8, sampler="euler_ancestral",
                sample_steps=50, text_scale=7.5, image_scale=1.5, max_new_tokens=96)
  return c
