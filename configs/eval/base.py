"""The evaluation sweep's options, shared by the per-benchmark configs (configs/eval/*.py).

Lists are comma-separated strings so that they override from the command line:
  --config.runs=/runs/a,/runs/b --config.steps=5000,10000 --config.text_scales=3,5,7.5
"""

import ml_collections

from configs import ipr2pr


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.dataset = dict(name="", dir="", split="test",   # splits join with "+": validation+test
                   limit=0,                  # evaluate the first N sessions only (0: all)
                   subset="", subset_file="")  # only the examples {key: {"subset": ...}} names so
  c.mode = "single"                          # single (each turn from its ground-truth input) and/or multi
  # --- editors ---
  c.runs = ""                                # training workdirs (comma-separated)
  c.steps = ""                               # their checkpoint steps: "" latest, "all", or "5000,10000"
  c.pretrained = dict(name="mgie-release", llava="", vision_tower="", sd="", mllm_pt="", unet_pt="")
  c.pretrained_dtype = "bfloat16"
  c.recipe = ipr2pr.get_config()             # the training recipe a pretrained MGIE is built with
  c.ip2p = ""                                # an InstructPix2Pix diffusers folder (text-only baseline)
  c.copy_input = True                        # the do-nothing row: beats every model on some metrics
  # --- the grid ---
  c.text_scales = "7.5"
  c.image_scales = "1.5"
  c.seeds = "0"
  c.sampler = "euler_ancestral"              # MGIE's; euler, ddim also
  c.sample_steps = 100
  c.resolution = 0                           # 0: 512 for pretrained models, the training size otherwise
  c.max_new_tokens = 96
  # MGIE's expressive instruction: "written" by the MLLM (the editor as users run it), or the
  # dataset's "reference", teacher-forced: what the edit head and UNet do given the right text.
  c.expressive = "written"
  # --- metrics (models from local folders / files, never downloaded) ---
  c.metrics = "l1,l2"
  c.metric_models = dict(clip="",            # a transformers CLIPModel folder (ViT-B/32 for MagicBrush)
                         dino="",            # a transformers ViTModel folder (DINO ViT-S/16)
                         lpips="", lpips_heads="",           # torchvision AlexNet weights + lpips alex.pth
                         lpips_vgg="", lpips_vgg_heads="")   # torchvision VGG16 weights + lpips vgg.pth
  c.plot = "clip_i,clip_t"                   # x,y of the guidance-grid plot
  c.batch_size = 4
  c.save_images = False
  return c
