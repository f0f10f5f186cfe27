"""Stage III, joint reasoning: cross-entropy on answers to
`[corrupted image] [question + options + recovery instruction] [recovered image] [answer]`.

Variants: `configs/reason.py:tiny` (built-in shapes world, CPU) and `configs/reason.py:bagel_7b`.
"""

import ml_collections

from robust_u1_jax import config_defaults


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = config_defaults.get_base_config()
  c.stage = "reason"
  c.variant = variant
  c.instruction = "Please restore this corrupted image to its clean version."
  r = c.reason = ml_collections.ConfigDict()
  r.recovered_images = "on_the_fly"  # on_the_fly | cache
  r.recovery_cache = ""  # folder written by `python -m robust_u1_jax.recover --cache_dir DIR`
  r.recovery_steps = 20
  if variant == "tiny":
    c.model = "tiny"
    c.init_from = ""  # the RL (or SFT) checkpoint of the tiny model
    c.total_steps = 300
    c.data.source = "shapes"
    c.data.vae_max_side, c.data.vae_min_side, c.data.vae_stride = 64, 32, 16
    c.data.vit_max_side, c.data.vit_min_side, c.data.vit_patch = 64, 32, 8
    c.data.batch_size = 8
    c.optimizer.learning_rate = 5e-4
    c.optimizer.warmup_steps = 20
    c.optimizer.eps = 1e-8
    c.checkpoint_every = 100
    c.eval_every = 100
  elif variant == "bagel_7b":
    c.model = "bagel_7b"
    c.init_from = ""  # required: the RL model directory or checkpoint
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.total_steps = 5_000
    c.data.source = "jsonl"
    c.data.path = ""  # Robust-R1 reasoning data
    c.data.corruption = "none"
    c.data.batch_size = 64
    c.data.token_budget = 16_384
    # Each expert computes its share of a row only. A reasoning sample is two images as VAE
    # latents and ViT patches (BAGEL's rules: about 0.8 latents per patch at any image size) and
    # its text, so latents are 40 to 44 % of it; 7,168 latents fit two samples of 560-pixel
    # images and one of 1,024 x 768.
    c.data.latent_budget = 7_168
    c.data.worker_count = 8
    r.recovered_images = "cache"
    r.recovery_steps = 50  # the paper's inference setting
  else:
    raise ValueError(
        f"configs/reason.py: unknown variant {variant!r}; choose one of: tiny, bagel_7b")
  c.eval_data.update({k: v for k, v in c.data.items() if k not in ("split", "shuffle")})
  return c
