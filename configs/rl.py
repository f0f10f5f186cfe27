"""Stage II, visual quality alignment: Flow-GRPO on the recovery sampler
(docs/design.md#flow-grpo).

Variants: `configs/rl.py:tiny` (built-in shapes world, CPU) and `configs/rl.py:bagel_7b`.
"""

import ml_collections

from robust_u1_jax import config_defaults


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = config_defaults.get_base_config()
  c.stage = "rl"
  c.variant = variant
  c.instruction = "Please restore this corrupted image to its clean version."
  rl = c.rl = ml_collections.ConfigDict()
  rl.group_size = 8  # recoveries drawn per corrupted image
  rl.num_steps = 15  # sampler steps during training (evaluation uses eval_num_steps)
  rl.eval_num_steps = 50
  rl.window_size = 2  # stochastic, trained SDE steps; start drawn in [0, num_steps/2 - window]
  rl.noise_level = 1.3
  rl.timestep_shift = 3.0
  rl.clip_low = 1e-4
  rl.clip_high = 1e-4
  rl.adv_clip = 5.0
  rl.beta = 0.0  # KL weight to the frozen reference; 0 keeps no reference copy
  # Optimizer updates made on one rollout's B*G*W transitions (B images, G recoveries each, W
  # window steps). Each inner epoch shuffles the transitions and cuts them into
  # updates_per_rollout / inner_epochs mini-batches of about B*G*W*inner_epochs /
  # updates_per_rollout transitions, one update each; updates after the first are off-policy, so
  # the PPO clip and approx_kl engage. 1 and 1: one update on every transition (ratio = 1).
  # The learning-rate schedule (warmup too) is stretched to total_steps * updates_per_rollout
  # updates. With optimizer.grad_accum_steps = k each of these is a gradient step and every k-th
  # applies their mean (the EMA moves then); k need not divide updates_per_rollout.
  rl.updates_per_rollout = 1
  rl.inner_epochs = 1  # passes over the rollout's transitions; must divide updates_per_rollout
  rl.reward_weights = ml_collections.ConfigDict({"ssim": 1.0, "clip": 0.2})
  rl.clip_alpha = 5.0
  rl.clip_checkpoint = ""  # CLIP ViT-B/32 weights (open_clip or transformers naming)
  rl.clip_model = "vit_b32"  # vit_b32 | tiny: the shapes of the checkpoint's model
  # Full or LoRA training of the generation expert: config.lora (rank 0: full).
  c.optimizer.learning_rate = 1e-5
  c.optimizer.warmup_steps = 0
  c.optimizer.ema_decay = 0.0
  if variant == "tiny":
    c.model = "tiny"
    c.init_from = ""  # an SFT checkpoint of the tiny model (workdir of configs/sft.py:tiny)
    c.total_steps = 100
    rl.group_size = 4
    rl.num_steps = 10
    rl.eval_num_steps = 20
    # The clip range stays Flow-GRPO's released 1e-4: a transition's ratio moves ~1e-4 per update
    # here, so 0.2 never clipped. Measured in the demo (60 steps, lr 1e-4): the second update
    # clips 4-10 % of transitions early on, and recovery gains over SFT as with 0.2 (SSIM
    # 0.5408 -> 0.5461, CLIP 0.486 -> 0.500; 0.2: 0.5473, 0.504). At lr 1e-3 it clips 40-85 %,
    # approx-KL 1e-7, and recovery falls below SFT's (SSIM 0.504, CLIP 0.448).
    rl.updates_per_rollout = 2  # one pass, two mini-batches of half the transitions each
    # SSIM only: the built-in world ships no trained CLIP. The semantic reward needs both
    # rl.clip_checkpoint and rl.reward_weights.clip > 0 (a checkpoint alone is noted, not read).
    rl.reward_weights.clip = 0.0
    c.data.source = "shapes"
    c.data.vae_max_side, c.data.vae_min_side, c.data.vae_stride = 64, 32, 16
    c.data.vit_max_side, c.data.vit_min_side, c.data.vit_patch = 64, 32, 8
    c.data.batch_size = 2  # corrupted images per step; x group_size recoveries
    c.optimizer.learning_rate = 1e-4
    c.checkpoint_every = 25
    c.eval_every = 25
  elif variant == "bagel_7b":
    c.model = "bagel_7b"
    c.init_from = ""  # required: the SFT model directory or checkpoint
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.total_steps = 2_000
    rl.clip_checkpoint = ""  # required for the semantic reward
    # Flow-GRPO's released configs (yifan123/flow_grpo config/grpo.py) set
    # gradient_accumulation_steps = num_batches_per_epoch // 2 "so that gradients are updated
    # twice per epoch", with num_inner_epochs = 1: two updates per sampling round, one pass. We
    # keep that count; mini-batches here are shuffled (sample, window step) transitions of one
    # step's rollout rather than Flow-GRPO's whole-sample batches (our choice).
    rl.updates_per_rollout = 2
    rl.inner_epochs = 1
    c.data.source = "jsonl"
    c.data.path = ""  # Robust-R1 pairs {"prompt", "image", "target_image"}
    c.data.corruption = "none"  # the pairs are already degraded
    # Rollouts batch images of one size: centred squares at 512 x 512 (ViT: 518 x 518).
    c.data.crop_square = True
    c.data.vae_min_side = c.data.vae_max_side = 512
    c.data.batch_size = 32
    c.data.worker_count = 8
    # One text width on every host of a pod (unpacked rows): the paper's instruction is 12 tokens;
    # a pair's own prompt may be longer, and one past 128 is a bad record naming this setting.
    c.data.text_widths.instruction = 128
  else:
    raise ValueError(f"configs/rl.py: unknown variant {variant!r}; choose one of: tiny, bagel_7b")
  c.eval_data.update({k: v for k, v in c.data.items() if k not in ("split", "shuffle")})
  return c
