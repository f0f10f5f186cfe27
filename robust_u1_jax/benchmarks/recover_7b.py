"""`bench recover --topology ...`, part e: BAGEL-7B's recovery of a 1024 x 656 image in bfloat16
(50 steps, three-context CFG) compiled ahead of time for a TPU topology with abstract sharded
weights, nothing allocated, as `bench aot` compiles a train step: memory per chip, and the
compiler's estimated seconds against the FLOP floor at the chips' peak (recovery_flops.py)."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.benchmarks import compiled as compiled_lib
from robust_u1_jax.benchmarks import recovery_calls as calls
from robust_u1_jax.benchmarks import goal, recovery_flops, table
from robust_u1_jax.models import bagel as bagel_lib

# The issue's recovery (BAGEL's editing defaults) and its analytic estimate.
RECOVERY_7B = dict(height=1024, width=656, steps=50)
ISSUE_FLOOR_FLOPS = 5.9e15
BLOCK_7B = 64 * 41 + 2  # its noisy block: a 64 x 41 latent grid and the two markers
FLOOR_GOAL = 1.5
# HBM bandwidth per chip (Cloud TPU documentation), by device_kind: to split the compiler's
# step-time estimate into its FLOP and memory-traffic parts.
HBM_BYTES_PER_S = {"TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5": 2.765e12,
                   "TPU v5p": 2.765e12, "TPU v6 lite": 1.64e12}


def recovery_mesh(overrides: Mapping[str, Any]) -> dict[str, int]:
  """Tensor parallel over every chip by default: one image's recovery has a batch of 3 (the CFG
  branches), which cannot split over 4+ chips, while BAGEL-7B's 28 query / 4 KV heads and 18,944
  MLP columns split over 4."""
  axes = {"data": 1, "fsdp": 1, "tensor": -1}
  for key, value in overrides.items():
    if key.startswith("mesh."):
      axes[key[5:]] = int(value)
  return axes


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
  from robust_u1_jax.benchmarks import aot_report
  from robust_u1_jax.inference import context as context_lib
  from robust_u1_jax.inference import engine as engine_lib
  from robust_u1_jax.inference import images as images_lib
  from robust_u1_jax.inference import recovery as recovery_lib
  from robust_u1_jax.training import run_setup

  devices, description = aot.topology_devices(topology)
  mesh = sharding.make_mesh(dict(mesh_axes or recovery_mesh({})), devices)
  mc = model_config or bagel_lib.BagelConfig.bagel_7b(dtype=jnp.bfloat16,
                                                      param_dtype=jnp.bfloat16)
  sampler = recovery_lib.Sampler(num_steps=steps)
  moves = steps - 1
  markers, ids = calls.tokenizer_ids()
  vit_hw = images_lib.ImageRules().vit_size(height, width)
  host = recovery_lib.recovery_inputs(
      [{"corrupted": np.zeros((height, width, 3), np.uint8),
        "corrupted_vit": np.zeros(vit_hw + (3,), np.uint8)}], mc, markers, ids)
  replicated = NamedSharding(mesh, P())
  inputs = compiled_lib.abstract(host, lambda shape: replicated)
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
    out["weight_bytes_per_device"] = compiled_lib.shard_bytes(weights)
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
      out["oom"] = compiled_lib.parse_oom(str(e))
      if out["oom"] is None:
        raise
      compiled = None
    out["compile_s"] = time.perf_counter() - t0
    say(f"  recovery compiled in {out['compile_s']:.1f} s", flush=True)
    if compiled is not None:
      out["memory"] = compiled_lib.memory(compiled)
      out["recovery_cost"] = compiled_lib.cost(compiled)
    out["recovery_program_flops"] = compiled_lib.program_cost(lowered).get("flops")

    # The loop's body alone: one guided velocity of the three stacked contexts.
    caches = jax.eval_shape(functools.partial(calls.contexts, graphdef), weights, inputs)[:3]
    # KV heads split like the attention's heads (tensor), as the recovery's own caches are.
    kv_spec = sharding.logical_to_spec((None, "batch", "length", "act_heads", None),
                                       sharding.RULES["llm"], mesh)

    def cache_sharding(shape):
      if len(shape) != 5:  # valid, length, next_position: small
        return replicated
      return NamedSharding(mesh, sharding._fits(shape, kv_spec, mesh))

    caches = [compiled_lib.abstract(c, cache_sharding) for c in caches]
    n = host.noisy.latent_seq_index.shape[1]
    x = jax.ShapeDtypeStruct((1, n, mc.latent_channels), jnp.float32, sharding=replicated)
    t = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=replicated)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      step_lowered = calls.batched_cfg.lower(graphdef, weights, *caches, inputs.noisy,
                                        sampler.guidance, x, t)
    step = step_lowered.compile()
    out["step_compile_s"] = time.perf_counter() - t0
    out["step_cost"] = compiled_lib.cost(step)
    out["step_program_flops"] = compiled_lib.program_cost(step_lowered).get("flops")
    say(f"  denoising step compiled in {out['step_compile_s']:.1f} s", flush=True)
    if separate_step:
      # c. on the chips: the same step as three calls, each against its own (unpadded) cache.
      t0 = time.perf_counter()
      with jax.set_mesh(mesh):
        separate = calls.separate_cfg.lower(graphdef, weights, *caches, inputs.noisy,
                                       sampler.guidance, x, t).compile()
      out["separate_step_cost"] = compiled_lib.cost(separate)
      say(f"  the step as three calls compiled in {time.perf_counter() - t0:.1f} s", flush=True)

    # The VAE is counted by XLA (its convolutions' shapes are many): encode + decode.
    def vae(weights, image):
      model = nnx.merge(graphdef, weights)
      tokens = context_lib.encode_images(model, image)
      return context_lib.decode_latents(model, tokens, height, width)

    with jax.set_mesh(mesh):
      vae_lowered = jax.jit(vae).lower(weights, inputs.corrupted)
    out["vae_flops"] = compiled_lib.program_cost(vae_lowered).get("flops") or 0.0

  flops = recovery_flops.recovery_flops(mc, jax.tree.map(np.asarray, host), moves)
  out["flops"] = {**flops, "floor": flops["floor"] + out["vae_flops"],
                  "library": flops["library"] + out["vae_flops"]}
  rec, stp = out.get("recovery_cost") or {}, out["step_cost"] or {}
  if rec.get("flops") and stp.get("flops"):
    out["compiled_flops_per_device"] = rec["flops"] + (moves - 1) * stp["flops"]
  if rec.get("optimal_seconds") and stp.get("optimal_seconds"):
    out["estimated_s"] = rec["optimal_seconds"] + (moves - 1) * stp["optimal_seconds"]
  peak = aot_report.CHIPS.get(out["device_kind"], (None, None))[1]
  if peak:
    out["peak_flops_per_chip"] = peak
    out["floor_s"] = out["flops"]["floor"] / (peak * len(devices))
    if out.get("estimated_s"):
      out["estimated_over_floor"] = out["estimated_s"] / out["floor_s"]
  return out


def report_7b(r: Mapping[str, Any]) -> str:

  b = lambda n: compiled_lib.format_bytes(n).strip()
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
      ("this implementation (analytic: padded slots, ViT x2)",
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
               f"{r['estimated_over_floor']:.2f}x the floor "
               f"{goal(r['estimated_over_floor'], FLOOR_GOAL, at_most=True)}\n"
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
