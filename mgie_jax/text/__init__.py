"""Tokenizer and MGIE prompt template."""

from mgie_jax.text.template import (IGNORE_INDEX, SYSTEM, TEMPLATES, check_image_tokens, img_window_start, pad_batch,
                                    prompt_text, target_text, training_example)
from mgie_jax.text.tokenizer import IM_END, IM_PATCH, IM_START, IMAGE, IMG_TOKENS, MGIE_TOKENS, LlamaTokenizer
