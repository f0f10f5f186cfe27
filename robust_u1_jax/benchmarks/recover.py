"""`python -m robust_u1_jax.bench recover`: the recovery sampler's speed, measured as ratios.

  python -m robust_u1_jax.bench recover                       # the bench's small model, CPU
  python -m robust_u1_jax.bench recover --config configs/sft.py:tiny
  python -m robust_u1_jax.bench recover --config /path/to/model_dir   # a BAGEL / Robust-U1 dir
  python -m robust_u1_jax.bench recover --topology v5p-8      # + the 7B recovery, compiled AOT

Measured on the host, each ratio's two sides alternated call by call (`benchmarks.alternate`;
printed: the median of the per-round ratios with its quartiles), so a machine shared with other
work slows both alike:
  a. one denoising step against the prefilled KV cache (`Bagel.denoise_velocity`) vs recomputing
     the context each step (the uncached forward over context + noisy block with the packed mask,
     `Bagel.__call__`, as training runs it);
  b. the cached step when the context doubles, 2,048 -> 4,096 tokens (the instruction padded to
     reach it): goal at most 1.3x, since a step's work is the noisy block's;
  c. the three CFG branches answered by one batched call (`recovery.guided_velocity`) vs three
     `denoise_velocity` calls + `sampling.cfg_velocity`;
  d. the compile time of a whole jitted recovery (`engine._recover`, what `Engine.recover` runs:
     VAE encode, three prefills, the 50-step sampler, VAE decode), once per image size.
With --topology (a TPU slice such as v5p-8 needs libtpu; cpu:N runs the same path on fake CPU
devices), also:
  e. BAGEL-7B's recovery of a 1024 x 656 image in bfloat16, 50 steps, three-context CFG, compiled
     ahead of time for the topology with abstract sharded weights (nothing allocated, as `bench
     aot`): memory per chip and the compiler's estimated seconds against the FLOP floor at the
     chips' peak (an analytic count from the shapes, printed with its parts). XLA's cost analysis
     counts the sampler's loop body once, so one guided step is compiled alone too and counted
     49 times. The compiles take 5 to 15 minutes on a 2-core host.

The default model is BAGEL's architecture at a size a 2-core CPU can time (`bench_config`): an LLM
of width 512 (4 layers, both experts), a small ViT and the tiny VAE; images of 256 x 256 give a
noisy block of 258 tokens against a 528-token context, the share (about a third of the row) that
a 1024 x 656 image has in BAGEL-7B (2,626 of 8,416 tokens).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.benchmarks import alternate, table
from robust_u1_jax.data import sequence
from robust_u1_jax.models import bagel as bagel_lib
from robust_u1_jax.models.qwen2_mot import LLMConfig
from robust_u1_jax.models.siglip import SiglipConfig
from robust_u1_jax.models.vae import VAEConfig

if TYPE_CHECKING:
  # `robust_u1_jax.sampling` (which the inference modules import) starts JAX's backends on import,
  # fixing the platform and the CPU device count before `--topology` could set them: the inference
  # modules are imported inside the functions that use them, as aot.py does.
  from robust_u1_jax.inference import recovery as recovery_lib

DEFAULT_SIZE = (256, 256)  # (height, width) of the timed images
COMPILE_SIZES = ((256, 256), (384, 256))  # d: one full-recovery compile each
CONTEXTS = (2048, 4096)  # b: cached-step context lengths, in tokens
SCALING_GOAL = 1.3
# e: the issue's recovery (BAGEL's editing defaults) and its analytic estimate.
RECOVERY_7B = dict(height=1024, width=656, steps=50)
ISSUE_FLOOR_FLOPS = 5.9e15
BLOCK_7B = 64 * 41 + 2  # its noisy block: a 64 x 41 latent grid and the two markers
FLOOR_GOAL = 1.5
# HBM bandwidth per chip (Cloud TPU documentation), by device_kind: to split the compiler's
# step-time estimate into its FLOP and memory-traffic parts.
HBM_BYTES_PER_S = {"TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5": 2.765e12,
                   "TPU v5p": 2.765e12, "TPU v6 lite": 1.64e12}
MAX_TIMED_PARAMS = 2_000_000_000  # a model the timed parts would allocate on the host


# ------------------------------------------------------------------------------------ the model

def bench_config(**llm_overrides) -> bagel_lib.BagelConfig:
  """BAGEL's architecture at a CPU-timeable size: LLM width 512 (4 layers, MoT), a 2-layer ViT of
  16-pixel patches, the tiny VAE, latent grids up to 32 x 32 (512-pixel sides)."""
  llm = dict(hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=2,
             head_dim=64, rope_theta=1e6)
  return bagel_lib.BagelConfig(
      llm=LLMConfig.tiny(**{**llm, **llm_overrides}),
      vit=SiglipConfig(hidden_size=64, mlp_dim=128, num_heads=4, num_layers=2, patch_size=16,
                       max_patches_per_side=32),
      vae=VAEConfig.tiny(), max_latent_size=32)


@dataclasses.dataclass
class Setup:
  """A model split for jitted calls, with what building its rows needs."""
  name: str
  graphdef: nnx.GraphDef
  state: nnx.State
  config: bagel_lib.BagelConfig
  markers: sequence.Markers
  instruction_ids: list[int]
  vit_size: Callable[[int, int], tuple[int, int]]  # VAE-size (h, w) -> the ViT image's (h, w)

  @classmethod
  def from_model(cls, model: bagel_lib.Bagel, name: str = "model") -> Setup:
    """A randomly initialised (or any) model, its images fed to the ViT at their VAE size."""
    markers, ids = _tokenizer_ids()
    graphdef, state = nnx.split(model)
    return cls(name, graphdef, state, model.config, markers, ids, lambda h, w: (h, w))

  def image_size(self, want: tuple[int, int]) -> tuple[int, int]:
    """`want` shrunk (keeping its aspect) to what the model's latent grid and ViT table take."""
    c = self.config
    ds = c.latent_downsample
    limit = c.max_latent_size * ds
    if c.vit.max_patches_per_side:
      limit = min(limit, c.vit.max_patches_per_side * c.vit.patch_size)
    scale = min(1.0, limit / max(want))
    return tuple(max(ds, int(side * scale) // ds * ds) for side in want)


def _tokenizer_ids() -> tuple[sequence.Markers, list[int]]:
  """The repository's tokenizer: BAGEL's special tokens and the recovery instruction (12 ids;
  Qwen2's tokenizer makes it 14, which moves no figure here)."""
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.inference import recovery as recovery_lib

  tok = tokenizer_lib.load_tokenizer()
  special = tokenizer_lib.special_token_ids(tok)
  return (sequence.Markers(special["vision_start"], special["vision_end"]),
          tokenizer_lib.encode_text_block(tok, recovery_lib.INSTRUCTION))


def load_setup(spec: str = "", *, model_config: bagel_lib.BagelConfig | None = None) -> Setup:
  """'' (the bench's model), a config file[:variant] (its model preset, random weights) or a
  model directory (`Engine.load`: released weights, tokenizer and image rules)."""
  if spec and os.path.isdir(spec):
    from robust_u1_jax.inference import engine as engine_lib
    from robust_u1_jax.inference import recovery as recovery_lib

    engine = engine_lib.Engine.load(spec)
    return Setup(spec, engine.graphdef, engine.weights, engine.config, engine.markers,
                 engine.encode_block(recovery_lib.INSTRUCTION), engine.rules.vit_size)
  if spec:
    from robust_u1_jax.benchmarks import aot
    from robust_u1_jax.data import tokenizer as tokenizer_lib
    from robust_u1_jax.training import run_setup

    config = aot.load_config(spec)
    model_config = run_setup.model_config(config, tokenizer_lib.load_tokenizer(
        run_setup.tokenizer_dir(config)))
  model_config = model_config or bench_config()
  create = lambda: bagel_lib.Bagel(model_config, rngs=nnx.Rngs(0))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(create))))
  if params > MAX_TIMED_PARAMS:
    raise SystemExit(f"recover: {spec or 'the model'} has {params / 1e9:.1f} B parameters; the "
                     "timed parts allocate it on this host. Time a smaller model, and compile the "
                     "7B recovery with --topology (v5p-8, or cpu:8 without libtpu)")
  return Setup.from_model(create(), spec or "bench_config()")


# ------------------------------------------------------------------------------------ the rows

def _images(setup: Setup, size: tuple[int, int], seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  h, w = size
  vh, vw = setup.vit_size(h, w)
  return {"corrupted": rng.integers(0, 256, (h, w, 3), np.uint8),
          "corrupted_vit": rng.integers(0, 256, (vh, vw, 3), np.uint8)}


def recovery_rows(setup: Setup, size: tuple[int, int], context: int | None = None
                  ) -> recovery_lib.RecoveryInputs:
  """One image's recovery rows (`recovery.recovery_inputs`); with `context`, the instruction is
  padded (by repeating it) so that the full context holds exactly `context` tokens."""
  from robust_u1_jax.inference import recovery as recovery_lib

  sample = _images(setup, size)
  ids = setup.instruction_ids
  if context is not None:
    blocks = sequence.recovery_blocks(sample["corrupted"], sample["corrupted_vit"], [],
                                      use_text=False, target=False)
    images = sequence.lengths(blocks, *sequence.strides(setup.config))[0]
    if context < images + len(ids):
      raise ValueError(f"context {context} is shorter than the image blocks ({images} tokens) "
                       "and the instruction")
    ids = (ids * (-(-(context - images) // len(ids))))[:context - images]
  return recovery_lib.recovery_inputs([sample], setup.config, setup.markers, ids)


def training_rows(setup: Setup, size: tuple[int, int]) -> bagel_lib.SequenceInputs:
  """[VAE][ViT][instruction][noisy target]: the row the SFT step trains on, one sample."""
  from robust_u1_jax.inference import context as context_lib

  sample = _images(setup, size)
  blocks = sequence.recovery_blocks(sample["corrupted"], sample["corrupted_vit"],
                                    setup.instruction_ids)
  return context_lib.rows([blocks], setup.config, setup.markers)


def _device(tree):
  return jax.tree.map(jnp.asarray, tree)


# ------------------------------------------------------------------------ jitted computations
# (graphdef, weights, ...) with the graph definition static, as engine.py's are.

@functools.partial(jax.jit, static_argnums=0)
def _contexts(graphdef, state, inputs: recovery_lib.RecoveryInputs):
  """The three guidance contexts prefilled, as `recovery.velocity_fn` prefills them."""
  from robust_u1_jax.inference import context as context_lib

  model = nnx.merge(graphdef, state)
  cond = context_lib.encode_images(model, inputs.corrupted)

  def context(rows):
    cache = model.init_cache(rows.token_kind.shape[0], rows.token_kind.shape[1])
    return context_lib.prefill(model, cache, rows, context_lib.gather_latents(cond, rows))

  return context(inputs.full), context(inputs.no_text), context(inputs.no_image), cond


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(graphdef, state, cache, noisy, x_bnc, t_b):
  return nnx.merge(graphdef, state).denoise_velocity(cache, noisy, x_bnc, t_b)


@functools.partial(jax.jit, static_argnums=0)
def _uncached_step(graphdef, state, rows, clean_bnc, x_bnc, t_b):
  """The noisy block's velocity from one forward over context + block (packed mask): the clean
  image's latent tokens come first in the row, the noisy target's last."""
  model = nnx.merge(graphdef, state)
  n = x_bnc.shape[1]
  latents = jnp.concatenate([clean_bnc, x_bnc], axis=1)
  timesteps = jnp.concatenate([jnp.zeros(clean_bnc.shape[:2]),
                               jnp.broadcast_to(t_b[:, None], x_bnc.shape[:2])], axis=1)
  hidden = model(rows, latents, timesteps)
  return model.velocity(hidden, rows.latent_seq_index[:, -n:])


@functools.partial(jax.jit, static_argnums=(0, 6))
def _batched_cfg(graphdef, state, full, no_text, no_image, noisy, guidance, x_bnc, t_b):
  from robust_u1_jax.inference import recovery as recovery_lib

  model = nnx.merge(graphdef, state)
  return recovery_lib.guided_velocity(model, full, no_text, no_image, noisy, guidance)(x_bnc, t_b)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _separate_cfg(graphdef, state, full, no_text, no_image, noisy, guidance, x_bnc, t_b):
  """The same guided velocity from three model calls, each against its own (unpadded) cache."""
  from robust_u1_jax import sampling

  model = nnx.merge(graphdef, state)
  v, v_no_text, v_no_image = (model.denoise_velocity(c, noisy, x_bnc, t_b)
                              for c in (full, no_text, no_image))
  lo, hi = guidance.interval
  guided = ((t_b > lo) & (t_b <= hi))[:, None, None]
  return sampling.cfg_velocity(v, v_no_text, v_no_image,
                               jnp.where(guided, guidance.text_scale, 1.0),
                               jnp.where(guided, guidance.image_scale, 1.0), guidance.renorm_min,
                               guidance.renorm_type)


# ------------------------------------------------------------------------------------ timing

def _blocking(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _noise(setup: Setup, noisy: bagel_lib.SequenceInputs, batch: int = 1):
  n = noisy.latent_seq_index.shape[1]
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, n, setup.config.latent_channels))
  return x, jnp.full((batch,), 0.5)


def _context_tokens(rows: bagel_lib.SequenceInputs) -> int:
  return int(np.sum(np.asarray(rows.token_kind) != bagel_lib.PAD, axis=1).max())


def cached_vs_uncached(setup: Setup, size: tuple[int, int], seconds: float, *,
                       min_reps: int = 5) -> dict[str, Any]:
  """a. One denoising step against the prefilled context vs the whole row recomputed."""
  inputs = _device(recovery_rows(setup, size))
  full, _, _, cond = _contexts(setup.graphdef, setup.state, inputs)
  rows = _device(training_rows(setup, size))
  noisy_tokens = np.asarray(rows.layout.noisy)[0, np.asarray(rows.latent_seq_index)[0]]
  n = inputs.noisy.latent_seq_index.shape[1]
  if not noisy_tokens[-n:].all() or noisy_tokens[:-n].any():
    raise AssertionError("the training row's last latent tokens are not its noisy block")
  x, t = _noise(setup, inputs.noisy)
  timed = alternate({
      "cached": _blocking(_cached_step, setup.graphdef, setup.state, full, inputs.noisy, x, t),
      "uncached": _blocking(_uncached_step, setup.graphdef, setup.state, rows, cond, x, t),
  }, seconds, min_reps=min_reps)
  ratio = timed.ratio("uncached", "cached")
  return {"size": size, "block": int(inputs.noisy.token_kind.shape[1]),
          "context": _context_tokens(inputs.full), "row": int(rows.token_kind.shape[1]),
          "cached_s": timed.median("cached"), "uncached_s": timed.median("uncached"),
          "uncached_over_cached": ratio.median, "uncached_over_cached_spread": ratio}


def context_scaling(setup: Setup, size: tuple[int, int], seconds: float,
                    contexts: Sequence[int] = CONTEXTS, *, min_reps: int = 5) -> dict[str, Any]:
  """b. The cached step against full contexts of `contexts` tokens (instruction padded)."""
  steps, noisy = {}, None
  for length in contexts:
    inputs = _device(recovery_rows(setup, size, context=length))
    full = _contexts(setup.graphdef, setup.state, inputs)[0]
    if int(full.max_length) != length or int(np.asarray(full.valid).sum()) != length:
      raise AssertionError(f"the context holds {int(np.asarray(full.valid).sum())} tokens in "
                           f"{full.max_length} slots, not {length}")
    noisy = inputs.noisy
    x, t = _noise(setup, noisy)
    steps[length] = _blocking(_cached_step, setup.graphdef, setup.state, full, noisy, x, t)
  timed = alternate({str(k): fn for k, fn in steps.items()}, seconds, min_reps=min_reps)
  short, long = contexts[0], contexts[-1]
  block = int(noisy.token_kind.shape[1])
  model = {k: step_flops(setup.config.llm, block, k + block, both_experts=True)
           for k in (short, long)}
  # The same contexts at BAGEL-7B's width, against a 1024 x 656 image's block (2,626 tokens).
  llm_7b = LLMConfig.bagel_7b()
  model_7b = {k: step_flops(llm_7b, BLOCK_7B, k + BLOCK_7B, both_experts=True)
              for k in (short, long)}
  return {"size": size, "block": block, "contexts": tuple(contexts),
          "step_s": {k: timed.median(str(k)) for k in contexts},
          "ratio": timed.ratio(str(long), str(short)).median,
          "ratio_spread": timed.ratio(str(long), str(short)),
          "flop_ratio": model[long] / model[short],
          "flop_ratio_7b": model_7b[long] / model_7b[short],
          "attention_share": {k: attention_share(setup.config.llm, block, k + block)
                              for k in (short, long)}}


def cfg_batching(setup: Setup, size: tuple[int, int], seconds: float, *,
                 guidance: recovery_lib.Guidance | None = None, min_reps: int = 5
                 ) -> dict[str, Any]:
  """c. The three guidance branches in one batched call vs three calls (default guidance:
  BAGEL's editing defaults)."""
  from robust_u1_jax.inference import recovery as recovery_lib

  guidance = guidance or recovery_lib.Guidance()
  if not guidance.uses_no_image:
    raise ValueError("cfg_batching compares the three-branch guidance: use text_scale > 1 and "
                     "image_scale > 1")
  inputs = _device(recovery_rows(setup, size))
  full, no_text, no_image, _ = _contexts(setup.graphdef, setup.state, inputs)
  x, t = _noise(setup, inputs.noisy)
  args = (setup.graphdef, setup.state, full, no_text, no_image, inputs.noisy, guidance, x, t)
  batched, separate = _batched_cfg(*args), _separate_cfg(*args)
  # The two must be one computation: a ratio of different work would mean nothing.
  np.testing.assert_allclose(np.asarray(batched), np.asarray(separate), rtol=2e-3, atol=2e-4)
  timed = alternate({"batched": _blocking(_batched_cfg, *args),
                     "separate": _blocking(_separate_cfg, *args)}, seconds, min_reps=min_reps)
  return {"size": size, "block": int(inputs.noisy.token_kind.shape[1]),
          "slots": tuple(int(c.max_length) for c in (full, no_text, no_image)),
          "batched_s": timed.median("batched"), "separate_s": timed.median("separate"),
          "separate_over_batched": timed.ratio("separate", "batched").median,
          "separate_over_batched_spread": timed.ratio("separate", "batched")}


def compile_times(setup: Setup, sizes: Sequence[tuple[int, int]] = COMPILE_SIZES, *,
                  sampler: recovery_lib.Sampler | None = None) -> list[dict[str, Any]]:
  """d. Lower and compile `engine._recover` (what `Engine.recover` runs) once per image size,
  with the persistent compilation cache off, so each is a cold compile (default sampler:
  BAGEL's, 50 steps with three-context guidance)."""
  from robust_u1_jax.benchmarks import aot
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import recovery as recovery_lib

  sampler = sampler or recovery_lib.Sampler()
  out = []
  keys = jax.random.split(jax.random.PRNGKey(0), 1)  # (1, 2): one key per image
  with aot.persistent_cache(False):
    for size in dict.fromkeys(setup.image_size(s) for s in sizes):
      inputs = _device(recovery_rows(setup, size))
      t0 = time.perf_counter()
      lowered = engine_lib._recover.lower(setup.graphdef, setup.state, inputs, keys,
                                          sampler=sampler, posterior="sample")
      lower_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      lowered.compile()
      out.append({"size": size, "context": _context_tokens(inputs.full),
                  "block": int(inputs.noisy.token_kind.shape[1]), "steps": sampler.num_steps,
                  "lower_s": lower_s, "compile_s": time.perf_counter() - t0})
  return out


# ----------------------------------------------------------------------------- the FLOP model
# Two FLOPs per multiply-add; norms, RoPE, softmax and the elementwise work are left out (a few
# percent at 7B shapes).

def token_flops(llm) -> float:
  """Matmul FLOPs of one token through one expert of every decoder layer."""
  d, ff = llm.hidden_size, llm.intermediate_size
  q, kv = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
  return 2.0 * llm.num_layers * (d * q + 2 * d * kv + q * d + 3 * d * ff)


def pair_flops(llm) -> float:
  """Attention FLOPs of one (query, key) pair over every layer: q.k and p.v, all heads."""
  return 4.0 * llm.num_layers * llm.num_heads * llm.head_dim


def step_flops(llm, block: int, keys: int, *, both_experts: bool) -> float:
  """One denoising call of `block` tokens against `keys` keys (cache slots + the block)."""
  experts = 2 if both_experts and llm.mot else 1
  return block * (experts * token_flops(llm) + keys * pair_flops(llm))


def attention_share(llm, block: int, keys: int, *, both_experts: bool = True) -> float:
  """The attention's share of `step_flops`: what grows with the context."""
  return block * keys * pair_flops(llm) / step_flops(llm, block, keys, both_experts=both_experts)


def _visible_pairs(rows: bagel_lib.SequenceInputs) -> int:
  """(query, key) pairs the packed mask allows over the rows (numpy: no device work)."""
  from robust_u1_jax.models import attention_mask

  layout = jax.tree.map(np.asarray, rows.layout)
  with jax.default_device(jax.devices("cpu")[0]):
    return int(np.asarray(attention_mask.packed_mask(layout)).sum())


def recovery_flops(config: bagel_lib.BagelConfig, inputs: recovery_lib.RecoveryInputs,
                   moves: int, branches: int = 3) -> dict[str, float]:
  """Analytic FLOPs of one image's recovery, without the VAE.

  floor: each token through its own expert once, each query against the keys the mask lets it
    see, the ViT once; what any implementation of these shapes must compute.
  library: what this implementation computes: both experts over every token of the mixed rows
    (a per-token route runs the two and selects), every query against all cache slots of the
    stacked branches (the short text-only context padded to the longest), the ViT once per
    context that holds the image.
  """
  llm, vit = config.llm, config.vit
  contexts = [inputs.full, inputs.no_text, inputs.no_image][:branches]
  tokens = [_context_tokens(r) for r in contexts]
  block = int(inputs.noisy.token_kind.shape[1])
  n_latent = int(inputs.noisy.latent_seq_index.shape[1])
  n_vit = int(inputs.full.vit_patches.shape[1])
  experts = 2 if llm.mot else 1
  # Denoising: `moves` calls, each answering every branch.
  d_linear = moves * branches * block * token_flops(llm)
  d_attention = moves * sum(block * (k + block) for k in tokens) * pair_flops(llm)
  d_attention_lib = moves * branches * block * (max(tokens) + block) * pair_flops(llm)
  heads = moves * branches * n_latent * 2 * 2 * config.latent_channels * llm.hidden_size
  # Prefill of each context (its rows padded to their longest: one image, no padding here).
  p_linear = sum(tokens) * token_flops(llm)
  p_attention = sum(_visible_pairs(r) for r in contexts) * pair_flops(llm)
  p_attention_lib = sum(int(r.token_kind.shape[1]) ** 2 for r in contexts) * pair_flops(llm)
  # The ViT: its layers, its attention over the one image's patches, the patch embedding and the
  # connector to the LLM width.
  h = vit.hidden_size
  vit_flops = n_vit * (2 * vit.num_layers * (4 * h * h + 2 * h * vit.mlp_dim)
                       + 2 * vit.patch_dim * h + 2 * (h * llm.hidden_size + llm.hidden_size ** 2))
  vit_flops += 4 * vit.num_layers * h * n_vit ** 2
  vit_runs = sum(int(r.vit_patches.shape[1]) > 0 for r in contexts)
  parts = {"denoise_linear": d_linear, "denoise_attention": d_attention, "heads": heads,
           "prefill_linear": p_linear, "prefill_attention": p_attention, "vit": vit_flops}
  floor = sum(parts.values())
  library = (experts * (d_linear + p_linear) + d_attention_lib + heads + p_attention_lib
             + vit_runs * vit_flops)
  return {**parts, "floor": floor, "library": library,
          "step_floor": (d_linear + d_attention + heads) / moves,
          "step_library": (experts * d_linear + d_attention_lib + heads) / moves,
          "tokens": tuple(tokens), "block": block, "n_vit": n_vit, "n_latent": n_latent}


# ---------------------------------------------------------------- e: the 7B recovery, AOT

def _recovery_mesh(overrides: Mapping[str, Any]) -> dict[str, int]:
  """Tensor parallel over every chip by default: one image's recovery has a batch of 3 (the CFG
  branches), which cannot split over 4+ chips, while BAGEL-7B's 28 query / 4 KV heads and 18,944
  MLP columns split over 4."""
  axes = {"data": 1, "fsdp": 1, "tensor": -1}
  for key, value in overrides.items():
    if key.startswith("mesh."):
      axes[key[5:]] = int(value)
  return axes


def _abstract(tree, sharding_of: Callable[[tuple[int, ...]], Any]):
  """Arrays (or shapes) -> ShapeDtypeStructs placed by `sharding_of(shape)`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding_of(tuple(x.shape))), tree)


def _memory(compiled) -> dict[str, int] | None:
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  m = {f: int(getattr(stats, f)) for f in dir(stats)
       if f.endswith("_in_bytes") and isinstance(getattr(stats, f), (int, float))}
  m["total"] = (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                - m["alias_size_in_bytes"] + m["temp_size_in_bytes"]
                + m["generated_code_size_in_bytes"])
  return m


def compile_recovery_7b(topology: str, *, height: int = RECOVERY_7B["height"],
                        width: int = RECOVERY_7B["width"], steps: int = RECOVERY_7B["steps"],
                        mesh_axes: Mapping[str, int] | None = None,
                        model_config: bagel_lib.BagelConfig | None = None,
                        separate_step: bool = True, say: Callable[..., None] = print
                        ) -> dict[str, Any]:
  """e. BAGEL-7B's recovery (`engine._recover`) compiled for `topology` with abstract sharded
  weights, and one guided denoising step compiled alone (with `separate_step`, also as the
  three calls of part c, for the compiler's view of batching the branches on the chips).

  XLA's cost analysis counts a while loop's body once (the 50-step sampler is a `lax.scan`), so
  the recovery's FLOPs and estimated seconds are the compiled recovery's plus (moves - 1) times
  those of the step program, whose computation is the loop's body.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P

  from robust_u1_jax import sharding
  from robust_u1_jax.benchmarks import aot
  from robust_u1_jax.inference import context as context_lib
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import images as images_lib
  from robust_u1_jax.inference import recovery as recovery_lib
  from robust_u1_jax.training import run_setup

  devices, description = aot.topology_devices(topology)
  mesh = sharding.make_mesh(dict(mesh_axes or _recovery_mesh({})), devices)
  mc = model_config or bagel_lib.BagelConfig.bagel_7b(dtype=jnp.bfloat16,
                                                      param_dtype=jnp.bfloat16)
  sampler = recovery_lib.Sampler(num_steps=steps)
  moves = steps - 1
  markers, ids = _tokenizer_ids()
  vit_hw = images_lib.ImageRules().vit_size(height, width)
  host = recovery_lib.recovery_inputs(
      [{"corrupted": np.zeros((height, width, 3), np.uint8),
        "corrupted_vit": np.zeros(vit_hw + (3,), np.uint8)}], mc, markers, ids)
  replicated = NamedSharding(mesh, P())
  inputs = _abstract(host, lambda shape: replicated)
  keys = jax.ShapeDtypeStruct((1, 2), jnp.uint32, sharding=replicated)
  say(f"recovery AOT: {height} x {width} image (ViT {vit_hw[0]} x {vit_hw[1]}), {steps} steps, "
      f"for {topology}: {description}, {len(devices)} x {devices[0].device_kind}, mesh "
      f"{dict(mesh.shape)}", flush=True)

  out: dict[str, Any] = {"topology": topology, "description": description,
                         "device_kind": devices[0].device_kind, "num_devices": len(devices),
                         "mesh": dict(mesh.shape), "size": (height, width), "vit_size": vit_hw,
                         "steps": steps, "moves": moves}
  with aot.fast_tracer_errors(), aot.persistent_cache(topology.startswith("cpu:")):
    t0 = time.perf_counter()
    model = run_setup.abstract_model(mc, mesh)
    graphdef, weights = nnx.split(model)
    out["params"] = sum(math.prod(x.shape) for x in jax.tree.leaves(weights))
    out["weight_bytes_per_device"] = aot._shard_bytes(weights)
    out["build_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      lowered = engine_lib._recover.lower(graphdef, weights, inputs, keys, sampler=sampler,
                                          posterior="sample")
    out["lower_s"] = time.perf_counter() - t0
    say(f"  abstract model in {out['build_s']:.1f} s, recovery lowered in {out['lower_s']:.1f} s;"
        " compiling ...", flush=True)
    t0 = time.perf_counter()
    try:
      compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that exceed HBM
      out["oom"] = aot.parse_oom(str(e))
      if out["oom"] is None:
        raise
      compiled = None
    out["compile_s"] = time.perf_counter() - t0
    say(f"  recovery compiled in {out['compile_s']:.1f} s", flush=True)
    if compiled is not None:
      out["memory"] = _memory(compiled)
      out["recovery_cost"] = aot._cost(compiled)
    out["recovery_program_flops"] = aot._program_cost(lowered).get("flops")

    # The loop's body alone: one guided velocity of the three stacked contexts.
    caches = jax.eval_shape(functools.partial(_contexts, graphdef), weights, inputs)[:3]
    # KV heads split like the attention's heads (tensor), as the recovery's own caches are.
    kv_spec = sharding.logical_to_spec((None, "batch", "length", "act_heads", None),
                                       sharding.RULES["llm"], mesh)

    def cache_sharding(shape):
      if len(shape) != 5:  # valid, length, next_position: small
        return replicated
      return NamedSharding(mesh, sharding._fits(shape, kv_spec, mesh))

    caches = [_abstract(c, cache_sharding) for c in caches]
    n = host.noisy.latent_seq_index.shape[1]
    x = jax.ShapeDtypeStruct((1, n, mc.latent_channels), jnp.float32, sharding=replicated)
    t = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=replicated)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      step_lowered = _batched_cfg.lower(graphdef, weights, *caches, inputs.noisy,
                                        sampler.guidance, x, t)
    step = step_lowered.compile()
    out["step_compile_s"] = time.perf_counter() - t0
    out["step_cost"] = aot._cost(step)
    out["step_program_flops"] = aot._program_cost(step_lowered).get("flops")
    say(f"  denoising step compiled in {out['step_compile_s']:.1f} s", flush=True)
    if separate_step:
      # c. on the chips: the same step as three calls, each against its own (unpadded) cache.
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        separate = _separate_cfg.lower(graphdef, weights, *caches, inputs.noisy,
                                       sampler.guidance, x, t).compile()
      out["separate_step_cost"] = aot._cost(separate)
      say(f"  the step as three calls compiled in {time.perf_counter() - t0:.1f} s", flush=True)

    # The VAE is counted by XLA (its convolutions' shapes are many): encode + decode.
    def vae(weights, image):
      model = nnx.merge(graphdef, weights)
      tokens = context_lib.encode_images(model, image)
      return context_lib.decode_latents(model, tokens, height, width)

    with jax.set_mesh(mesh):
      vae_lowered = jax.jit(vae).lower(weights, inputs.corrupted)
    out["vae_flops"] = aot._program_cost(vae_lowered).get("flops") or 0.0

  flops = recovery_flops(mc, jax.tree.map(np.asarray, host), moves)
  out["flops"] = {**flops, "floor": flops["floor"] + out["vae_flops"],
                  "library": flops["library"] + out["vae_flops"]}
  rec, stp = out.get("recovery_cost") or {}, out["step_cost"] or {}
  if rec.get("flops") and stp.get("flops"):
    out["compiled_flops_per_device"] = rec["flops"] + (moves - 1) * stp["flops"]
  if rec.get("optimal_seconds") and stp.get("optimal_seconds"):
    out["estimated_s"] = rec["optimal_seconds"] + (moves - 1) * stp["optimal_seconds"]
  peak = aot.CHIPS.get(out["device_kind"], (None, None))[1]
  if peak:
    out["peak_flops_per_chip"] = peak
    out["floor_s"] = out["flops"]["floor"] / (peak * len(devices))
    if out.get("estimated_s"):
      out["estimated_over_floor"] = out["estimated_s"] / out["floor_s"]
  return out


def report_7b(r: Mapping[str, Any]) -> str:
  from robust_u1_jax.benchmarks import aot

  b = lambda n: aot._bytes(n).strip()
  f = r["flops"]
  h, w = r["size"]
  lines = [
      f"e. BAGEL-7B recovery, {h} x {w} image (ViT {r['vit_size'][0]} x {r['vit_size'][1]}), "
      f"bfloat16, {r['steps']} steps ({r['moves']} guided calls), 3-context CFG",
      f"  target {r['topology']} = {r['description']}, {r['num_devices']} x {r['device_kind']}, "
      f"mesh {r['mesh']}; {r['params'] / 1e9:.2f} B parameters",
      f"  rows: contexts {f['tokens'][0]} / {f['tokens'][1]} / {f['tokens'][2]} tokens (full, "
      f"no text, no image), noisy block {f['block']} tokens ({f['n_latent']} latent), "
      f"{f['n_vit']} ViT patches",
      f"  build {r['build_s']:.1f} s, lower {r['lower_s']:.1f} s, compile {r['compile_s']:.1f} s;"
      f" step program compile {r['step_compile_s']:.1f} s",
  ]
  m = r.get("memory")
  if m:
    lines.append(f"  memory per chip: {b(m['total'])} (weights {b(r['weight_bytes_per_device'])}"
                 f", arguments {b(m['argument_size_in_bytes'])}, temporaries "
                 f"{b(m['temp_size_in_bytes'])}, outputs {b(m['output_size_in_bytes'])}, code "
                 f"{b(m['generated_code_size_in_bytes'])})")
  if r.get("oom"):
    lines.append(f"  the compiler refused the recovery: {r['oom']['what']} "
                 f"{b(r['oom']['used'])} of {b(r['oom']['capacity'])}")
  rows = [
      ("denoising, linear (each token, its expert)", f["denoise_linear"] / 1e15),
      ("denoising, attention (visible keys)", f["denoise_attention"] / 1e15),
      ("velocity in/out heads", f["heads"] / 1e15),
      ("prefill of the 3 contexts, linear", f["prefill_linear"] / 1e15),
      ("prefill, attention", f["prefill_attention"] / 1e15),
      ("ViT (once)", f["vit"] / 1e15),
      ("VAE encode + decode (XLA count)", r["vae_flops"] / 1e15),
      ("floor total (analytic)", f["floor"] / 1e15),
      ("issue's estimate", ISSUE_FLOOR_FLOPS / 1e15),
      ("this implementation (analytic: both experts, padded slots, ViT x2)",
       f["library"] / 1e15),
  ]
  if r.get("compiled_flops_per_device"):
    rows.append(("compiled, XLA's count x devices (recovery + (moves-1) x step)",
                 r["compiled_flops_per_device"] * r["num_devices"] / 1e15))
  lines.append(table(("FLOPs of one recovery", "PFLOP"), rows))
  if r.get("floor_s"):
    line = (f"  floor at peak ({r['num_devices']} x {r['peak_flops_per_chip'] / 1e12:.0f} "
            f"TFLOP/s): {r['floor_s']:.2f} s")
    if r.get("estimated_s"):
      rs, ss = r["recovery_cost"]["optimal_seconds"], r["step_cost"]["optimal_seconds"]
      line += (f"; compiler's estimate {r['estimated_s']:.2f} s -> "
               f"{r['estimated_over_floor']:.2f}x the floor (goal <= {FLOOR_GOAL})\n"
               f"  (the estimate: recovery program {rs:.2f} s, its loop body counted once, + "
               f"{r['moves'] - 1} x the step program {ss:.3f} s)")
    lines.append(line)
    step, per_chip = r["step_cost"], r["peak_flops_per_chip"]
    if step.get("optimal_seconds"):
      hbm = HBM_BYTES_PER_S.get(r["device_kind"])
      parts = f"its FLOPs at peak {step['flops'] / per_chip:.3f} s"
      if hbm and step.get("bytes accessed"):
        parts += (f" + its {step['bytes accessed'] / 1e9:.0f} GB of HBM traffic at "
                  f"{hbm / 1e12:.2f} TB/s {step['bytes accessed'] / hbm:.3f} s")
      floor_step = r["flops"]["step_floor"] / (per_chip * r["num_devices"])
      lines.append(f"  one guided step: compiler's estimate {step['optimal_seconds']:.3f} s per "
                   f"chip ~ {parts}; floor {floor_step:.3f} s")
    separate = (r.get("separate_step_cost") or {}).get("optimal_seconds")
    if separate and step.get("optimal_seconds"):
      lines.append(f"  the step as three calls (part c): compiler's estimate {separate:.3f} s -> "
                   f"separate / batched = {separate / step['optimal_seconds']:.2f}x")
  else:
    lines.append("  no peak FLOP/s for this device kind: the floor in seconds needs a TPU "
                 "topology")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ run

def _topology_asked(topology: str | None) -> str | None:
  """bench.py passes --topology always (its default, cpu:8, is aot's): the 7B compile, many
  minutes, runs only when the flag is on the command line or run() is given one."""
  if not topology:
    return None
  try:
    from absl import flags
    f = flags.FLAGS
    if f.is_parsed() and "topology" in f and not f["topology"].present:
      return None
  except Exception:  # absl not parsed or not in use: a programmatic call
    pass
  return topology


def run(*, seconds: float = 3.0, config: str = "", threads: int | None = None,
        topology: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Prints parts a to d (and e with a topology); returns their numbers. `seconds` is the wall
  time of each alternated measurement. Overrides: height=, width=, steps= of the 7B recovery,
  mesh.{data,fsdp,tensor}= of its mesh."""
  from robust_u1_jax.benchmarks import aot

  del threads  # the data benchmark's flag
  topology = _topology_asked(topology)
  opts = aot.parse_overrides(overrides)
  unknown = sorted(k for k in opts if k not in RECOVERY_7B and not k.startswith("mesh."))
  if unknown:
    raise SystemExit(f"recover: unknown --override {unknown}; allowed: height, width, steps, "
                     "mesh.data, mesh.fsdp, mesh.tensor")
  if topology:
    # The host side of an AOT compile is CPU-only; decided before any backend starts.
    aot._ensure_host_backend(int(topology[4:]) if topology.startswith("cpu:") else 0)
  results: dict[str, Any] = {}
  setup = load_setup(config)
  llm = setup.config.llm
  size = setup.image_size(DEFAULT_SIZE)
  print(f"recover benchmark on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
        f"model {setup.name}: LLM width {llm.hidden_size}, {llm.num_layers} layers, "
        f"{llm.num_heads}/{llm.num_kv_heads} heads of {llm.head_dim}, MLP "
        f"{llm.intermediate_size}, MoT {llm.mot}, {np.dtype(llm.dtype).name}; batch 1; "
        f"{seconds:g} s per alternated measurement", flush=True)

  a = results["a"] = cached_vs_uncached(setup, size, seconds)
  print(table(("a. one denoising step", "image", "context", "noisy block", "keys / row",
               "ms"), [
      ("cached: denoise_velocity vs prefilled cache", f"{size[0]}x{size[1]}", a["context"],
       a["block"], a["context"] + a["block"], a["cached_s"] * 1e3),
      ("uncached: model(row) with the packed mask", f"{size[0]}x{size[1]}", a["context"],
       a["block"], a["row"], a["uncached_s"] * 1e3)]))
  print(f"   uncached / cached = {a['uncached_over_cached_spread']}", flush=True)

  b = results["b"] = context_scaling(setup, size, seconds)
  lo, hi = b["contexts"]
  print(table(("b. cached step vs context", "context", "noisy block", "attention share", "ms"),
              [(f"instruction padded to {k} tokens", k, b["block"], b["attention_share"][k],
                b["step_s"][k] * 1e3) for k in b["contexts"]]))
  print(f"   {hi} / {lo} = {b['ratio_spread']} (goal <= {SCALING_GOAL}); the FLOP model predicts "
        f"{b['flop_ratio']:.2f}x for these shapes, {b['flop_ratio_7b']:.2f}x for BAGEL-7B's "
        f"(width 3584, a {BLOCK_7B}-token block)", flush=True)

  c = results["c"] = cfg_batching(setup, size, seconds)
  print(table(("c. guided velocity, 3 CFG branches", "cache slots", "noisy block", "ms"), [
      ("batched: guided_velocity, one call", f"3 x {max(c['slots'])}", c["block"],
       c["batched_s"] * 1e3),
      ("separate: 3 x denoise_velocity + cfg_velocity", " / ".join(map(str, c["slots"])),
       c["block"], c["separate_s"] * 1e3)]))
  print(f"   separate / batched = {c['separate_over_batched_spread']}", flush=True)

  d = results["d"] = compile_times(setup)
  print(table(("d. jitted recovery, cold compile", "context", "noisy block", "steps", "lower s",
               "compile s"),
              [(f"{r['size'][0]}x{r['size'][1]}", r["context"], r["block"], r["steps"],
                r["lower_s"], r["compile_s"]) for r in d]), flush=True)

  if topology:
    try:
      e = compile_recovery_7b(
          topology, height=int(opts.get("height", RECOVERY_7B["height"])),
          width=int(opts.get("width", RECOVERY_7B["width"])),
          steps=int(opts.get("steps", RECOVERY_7B["steps"])), mesh_axes=_recovery_mesh(opts))
    except aot.AotError as err:
      raise SystemExit(f"recover: {err}") from None
    results["e"] = e
    print(report_7b(e), flush=True)
  return results
