r"""`python -m robust_u1_jax.bench train_step`: the SFT step and a recovery, timed on one device.

  python -m robust_u1_jax.bench train_step --config configs/sft.py:gpu_1p5b    # one H200
  python -m robust_u1_jax.bench train_step --config configs/sft.py:tiny        # CPU, minutes
  python -m robust_u1_jax.bench train_step --config configs/sft.py:gpu_1p5b \
      --override remat=none --override data.batch_size=1 --override steps=20

On the default device (the first of `jax.devices()`, a mesh of one), with random weights, after
a check on a CPU that the train state fits the host's memory (`trainer.check_state_fits_host`):
  1. the trainer's own path: `run_setup.make_context`, the stage's `StageSpec`,
     `trainer.initial_state` (split, optimizer state, EMA, the jitted step with its state donated)
     and `batches` batches of the config's pipeline through the stage's `host_inputs`, placed by
     `multihost.global_batch`, fed to the steps in turn (packed rows fill unevenly: the first
     batch of the 1.5B config holds 56 % tokens, the next ones about 80 %).
  2. Warm-up: a step on each batch (the compile, and any other text bucket's), at least
     WARMUP_STEPS; then steps timed one by one (each blocks on the new state and metrics) for at
     least `--seconds` and `steps` steps: the median step time with its quartiles and range,
     tokens/s (real tokens, not padding), the mean model FLOPs of a step (`flops.step_flops` of
     the stage's `work`, as the trainer logs `model_tflops_per_step`) and model-FLOPs MFU, the
     timed steps' FLOPs over their time against the device's dense bf16 peak
     (`metrics_log.PEAK_FLOPS`; n/a where the table has none, as on CPU), and the device's peak
     memory (`memory_stats`, where it reports).
  3. a recovery of one `recovery_side` x `recovery_side` image (the config's resize rules give
     its ViT size) with the trained state's weights, as `Engine.recover` runs it
     (`engine._recover`: VAE encode, three prefills, the `recovery_steps`-step sampler with
     BAGEL's three-context guidance, VAE decode): the first call (compile + run), then the median
     of at least `recoveries` calls.

`--override key=value` (repeatable) sets the bench options below (OPTIONS) or any config field.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from robust_u1_jax.benchmarks import Ratio, aot
from robust_u1_jax.benchmarks.aot_report import CACHED_COMPILE

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "sft.py") + ":tiny"
WARMUP_STEPS = 2  # the compile, then one run with every buffer in place
# Bench options (--override), the rest of the overrides being config fields.
OPTIONS = {"steps": 10, "batches": 4, "recovery_steps": 50, "recovery_side": 512,
           "recoveries": 3}
FLOP_KEYS = ("total", "forward", "backward", "llm", "attention", "vit", "vae", "heads", "tokens",
             "pairs")


def split_overrides(items: Sequence[str]) -> tuple[dict[str, int], dict[str, Any]]:
  """--override items -> (bench OPTIONS with their defaults, config field overrides)."""
  from robust_u1_jax.benchmarks import aot

  given = aot.parse_overrides(items)
  try:
    options = {k: int(given.pop(k, v)) for k, v in OPTIONS.items()}
  except (TypeError, ValueError) as e:
    raise SystemExit(f"train_step: --override {', '.join(OPTIONS)} take integers ({e})") from None
  if min(options["steps"], options["batches"], options["recoveries"]) < 1 or (
      options["recovery_steps"] < 2):
    raise SystemExit(f"train_step: steps, batches and recoveries must be >= 1, recovery_steps "
                     f">= 2; got {options}")
  return options, given


def _count(n: float) -> str:
  """414,000 -> '414 k', 7.1e9 -> '7.1 B': the tiny configs and the 7B one on one line."""
  for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
    if n >= scale:
      return f"{n / scale:.3g} {unit}"
  return f"{n:.0f}"


def run(*, seconds: float = 3.0, config: str = "", overrides: Sequence[str] = ()
        ) -> dict[str, Any]:
  """Prints the step's and the recovery's figures (module docstring); returns them."""
  from robust_u1_jax import config_lib

  options, fields = split_overrides(overrides)
  spec = config or DEFAULT_CONFIG
  cfg = config_lib.load_file(spec)
  stage = cfg.get("stage")
  if stage != "sft":  # before validating: another stage's config may lack what it needs to run
    raise SystemExit(f"train_step: times the SFT step; {spec} is stage {stage!r}")
  try:
    config_lib.override(cfg, fields, spec)
  except config_lib.UnknownFieldError as e:  # this benchmark's option or the config's field
    raise config_lib.ConfigError(f"{e}; or one of train_step's own --override options: "
                                 f"{', '.join(OPTIONS)}") from None
  cfg = config_lib.validate(cfg)
  device = jax.devices()[0]
  _check_state_fits_host(cfg, device, spec)
  print(f"train_step: building the model, its train state and {options['batches']} pipeline "
        f"batches on {device.device_kind}, then compiling the step ...", flush=True)
  out: dict[str, Any] = {"config": spec, "device_kind": device.device_kind,
                         "platform": device.platform}
  out.update(time_train_step(cfg, device, seconds, options["steps"], options["batches"]))
  print(report_step(out), flush=True)
  out["recovery"] = time_recovery(out.pop("_trained"), cfg, seconds, options)
  print(report_recovery(out["recovery"]), flush=True)
  out["peak_bytes"] = peak_bytes(device)
  print(f"peak device memory, steps and recoveries: {_gib(out['peak_bytes'])}", flush=True)
  return out


# ------------------------------------------------------------------------------------ the step

def _check_state_fits_host(config, device, name: str) -> None:
  """The trainer's check, on the SFT stage's trainable parameters, before the stage is built."""
  from robust_u1_jax.training import run_setup, sft, trainer

  ctx = run_setup.make_context(config, devices=[device], abstract=True)
  trainer.check_state_fits_host(config, ctx, sft.GENERATION_PARAMS, f"train_step: {name}")


def time_train_step(config, device, seconds: float, min_steps: int, batches: int
                    ) -> dict[str, Any]:
  """Builds the stage as the trainer does on a mesh of `device` and times its step on `batches`
  pipeline batches in turn."""
  from robust_u1_jax import flops
  from robust_u1_jax.data import multihost
  from robust_u1_jax.data import pipeline as pipeline_lib
  from robust_u1_jax.training import metrics_log, run_setup, stages, trainer

  config = config.copy_and_resolve_references()
  # A few batches are read: no worker processes to start.
  config.data.worker_count = config.eval_data.worker_count = 0
  t0 = time.perf_counter()
  ctx = run_setup.make_context(config, devices=[device])
  spec = stages.builder(config.stage)(ctx)
  graphdef, state, step_fn = trainer.initial_state(config, ctx, spec)
  build_s = time.perf_counter() - t0
  with pipeline_lib.make_pipeline(config.data, seed=config.seed, tokenizer=ctx.tokenizer,
                                  stage=spec.data_stage or config.stage,
                                  instruction=config.get("instruction"),
                                  format_rows=trainer.inputs_and_work(ctx, spec)) as data:
    # Each batch with its model FLOPs, counted as the trainer counts them.
    hosts, counts = zip(*(next(data) for _ in range(batches)))
  counts = [work for _, work in counts]  # (packed samples, FLOPs) -> FLOPs
  # A stage without a FLOP model (the demo's pretrain) counts None: no FLOPs, tokens or MFU.
  counted = all(c is not None for c in counts)
  mean = ({k: float(np.mean([c[k] for c in counts])) for k in FLOP_KEYS} if counted else
          dict.fromkeys(FLOP_KEYS, math.nan))
  count = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  out = {"params": count(state.params) + count(state.frozen), "trainable": count(state.params),
         "llm": ctx.model_config.llm, "rows": int(config.data.batch_size),
         "token_budget": int(config.data.token_budget), "batches": batches,
         "slots": int(np.asarray(hosts[0][0].token_kind).size), "tokens": mean["tokens"],
         "model_flops": mean, "build_s": build_s, "dtype": config.compute_dtype,
         "remat": config.remat, "attention": config.attention}
  with jax.set_mesh(ctx.mesh):
    inputs = [multihost.global_batch(host, ctx.mesh) for host in hosts]
    t0 = time.perf_counter()
    # Every batch once (rows of another text bucket would compile again), at least WARMUP_STEPS.
    out["warmup_steps"] = max(WARMUP_STEPS, batches)
    with aot.counted_cache_hits() as hits:
      for k in range(out["warmup_steps"]):
        state, metrics = jax.block_until_ready(step_fn(state, inputs[k % batches]))
    out["warmup_s"], out["warmup_cached"] = time.perf_counter() - t0, bool(hits)
    losses, times, work, tokens = [float(metrics["loss"])], [], 0.0, 0.0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    while len(times) < min_steps or time.perf_counter() - start < seconds:
      k = len(times) % batches
      t0 = time.perf_counter()
      state, metrics = jax.block_until_ready(step_fn(state, inputs[k]))
      times.append(time.perf_counter() - t0)
      work += counts[k]["total"] if counted else 0.0
      tokens += counts[k]["tokens"] if counted else math.nan
    # What the host's kernel did for the timed steps (page faults: benchmarks/malloc.py).
    after = resource.getrusage(resource.RUSAGE_SELF)
    losses.append(float(metrics["loss"]))
  out["step_peak_bytes"] = peak_bytes(device)
  step_s = statistics.median(times)
  out.update(step_s=step_s, step_spread=Ratio.of(times), losses=tuple(losses),
             tokens_per_s=tokens / sum(times))  # the timed steps' own batches
  out["peak_flops"] = metrics_log.peak_flops(device)
  # The timed steps' model FLOPs over their time, as the trainer's `mfu` over a logging window.
  out["mfu"] = (flops.mfu(work, sum(times), out["peak_flops"])
                if out["peak_flops"] and counted else None)
  out["timed_minor_faults"] = after.ru_minflt - usage.ru_minflt
  out["timed_system_s"] = after.ru_stime - usage.ru_stime
  out["_trained"] = (ctx, trainer.plain_model_state(graphdef, state))
  return out


def report_step(r: dict[str, Any]) -> str:
  llm, f, s = r["llm"], r["model_flops"], r["step_spread"]
  packing = (f"{r['rows']} packed rows of {r['token_budget']:,} tokens" if r["token_budget"]
             else f"{r['rows']} unpacked rows")
  mfu = (f"{r['mfu']:.1%} of {r['peak_flops'] / 1e12:.0f} TFLOP/s (dense bf16 peak)"
         if r["mfu"] is not None else f"n/a (no peak FLOP/s for {r['device_kind']})")
  return "\n".join([
      f"train_step on {r['device_kind']} ({r['platform']}), config {r['config']}",
      f"  model: {_count(r['params'])} parameters ({_count(r['trainable'])} trainable); "
      f"LLM width {llm.hidden_size}, {llm.num_layers} layers, {llm.num_heads}/"
      f"{llm.num_kv_heads} heads of {llm.head_dim}, MLP {llm.intermediate_size}, MoT {llm.mot}",
      f"  compute {r['dtype']}, remat {r['remat']}, attention {r['attention']}; {packing}: "
      f"{r['tokens']:,.0f} tokens in {r['slots']:,} slots (mean of {r['batches']} pipeline "
      "batches, fed in turn)",
      f"  build {r['build_s']:.1f} s, {r['warmup_steps']} warm-up steps with the compile "
      f"{r['warmup_s']:.1f} s{CACHED_COMPILE if r['warmup_cached'] else ''}; "
      f"loss {r['losses'][0]:.4g} -> {r['losses'][1]:.4g}",
      f"  step time: {s.median * 1e3:.4g} ms median (quartiles {s.low * 1e3:.4g}-"
      f"{s.high * 1e3:.4g}, range {s.minimum * 1e3:.4g}-{s.maximum * 1e3:.4g}, {s.rounds} steps)",
      f"  tokens/s: {r['tokens_per_s']:,.0f} (the timed steps' tokens over their whole time)",
      f"  model FLOPs per step (mean): {f['total'] / 1e12:.4g} TFLOP ({flops_parts(f)})",
      f"  model-FLOPs MFU: {mfu}",
      f"  peak device memory after the steps: {_gib(r['step_peak_bytes'])}",
  ])


def flops_parts(f: dict[str, Any]) -> str:
  """The parts of `flops.step_flops` in TFLOP."""
  return ", ".join(f"{k} {f[k] / 1e12:.3g}" for k in ("llm", "attention", "vit", "vae", "heads"))


# ------------------------------------------------------------------------------------ recovery

def time_recovery(trained, config, seconds: float, options: dict[str, int]) -> dict[str, Any]:
  """A recovery of one square image with the trained weights, as `Engine.recover` runs it."""
  from flax import nnx

  from robust_u1_jax.benchmarks import recover
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import images as images_lib
  from robust_u1_jax.inference import recovery as recovery_lib
  from robust_u1_jax.training import state as state_lib

  ctx, (graphdef, state) = trained
  model = state_lib.merge_model(graphdef, state.params, state.frozen)
  rules = images_lib.ImageRules.from_data_config(config.data)
  setup = recover.Setup(config.model, *nnx.split(model), ctx.model_config, ctx.markers,
                        tokenizer_lib.encode_text_block(ctx.tokenizer, recovery_lib.INSTRUCTION),
                        rules.vit_size)
  side = options["recovery_side"]
  size = setup.image_size((side, side))
  inputs = jax.tree.map(jax.numpy.asarray, recover.recovery_rows(setup, size))
  sampler = recovery_lib.Sampler(num_steps=options["recovery_steps"])
  keys = jax.random.split(jax.random.PRNGKey(0), 1)  # (1, 2): one key per image

  def recover_once():
    return jax.block_until_ready(engine_lib._recover(  # pylint: disable=protected-access
        setup.graphdef, setup.state, inputs, keys, sampler=sampler, posterior="sample"))

  with jax.set_mesh(ctx.mesh):
    t0 = time.perf_counter()
    with aot.counted_cache_hits() as hits:
      recover_once()
    first_s = time.perf_counter() - t0
    times = []
    start = time.perf_counter()
    while len(times) < options["recoveries"] or time.perf_counter() - start < seconds:
      t0 = time.perf_counter()
      recover_once()
      times.append(time.perf_counter() - t0)
  return {"size": size, "vit_size": rules.vit_size(*size), "steps": sampler.num_steps,
          "context": int((np.asarray(inputs.full.token_kind) >= 0).sum()),
          "block": int(inputs.noisy.token_kind.shape[1]), "first_s": first_s,
          "first_cached": bool(hits),
          "median_s": statistics.median(times), "spread": Ratio.of(times)}


def report_recovery(r: dict[str, Any]) -> str:
  s = r["spread"]
  return "\n".join([
      f"recovery of one {r['size'][0]} x {r['size'][1]} image (ViT {r['vit_size'][0]} x "
      f"{r['vit_size'][1]}), {r['steps']} steps, three-context guidance: context "
      f"{r['context']} tokens, noisy block {r['block']}",
      f"  first call (compile + run) {r['first_s']:.2f} s"
      f"{CACHED_COMPILE if r['first_cached'] else ''}; then {s.median:.3g} s median "
      f"(quartiles {s.low:.3g}-{s.high:.3g}, range {s.minimum:.3g}-{s.maximum:.3g}, "
      f"{s.rounds} recoveries)",
  ])


def peak_bytes(device) -> int | None:
  """The device's peak memory in use so far, where it reports one (GPU, TPU; not CPU)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory statistics
    return None
  return stats.get("peak_bytes_in_use")


def _gib(n: int | None) -> str:
  return "n/a (the device reports none)" if n is None else f"{n / 1024 ** 3:.1f} GiB"
