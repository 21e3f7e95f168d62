"""configs/ipr2pr_llava15.py at toy size, for tiny LLaVA-1.5 and SD folders (the tests generate
them with transformers and diffusers; no weights are downloaded): the same prompt, loading path
and trained set, fp32, 32 px, a few steps. The edit head is sized for a 64-wide LLaMA and a UNet
with 24-wide cross-attention; override them for other folders.

  python -m mgie_jax.train --config=configs/tiny_llava15.py --workdir=W \\
      --config.pretrained.llava=<tiny llava-hf folder> --config.pretrained.sd=<tiny SD folder> \\
      --config.data.dir=<built dataset>
"""

from configs import ipr2pr_llava15


def get_config(arg=None):
  c = ipr2pr_llava15.get_config(arg)
  c.model.update(dtype="float32", frozen_dtype="float32", remat="none")
  c.model.edit_head = dict(llm_dim=64, width=32, heads=4, ffn=48, encoder_layers=1, decoder_layers=1,
                           num_queries=7, out_dim=24)
  c.data.update(resolution=32, max_length=192, length_buckets=(), worker_count=0, num_threads=2)
  c.train.update(steps=4, batch_size=8)
  c.checkpoint.update(every=2, async_save=False)
  c.log.update(every=1, sample_every=0, tensorboard=False)
  c.eval.update(at_end=False, examples=0)
  c.mesh = dict(data=1, fsdp=-1, tensor=1)
  return c
