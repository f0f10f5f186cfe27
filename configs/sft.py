"""Stage I, self-recovery SFT: flow matching on the generation path
(docs/design.md#flow-matching-and-guidance).

Variants: `configs/sft.py:tiny` (built-in shapes world, CPU, minutes) and
`configs/sft.py:bagel_7b` (BAGEL-7B-MoT on ImageNet with on-the-fly ImageNet-C corruption) and
`configs/sft.py:gpu_1p5b` (BAGEL's design at about 1.5B parameters per expert, random weights,
shapes world at 512 pixels: one H200, `bench train_step`).
"""

import ml_collections

from robust_u1_jax import config_defaults


def _bagel_precision_and_sides(c: ml_collections.ConfigDict) -> None:
  """float32 weights computed in bfloat16; images at 512-pixel sides (VAE), ViT 224 to 518."""
  c.param_dtype, c.compute_dtype = "float32", "bfloat16"
  c.data.vae_max_side, c.data.vit_max_side, c.data.vit_min_side = 512, 518, 224


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = config_defaults.get_base_config()
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
    _bagel_precision_and_sides(c)
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
    c.data.batch_size = 32
    c.data.token_budget = 32_768
    # Each expert computes its share of a row only: about 60 % of an SFT sample's tokens are
    # latents (two 512-pixel VAE grids of 1,024 against a ViT grid of up to 1,369 patches and the
    # instruction), so 9 such samples fill both shares.
    c.data.latent_budget = 19_456
    c.data.worker_count = 16
    c.mesh.fsdp = -1
  elif variant == "gpu_1p5b":
    # One H200 (141 GB), random weights, no download: `bench train_step` times its step
    # (docs/PERFORMANCE.md, "One H200"). BAGEL's design at Qwen2.5-1.5B's shapes (3.58 B
    # parameters: 1.31 B per expert's decoder layers, the ViT, the VAE), the built-in shapes
    # world at 512 pixels.
    c.model = "bagel_1p5b"
    _bagel_precision_and_sides(c)
    c.attention = "cudnn"
    # Two packed rows of 16k tokens a step. 'dots' keeps the matmul outputs (about 1.3 MB a token
    # over the 28 layers, 42 GB here, beside 36 GB of weights, gradients, Adam moments and EMA)
    # and recomputes the elementwise work and the attention; 'none' would keep about 3 MB a
    # token, so it fits at one row only (--override remat=none --override data.batch_size=1).
    c.remat = "dots"
    c.total_steps = 30_000
    c.data.source = "shapes"
    c.data.image_size = 560  # a multiple of 16 and 14, resized to 512 (VAE) and 518 (ViT)
    c.data.batch_size = 2
    c.data.token_budget = 16_384
    c.data.worker_count = 8
  else:
    raise ValueError(f"configs/sft.py: unknown variant {variant!r}; choose one of: tiny, "
                     "bagel_7b, gpu_1p5b")
  c.eval_data.update({k: v for k, v in c.data.items() if k not in ("split", "shuffle")})
  return c
