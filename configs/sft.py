"""Stage I, self-recovery SFT: flow matching on the generation path
(docs/design.md#flow-matching-and-guidance).

Variants: `configs/sft.py:tiny` (built-in shapes world, CPU, minutes) and
`configs/sft.py:bagel_7b` (BAGEL-7B-MoT on ImageNet with on-the-fly ImageNet-C corruption).
"""

import ml_collections

from robust_u1_jax import config_lib


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = config_lib.get_base_config()
  c.stage = "sft"
  c.variant = variant
  c.instruction = "Please restore this corrupted image to its clean version."
  c.timestep_shift = 1.0
  c.text_dropout = 0.1
  c.vit_dropout = 0.3
  c.vae_dropout = 0.3
  c.eval_num_steps = 20  # sampler steps of the recoveries shown at evaluation steps
  if variant == "tiny":
    c.model = "tiny"
    c.total_steps = 300
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.vae_max_side, c.data.vae_min_side, c.data.vae_stride = 64, 32, 16
    c.data.vit_max_side, c.data.vit_min_side, c.data.vit_patch = 64, 32, 8
    c.data.corruption = "robust_r1_pipeline"
    c.data.batch_size = 8
    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 20
    c.optimizer.eps = 1e-8
    c.optimizer.ema_decay = 0.99
    c.checkpoint_every = 100
    c.eval_every = 100
  elif variant == "bagel_7b":
    c.model = "bagel_7b"
    c.init_from = ""  # required: path to the BAGEL-7B-MoT model directory
    c.param_dtype = "float32"
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.total_steps = 30_000
    c.timestep_shift = 1.0
    c.data.source = "tfds"
    c.data.path = "imagenet2012"
    c.data.corruption = "imagenet_c"
    c.data.severity = 0
    # Packed rows of 32k tokens, one per chip of a v5p-64 slice, at 512-pixel sides: attention
    # runs on the platform's fused kernel (`attention`: splash on TPU), which never holds a
    # row's (T, T) scores (docs/design.md#fused-attention). With the XLA kernel only 8k-token
    # rows fit (`bench aot`, README).
    c.data.vae_max_side = 512
    c.data.vit_max_side = 518
    c.data.vit_min_side = 224
    c.data.batch_size = 32
    c.data.token_budget = 32_768
    c.data.worker_count = 16
    c.mesh.fsdp = -1
  else:
    raise ValueError(f"configs/sft.py: unknown variant {variant!r}; choose one of: tiny, bagel_7b")
  c.eval_data.update({k: v for k, v in c.data.items() if k not in ("split", "shuffle")})
  return c
