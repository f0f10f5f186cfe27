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
     VAE encode, three prefills, the 50-step sampler, VAE decode), once per image size;
  f. a whole recovery (10 steps) as the commands' step bar runs it, one program call per move
     (`engine.sample_moves`), vs the one program.
With --topology (a TPU slice such as v5p-8 needs libtpu; cpu:N runs the same path on fake CPU
devices), also:
  e. BAGEL-7B's recovery of a 1024 x 656 image in bfloat16, 50 steps, three-context CFG, compiled
     ahead of time for the topology with abstract sharded weights (nothing allocated, as `bench
     aot`): memory per chip and the compiler's estimated seconds against the FLOP floor at the
     chips' peak (an analytic count from the shapes, printed with its parts: recovery_flops.py).
     XLA's cost analysis counts the sampler's loop body once, so one guided step is compiled
     alone too and counted 49 times. The compiles take 5 to 15 minutes on a 2-core host
     (recover_7b.py).
The timed and compiled computations are in recovery_calls.py.

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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax import config_lib
from robust_u1_jax.benchmarks import alternate, goal, recover_7b, table
from robust_u1_jax.benchmarks import recovery_calls as calls
from robust_u1_jax.benchmarks import recovery_flops as flops_lib
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
    markers, ids = calls.tokenizer_ids()
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


def load_setup(spec: str = "", *, model_config: bagel_lib.BagelConfig | None = None) -> Setup:
  """'' (the bench's model), a config file[:variant] (its model preset, random weights) or a
  model directory (`Engine.load`: released weights, tokenizer and image rules)."""
  if spec and os.path.isdir(spec):
    from robust_u1_jax.inference import engine as engine_lib
    from robust_u1_jax.inference import recovery as recovery_lib

    engine = engine_lib.Engine.load(spec)
    return Setup(spec, engine.graphdef, engine.weights, engine.config, engine.markers,
                 engine.encode_block(recovery_lib.INSTRUCTION), engine.rules.vit_size)
  if spec and not spec.partition(":")[0].endswith(".py") and not os.path.exists(spec):
    raise config_lib.ConfigError(f"{spec}: no such model directory or config file (give a model "
                                 "directory, or path.py[:variant], e.g. configs/sft.py:tiny)")
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


# ------------------------------------------------------------------------------------ timing

def _blocking(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _noise(setup: Setup, noisy: bagel_lib.SequenceInputs, batch: int = 1):
  n = noisy.latent_seq_index.shape[1]
  x = jax.random.normal(jax.random.PRNGKey(1), (batch, n, setup.config.latent_channels))
  return x, jnp.full((batch,), 0.5)


def cached_vs_uncached(setup: Setup, size: tuple[int, int], seconds: float, *,
                       min_reps: int = 5) -> dict[str, Any]:
  """a. One denoising step against the prefilled context vs the whole row recomputed."""
  inputs = _device(recovery_rows(setup, size))
  full, _, _, cond = calls.contexts(setup.graphdef, setup.state, inputs)
  rows = _device(training_rows(setup, size))
  noisy_tokens = np.asarray(rows.layout.noisy)[0, np.asarray(rows.latent_seq_index)[0]]
  n = inputs.noisy.latent_seq_index.shape[1]
  if not noisy_tokens[-n:].all() or noisy_tokens[:-n].any():
    raise AssertionError("the training row's last latent tokens are not its noisy block")
  x, t = _noise(setup, inputs.noisy)
  timed = alternate({
      "cached": _blocking(calls.cached_step, setup.graphdef, setup.state, full, inputs.noisy, x, t),
      "uncached": _blocking(calls.uncached_step, setup.graphdef, setup.state, rows, cond, x, t),
  }, seconds, min_reps=min_reps)
  ratio = timed.ratio("uncached", "cached")
  return {"size": size, "block": int(inputs.noisy.token_kind.shape[1]),
          "context": flops_lib.context_tokens(inputs.full), "row": int(rows.token_kind.shape[1]),
          "cached_s": timed.median("cached"), "uncached_s": timed.median("uncached"),
          "uncached_over_cached": ratio.median, "uncached_over_cached_spread": ratio}


def context_scaling(setup: Setup, size: tuple[int, int], seconds: float,
                    contexts: Sequence[int] = CONTEXTS, *, min_reps: int = 5) -> dict[str, Any]:
  """b. The cached step against full contexts of `contexts` tokens (instruction padded)."""
  steps, noisy = {}, None
  for length in contexts:
    inputs = _device(recovery_rows(setup, size, context=length))
    full = calls.contexts(setup.graphdef, setup.state, inputs)[0]
    if int(full.max_length) != length or int(np.asarray(full.valid).sum()) != length:
      raise AssertionError(f"the context holds {int(np.asarray(full.valid).sum())} tokens in "
                           f"{full.max_length} slots, not {length}")
    noisy = inputs.noisy
    x, t = _noise(setup, noisy)
    steps[length] = _blocking(calls.cached_step, setup.graphdef, setup.state, full, noisy, x, t)
  timed = alternate({str(k): fn for k, fn in steps.items()}, seconds, min_reps=min_reps)
  short, long = contexts[0], contexts[-1]
  block = int(noisy.token_kind.shape[1])
  model = {k: flops_lib.step_flops(setup.config.llm, block, k + block) for k in (short, long)}
  # The same contexts at BAGEL-7B's width, against a 1024 x 656 image's block (2,626 tokens).
  llm_7b = LLMConfig.bagel_7b()
  block_7b = recover_7b.BLOCK_7B
  model_7b = {k: flops_lib.step_flops(llm_7b, block_7b, k + block_7b) for k in (short, long)}
  return {"size": size, "block": block, "contexts": tuple(contexts),
          "step_s": {k: timed.median(str(k)) for k in contexts},
          "ratio": timed.ratio(str(long), str(short)).median,
          "ratio_spread": timed.ratio(str(long), str(short)),
          "flop_ratio": model[long] / model[short],
          "flop_ratio_7b": model_7b[long] / model_7b[short],
          "attention_share": {k: flops_lib.attention_share(setup.config.llm, block, k + block)
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
  full, no_text, no_image, _ = calls.contexts(setup.graphdef, setup.state, inputs)
  x, t = _noise(setup, inputs.noisy)
  args = (setup.graphdef, setup.state, full, no_text, no_image, inputs.noisy, guidance, x, t)
  batched, separate = calls.batched_cfg(*args), calls.separate_cfg(*args)
  # The two must be one computation: a ratio of different work would mean nothing.
  np.testing.assert_allclose(np.asarray(batched), np.asarray(separate), rtol=2e-3, atol=2e-4)
  timed = alternate({"batched": _blocking(calls.batched_cfg, *args),
                     "separate": _blocking(calls.separate_cfg, *args)}, seconds, min_reps=min_reps)
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
      out.append({"size": size, "context": flops_lib.context_tokens(inputs.full),
                  "block": int(inputs.noisy.token_kind.shape[1]), "steps": sampler.num_steps,
                  "lower_s": lower_s, "compile_s": time.perf_counter() - t0})
  return out


def step_bar_cost(setup: Setup, size: tuple[int, int], seconds: float, *, steps: int = 10,
                  min_reps: int = 5) -> dict[str, Any]:
  """f. A recovery as the commands' step bar runs it (`engine._recovery_start`, one
  `_sample_move` call per move, each waited for, `_decode`) vs the one program `engine._recover`:
  the bar's cost is a dispatch and a wait per move."""
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import recovery as recovery_lib

  sampler = recovery_lib.Sampler(num_steps=steps)
  inputs = _device(recovery_rows(setup, size))
  keys = jax.random.split(jax.random.PRNGKey(0), 1)
  call = lambda fn, *args, **static: fn(setup.graphdef, setup.state, *args, **static)
  plain = _blocking(functools.partial(engine_lib._recover, sampler=sampler, posterior="sample"),
                    setup.graphdef, setup.state, inputs, keys)

  def moves():
    contexts, x, key = call(engine_lib._recovery_start, inputs, keys, sampler=sampler,
                            posterior="sample")
    x = engine_lib.sample_moves(call, contexts, x, key, sampler)
    return jax.block_until_ready(call(engine_lib._decode, x, size_hw=size, quantize=True))

  # One computation on both sides: the bar must change nothing the recovery computes.
  np.testing.assert_array_equal(np.asarray(plain()[1]), np.asarray(moves()))
  timed = alternate({"moves": moves, "plain": plain}, seconds, min_reps=min_reps)
  ratio = timed.ratio("moves", "plain")
  return {"size": size, "steps": steps, "plain_s": timed.median("plain"),
          "moves_s": timed.median("moves"), "moves_over_plain": ratio.median,
          "moves_over_plain_spread": ratio}


# ------------------------------------------------------------------------------------ run

def run(*, seconds: float = 3.0, config: str = "", topology: str | None = None,
        overrides: Sequence[str] = ()) -> dict[str, Any]:
  """Prints parts a to d and f (and e with a topology: the 7B compile, many minutes); returns their
  numbers. `seconds` is the wall time of each alternated measurement. Overrides: height=, width=,
  steps= of the 7B recovery, mesh.{data,fsdp,tensor}= of its mesh."""
  from robust_u1_jax.benchmarks import aot

  opts = aot.parse_overrides(overrides)
  unknown = sorted(k for k in opts if k not in recover_7b.RECOVERY_7B and not k.startswith("mesh."))
  if unknown:
    raise SystemExit(f"recover: unknown --override {unknown}; allowed: height, width, steps, "
                     "mesh.data, mesh.fsdp, mesh.tensor")
  if opts and not topology:  # they shape part e only
    raise SystemExit(f"recover: --override {', '.join(sorted(opts))} sets the 7B compile of "
                     "part e, which runs with --topology only; give --topology too")
  if topology:
    # The host side of an AOT compile is CPU-only; decided before any backend starts.
    count = topology[4:] if topology.startswith("cpu:") else "0"
    if not count.isdigit():
      raise SystemExit(f"recover: --topology {topology!r}: use cpu:N with N an integer")
    aot._ensure_host_backend(int(count))
    try:  # libtpu and the slice are checked before parts a to d, minutes of CPU work
      aot.topology_devices(topology)
    except aot.AotError as err:
      raise SystemExit(f"recover: {err}") from None
  results: dict[str, Any] = {}
  setup = load_setup(config)
  llm = setup.config.llm
  size = setup.image_size(DEFAULT_SIZE)
  print(f"recover benchmark on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)); "
        f"model {setup.name}: LLM width {llm.hidden_size}, {llm.num_layers} layers, "
        f"{llm.num_heads}/{llm.num_kv_heads} heads of {llm.head_dim}, MLP "
        f"{llm.intermediate_size}, MoT {llm.mot}, {np.dtype(llm.dtype).name}; batch 1; "
        f"{seconds:g} s per alternated measurement", flush=True)

  say = lambda part: print(f"[{time.strftime('%H:%M:%S')}] {part} ...", flush=True)
  say("a. compiling and timing one denoising step, cached and uncached")
  a = results["a"] = cached_vs_uncached(setup, size, seconds)
  print(table(("a. one denoising step", "image", "context", "noisy block", "keys / row",
               "ms"), [
      ("cached: denoise_velocity vs prefilled cache", f"{size[0]}x{size[1]}", a["context"],
       a["block"], a["context"] + a["block"], a["cached_s"] * 1e3),
      ("uncached: model(row) with the packed mask", f"{size[0]}x{size[1]}", a["context"],
       a["block"], a["row"], a["uncached_s"] * 1e3)]))
  print(f"   uncached / cached = {a['uncached_over_cached_spread']}", flush=True)

  say("b. compiling and timing the cached step at two context lengths")
  b = results["b"] = context_scaling(setup, size, seconds)
  lo, hi = b["contexts"]
  print(table(("b. cached step vs context", "context", "noisy block", "attention share", "ms"),
              [(f"instruction padded to {k} tokens", k, b["block"], b["attention_share"][k],
                b["step_s"][k] * 1e3) for k in b["contexts"]]))
  print(f"   {hi} / {lo} = {b['ratio_spread']} "
        f"{goal(b['ratio_spread'].median, SCALING_GOAL, at_most=True)}; the FLOP model predicts "
        f"{b['flop_ratio']:.2f}x for these shapes, {b['flop_ratio_7b']:.2f}x for BAGEL-7B's "
        f"(width 3584, a {recover_7b.BLOCK_7B}-token block)", flush=True)

  say("c. compiling and timing the guided velocity, batched and separate")
  c = results["c"] = cfg_batching(setup, size, seconds)
  print(table(("c. guided velocity, 3 CFG branches", "cache slots", "noisy block", "ms"), [
      ("batched: guided_velocity, one call", f"3 x {max(c['slots'])}", c["block"],
       c["batched_s"] * 1e3),
      ("separate: 3 x denoise_velocity + cfg_velocity", " / ".join(map(str, c["slots"])),
       c["block"], c["separate_s"] * 1e3)]))
  print(f"   separate / batched = {c['separate_over_batched_spread']}", flush=True)

  say("d. compiling the jitted recovery cold, at each size")
  d = results["d"] = compile_times(setup)
  print(table(("d. jitted recovery, cold compile", "context", "noisy block", "steps", "lower s",
               "compile s"),
              [(f"{r['size'][0]}x{r['size'][1]}", r["context"], r["block"], r["steps"],
                r["lower_s"], r["compile_s"]) for r in d]), flush=True)

  say("f. compiling and timing a whole recovery, a call per move (the step bar's) and one program")
  f = results["f"] = step_bar_cost(setup, size, seconds)
  print(table(("f. whole recovery", "image", "steps", "ms"), [
      ("one program call per move", f"{size[0]}x{size[1]}", f["steps"], f["moves_s"] * 1e3),
      ("one program", f"{size[0]}x{size[1]}", f["steps"], f["plain_s"] * 1e3)]))
  print(f"   per move / one program = {f['moves_over_plain_spread']}", flush=True)

  if topology:
    say(f"e. compiling BAGEL-7B's recovery ahead of time for {topology} (many minutes)")
    try:
      shape = {k: int(opts.get(k, v)) for k, v in recover_7b.RECOVERY_7B.items()}
      e = recover_7b.compile_recovery_7b(topology, **shape,
                                         mesh_axes=recover_7b.recovery_mesh(opts))
    except aot.AotError as err:
      raise SystemExit(f"recover: {err}") from None
    results["e"] = e
    print(recover_7b.report_7b(e), flush=True)
  else:
    print("e. BAGEL-7B's recovery compiled ahead of time: not run (give --topology: v5p-8, or "
          "cpu:8 without libtpu)", flush=True)
  return results
