r"""Ahead-of-time compile of a stage's real train step for a TPU topology, on a CPU machine.

  python -m robust_u1_jax.bench aot --config configs/sft.py:bagel_7b --topology v5p-64
  python -m robust_u1_jax.bench aot --config configs/rl.py:bagel_7b --topology v5p-64
  python -m robust_u1_jax.bench aot --config configs/reason.py:bagel_7b --topology v5p-64
  python -m robust_u1_jax.bench aot --config configs/sft.py:tiny --topology cpu:8
  python -m robust_u1_jax.bench aot --config configs/sft.py:bagel_7b --topology v5p-64 \
      --override data.token_budget=8192 --override data.latent_budget=4864 \
      --override data.batch_size=64

Nothing is allocated: the run setup is the trainer's own (`run_setup.make_context`: the same
model config, checked against the data config) with a shape-only model whose shardings come from
the logical-axis rules (`sharding.state_shardings`); the train state's shardings are the ones XLA
gives `create_state` (compiled for the same devices, as the trainer's `jax.jit(create_state)`
does). The step's inputs are what the stage's own `host_inputs` makes of a batch of its pipeline,
as sharded shapes (`aot_steps.py`: SFT rows, RL rollout contexts, reasoning rows with their
precomputed recoveries). The step is the stage's own `spec.make_step(graphdef, tx)`, jitted with
the trainer's donation (`trainer.jit_step`), lowered under the mesh and compiled for:

  v5p-64, v4-32, v5e-16, v6e-256 ...   Cloud TPU slice names (v4/v5p count TensorCores, two per
                                       chip; v5e/v6e count chips), default slice shapes
  v5p:2x4x4, v6e:8x8                    an explicit libtpu topology (chips per axis)
  cpu:N                                 N fake CPU devices (XLA_FLAGS host device count): the same
                                        code path without libtpu; memory is per fake device

TPU topologies need libtpu (`pip install -e ".[tpu]"`: jax 0.10.2 pins libtpu 0.0.42.*), never a
TPU: libtpu compiles for a described slice. The report (`aot_report.py`) gives XLA's per-device
memory (`compiled.memory_analysis()`: arguments, outputs, aliased (donated) bytes, temporaries,
code) against the chip's HBM and a verdict; when a program does not fit, the TPU compiler itself
refuses it (RESOURCE_EXHAUSTED) and the verdict quotes the compiler's numbers and largest
allocations. It also counts the step's FLOPs three ways and bounds the model-FLOPs MFU.
`bench aot` exits with status 1 when the step does not fit (0 when it does, 2 on a bad input), so
a script can ask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from robust_u1_jax.benchmarks import aot_report
from robust_u1_jax.benchmarks import compiled as compiled_lib

DEFAULT_CONFIG = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "configs", "sft.py")) + ":tiny"
DEFAULT_TOPOLOGY = "cpu:8"

# Slice-name generation -> (libtpu name, TensorCores per chip counted in the slice name, 3-D torus).
GENERATIONS = {"v4": ("v4", 2, True), "v5p": ("v5p", 2, True), "v5e": ("v5e", 1, False),
               "v5litepod": ("v5e", 1, False), "v6e": ("v6e", 1, False)}


class AotError(RuntimeError):
  """The AOT check cannot run as asked (topology, libtpu, config); the message says why."""


# ----------------------------------------------------------------------------------- topologies

def libtpu_topology_name(topology: str) -> str:
  """'v5p-64' -> 'v5p:2x4x4' (Cloud TPU default slice shapes); explicit 'v5p:2x4x4' passes."""
  if ":" in topology:
    return topology
  m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", topology)
  if not m:
    raise AotError(f"--topology {topology!r} is not understood: use a Cloud TPU slice name "
                   "(v4-32, v5p-64, v5e-16, v6e-256), an explicit libtpu topology (v5p:2x4x4, "
                   "v6e:8x8) or cpu:N")
  name, per_chip, torus = GENERATIONS[m.group(1)]
  count = int(m.group(2))
  chips = count // per_chip
  if count % per_chip or chips < 1 or chips & (chips - 1):
    raise AotError(f"--topology {topology}: {count} is not a power-of-two slice size; give the "
                   f"shape explicitly, e.g. {name}:2x2x2")
  if torus and chips < 4:
    raise AotError(f"--topology {topology}: the smallest {name} slice is {name}-{4 * per_chip} "
                   "(2x2x1 chips)")
  dims = [2, 2, 1] if torus else [1, 1]
  while math.prod(dims) < chips:
    # Double the smallest axis, the last one on ties: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4 ...
    smallest = min(dims)
    dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
  return f"{name}:{'x'.join(map(str, dims))}"


def accelerator_type(name: str) -> str:
  """'v5p:2x4x4' -> 'v5p-64', 'v5e:4x4' -> 'v5litepod-16': the slice's Cloud TPU type."""
  generation, _, shape = name.partition(":")
  chips = math.prod(int(d) for d in shape.split("x") if d.isdigit()) if shape else 1
  per_chip = {"v4": 2, "v5p": 2}.get(generation, 1)
  return f"{'v5litepod' if generation == 'v5e' else generation}-{chips * per_chip}"


def _ensure_host_backend(cpu_devices: int = 0) -> None:
  """The host side of an AOT run is CPU-only: never probe for a TPU (libtpu installed on a CPU
  machine would), and give the CPU backend `cpu_devices` fake devices when it is not started.
  A device count the environment already asks for is kept (a cpu:N topology takes the first N),
  so a process that compiles for cpu:2 can still compile for cpu:8 later."""
  flags = os.environ.get("XLA_FLAGS", "")
  if cpu_devices and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={cpu_devices}"
    try:
      jax.config.update("jax_num_cpu_devices", cpu_devices)
    except Exception:  # backends already started; the device count check below reports it
      pass
  if not os.environ.get("JAX_PLATFORMS"):
    try:
      jax.config.update("jax_platforms", "cpu")
    except Exception:
      pass


def topology_devices(topology: str) -> tuple[list, str]:
  """(devices to compile for, a description); TPU devices come from a libtpu topology."""
  if topology.startswith("cpu:"):
    try:
      n = int(topology[4:])
    except ValueError:
      n = 0
    if n < 1:
      raise AotError(f"--topology {topology!r}: use cpu:N with N a whole number of devices, >= 1")
    _ensure_host_backend(n)
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise AotError(f"--topology {topology}: the CPU backend has {len(devices)} devices; start "
                     f"Python with XLA_FLAGS=--xla_force_host_platform_device_count={n}")
    # CPU attention is XLA's dense kernel (models/attention.py), every head's whole score matrix:
    # long rows need more memory here than a TPU's splash attention does.
    return devices[:n], f"{n} fake CPU devices, attention dense (a TPU slice's is splash)"
  name = libtpu_topology_name(topology)
  _ensure_host_backend()
  # libtpu reads these when its plugin starts: the slice being compiled for (else it probes the
  # GCE metadata server and warns), and permission to load while another JAX process on this
  # machine holds /tmp/libtpu_lockfile.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(name))
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(name, "tpu")
  except Exception as e:  # missing libtpu, an unknown name, a libtpu/jax mismatch
    import importlib.util
    try:
      have = "libtpu is installed" if importlib.util.find_spec("libtpu") else None
    except (ImportError, ValueError):
      have = None
    if have is None:
      have = "libtpu is not installed: pip install -e \".[tpu]\" (jax 0.10.2 needs libtpu 0.0.42.*)"
    raise AotError(f"cannot describe TPU topology {name!r} ({topology}): {have}; "
                   f"{type(e).__name__}: {e}") from e
  return list(desc.devices), f"TPU topology {name}"


# ----------------------------------------------------------------------------------- the config

# Fields a 7B variant leaves for the user to fill that an AOT compile does not read: no weights
# load, the batch comes from the shapes world (aot_steps.builder_config) and a CLIP reward tower
# without its file is built shape-only (aot_steps.stage_environment).
PLACEHOLDERS = {"init_from": "random", "data.path": "unused", "eval_data.path": "unused",
                "rl.clip_checkpoint": "unused"}


def load_config(spec: str, overrides: dict[str, Any] | None = None):
  """The run's config; the PLACEHOLDERS fields it leaves unset (the 7B variants' init_from,
  dataset paths and reward model) are filled in, since nothing is loaded."""
  from robust_u1_jax import config_lib

  overrides = dict(overrides or {})
  while True:
    try:
      return config_lib.load(spec, overrides)
    except config_lib.ConfigError as e:
      field = next((f for f in PLACEHOLDERS
                    if f not in overrides and re.search(rf"\b{re.escape(f)}\b", str(e))), None)
      if field is None:
        raise
      overrides[field] = PLACEHOLDERS[field]


def parse_overrides(items) -> dict[str, Any]:
  """['a.b=1', 'c=x'] -> {'a.b': 1, 'c': 'x'} (Python literals, else strings)."""
  import ast

  out = {}
  for item in items or ():
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise AotError(f"--override {item!r}: use field.path=value")
    try:
      out[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key.strip()] = value
  return out


@contextlib.contextmanager
def fast_tracer_errors():
  """Skips the origin search in tracer error messages while tracing here.

  Flax probes `getattr(tracer, 'sharding', None)` on every RNG-stream update of a parameter
  initialiser; on a jit tracer that raises an AttributeError whose message searches every equation
  traced so far for the value's origin, so tracing a model's initialisers is quadratic in its
  parameter count (about 150 s for BAGEL-7B's abstract model on a 2-core machine, 12 s without the
  search). Only the text of tracer errors changes; jax versions without this hook are left alone.
  """
  try:
    from jax._src.interpreters import partial_eval as pe
    tracer = pe.DynamicJaxprTracer
    original = tracer.__dict__["_origin_msg"]
  except (ImportError, AttributeError, KeyError):
    yield
    return
  tracer._origin_msg = lambda self: ""
  try:
    yield
  finally:
    tracer._origin_msg = original


# ----------------------------------------------------------------------------------- compilation

def compile_step(config_spec: str = "", topology: str = DEFAULT_TOPOLOGY,
                 overrides: dict[str, Any] | None = None, *, verbose: bool = True
                 ) -> aot_report.AotResult:
  """Lowers and compiles the config's train step for `topology` without allocating weights."""
  from robust_u1_jax import config_lib
  from robust_u1_jax.benchmarks import aot_steps
  from robust_u1_jax.training import run_setup

  spec_name = config_spec or DEFAULT_CONFIG
  devices, description = topology_devices(topology)
  try:
    config = load_config(spec_name, overrides)
  except (config_lib.ConfigError, FileNotFoundError, KeyError, TypeError, ValueError) as e:
    message = str(e)  # config_lib's errors name the config file already
    raise AotError(message if spec_name in message else f"config {spec_name}: {message}") from e
  if config_lib.lora_enabled(config):
    raise AotError("lora.rank > 0: the AOT check builds the full-training state only; LoRA "
                   "factors are initialised from real kernels (trainer.apply_lora)")
  say = print if verbose else (lambda *a, **k: None)
  try:
    with aot_steps.stage_environment(config) as workdir:
      try:
        build_config = aot_steps.builder_config(config, workdir)
        # Cheap: the model is built when the stage asks for it.
        ctx = run_setup.make_context(build_config, devices=devices, abstract=True)
      except (config_lib.ConfigError, FileNotFoundError, ValueError) as e:
        # The library says how a command line sets a field; here it is an --override.
        text = str(e).replace("--config.", "--override ")
        raise AotError(f"config {spec_name}: {text}") from e
      say(f"AOT: {spec_name} (stage {config.stage}) for {topology}: {description}, "
          f"{len(devices)} x {devices[0].device_kind}, mesh {dict(ctx.mesh.shape)}", flush=True)
      with fast_tracer_errors(), persistent_cache(topology.startswith("cpu:")):
        return _compile(build_config, ctx, spec_name, topology, description, devices, say)
  except aot_steps.StageError as e:
    raise AotError(f"config {spec_name}: {e}") from e


@contextlib.contextmanager
def persistent_cache(enabled: bool):
  """JAX's persistent compilation cache left on, or off for the block when `enabled` is False.
  Off here for topology executables: they have no client to be loaded back from the cache
  (reading them only warns), so they are not written to it."""
  try:
    from jax.experimental.compilation_cache import compilation_cache
    before = jax.config.jax_enable_compilation_cache
  except (ImportError, AttributeError):
    yield
    return
  if enabled or not before:
    yield
    return
  # The cache decides once per process whether it is used: reset it around the change.
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", before)
    compilation_cache.reset_cache()


CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # jax/_src/compiler.py records it


@contextlib.contextmanager
def counted_cache_hits() -> Iterator[list[str]]:
  """Yields a list that gathers an entry for each program the block reads from JAX's persistent
  compilation cache: a compile time of such a program is a load, not a compile."""
  hits: list[str] = []

  def listen(event: str, **kwargs) -> None:
    del kwargs
    if event == CACHE_HIT_EVENT:
      hits.append(event)

  jax.monitoring.register_event_listener(listen)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listen)


def _compile(config, ctx, spec_name, topology, description, devices, say) -> aot_report.AotResult:
  """`config`: the builder config (aot_steps.builder_config), the one `ctx` was made from."""
  from robust_u1_jax import flops
  from robust_u1_jax.benchmarks import aot_steps
  from robust_u1_jax.training import stages
  from robust_u1_jax.training import state as state_lib
  from robust_u1_jax.training import trainer

  mesh = ctx.mesh
  t0 = time.perf_counter()
  spec = stages.builder(config.stage)(ctx)
  _, host = aot_steps.host_batch(config, ctx, spec)
  rows = int(config.data.batch_size)
  inputs = aot_steps.abstract_inputs(host, rows, mesh)
  work, work_note = aot_steps.stage_work(config, ctx.model_config, host, rows)
  model_flops = flops.step_flops(ctx.model_config, work, spec.trainable)
  described = describe_inputs(inputs)
  say(f"inputs (global): {described}", flush=True)

  graphdef, params, frozen = state_lib.split_model(ctx.model, spec.trainable)
  tx = state_lib.make_optimizer(config.optimizer, config.total_steps)
  replicated = NamedSharding(mesh, P())
  aux = compiled_lib.abstract(dict(spec.aux), lambda shape: replicated)
  if spec.reference:
    aux["reference"] = params
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  # The trainer's own state creation (optimizer state and EMA sharded like the parameters).
  create = trainer.state_creator(config, tx, params)
  state_shapes = jax.eval_shape(create, params, frozen, rng, aux)
  state_shardings = create.lower(params, frozen, rng, aux).compile().output_shardings
  state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       state_shapes, state_shardings)
  build_s = time.perf_counter() - t0
  say(f"abstract model, stage and train state in {build_s:.1f} s; lowering ...", flush=True)

  # The trainer's step: its own make_step, donated state, traced under the mesh.
  step = trainer.jit_step(spec, graphdef, tx, state_shardings)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):
    lowered = step.lower(state, inputs)
  lower_s = time.perf_counter() - t0
  say(f"lowered in {lower_s:.1f} s; compiling ...", flush=True)
  t0 = time.perf_counter()
  memory, cost, oom, hlo = None, {}, None, None
  try:
    with counted_cache_hits() as hits:
      compiled = lowered.compile()
  except Exception as e:  # the TPU compiler refuses programs that exceed HBM
    oom = compiled_lib.parse_oom(str(e))
    if oom is None:
      raise
  else:
    memory = compiled_lib.memory(compiled)
    cost = compiled_lib.cost(compiled)
    hlo = compiled_lib.matmul_flops(compiled)
  compile_s = time.perf_counter() - t0
  program_flops = compiled_lib.program_cost(lowered).get("flops")
  return aot_report.AotResult(
      config=spec_name, stage=config.stage, topology=topology, description=description,
      device_kind=devices[0].device_kind, num_devices=len(devices), mesh=dict(mesh.shape),
      inputs=described, params=compiled_lib.count((params, frozen)),
      trainable=compiled_lib.count(params), state_bytes_per_device=compiled_lib.shard_bytes(state),
      replicated_state=compiled_lib.replicated_leaves(state),
      batch_bytes_per_device=compiled_lib.shard_bytes(inputs),
      build_s=build_s, lower_s=lower_s, compile_s=compile_s, compile_cached=bool(hits),
      memory=memory,
      flops_per_device=float(cost["flops"]) if cost.get("flops") else None,
      flops_program=float(program_flops) if program_flops else None,
      optimal_seconds=cost.get("optimal_seconds"), model_flops=model_flops,
      work_note=work_note, hlo=hlo, oom=oom)


def describe_inputs(inputs) -> str:
  """'name shape dtype' of the step's input arrays of two or more dimensions (global shapes)."""
  parts = []
  for path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
    if len(x.shape) >= 2 and not jax.tree_util.keystr(path).endswith(
        ("source_index", "positions", "position_ids", "segment_ids", "seq_index", "image_index",
         "block_id", "causal", "noisy", "sample_id", "text_ids")):
      parts.append(f"{jax.tree_util.keystr(path).lstrip('.')} "
                   f"{'x'.join(map(str, x.shape))} {np.dtype(x.dtype).name}")
  return ", ".join(parts)


def run(*, config: str = "", topology: str = DEFAULT_TOPOLOGY, hbm_gib: float | None = None,
        overrides=()) -> dict:
  """`python -m robust_u1_jax.bench aot`: compiles, prints the report, returns its numbers."""
  try:
    result = compile_step(config, topology, parse_overrides(overrides))
  except AotError as e:
    raise SystemExit(f"aot: {e}") from None
  print(aot_report.report(result, hbm_gib), flush=True)
  fits, line = aot_report.verdict(result, hbm_gib)
  return {**dataclasses.asdict(result), "device_bytes": result.device_bytes, "fits": fits,
          "verdict": line}
