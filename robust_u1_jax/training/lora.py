"""LoRA (Hu et al., 2021) on a stage's trainable kernels, as a pure parameter transform.

No module changes: the model keeps its plain `nnx.Linear` kernels, and a step sees the merged
weights `W + (alpha / rank) * A @ B`, computed from the frozen base `W` and the trained factors
`A` (in, rank) and `B` (rank, out) before `nnx.merge`. So LoRA works with any stage whose step
builds its model with `state.merge_model(graphdef, params, frozen)`.

With `config.lora.rank > 0` the trainer (`trainer.train`) lays the train state out as:
- `params`: the LoRA factors only, an `nnx.State` at `<kernel path>.lora_a` / `.lora_b` for every
  (in, out) kernel among the stage's trainable parameters whose dotted path matches
  `config.lora.targets` (default: the attention and MLP kernels of the generation expert); a
  kernel of stacked layers (L, in, out) gets stacked factors (L, in, rank) and (L, rank, out), one
  independent pair per layer;
- `frozen`: the whole base model (the stage's trainable parameters included), never updated. As in
  PEFT's default, nothing else trains: biases, norms, the time embedder and the latent connectors
  stay at their initial values.
- `graphdef`: a `LoraGraphDef` (the model's graph definition and the scale), which the steps pass to
  `state.merge_model` in place of the plain graph definition.

A starts like a Linear kernel (normal, std 1/sqrt(in)) and B at zero, so training starts exactly at
the base model (which is also the RL stage's frozen reference: a copy of the initial factors).
Factors are float32 and follow the kernel's sharding (A its input axis, B its output axis), so
`A @ B` comes out sharded like the kernel; the merge is computed in float32 and cast back to the
kernel's dtype (with bfloat16 parameters the forward pass sees the update rounded to bfloat16; the
factors themselves and their gradients stay float32). An EMA, when kept, is of the factors: the
saved model merges EMA(A) @ EMA(B).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from robust_u1_jax import config_defaults, config_lib
from robust_u1_jax.models.layers import LAYER_AXIS

DEFAULT_TARGETS = config_defaults.LORA_TARGETS
# The attention kernels of whichever expert a stage trains.
ATTENTION_TARGETS = r"\.(q|k|v|o)_proj\.kernel$"


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _layer_dims(variable: nnx.Variable) -> int:
  """1 for a parameter of stacked layers (leading axis named LAYER_AXIS), else 0."""
  names = variable.get_metadata().get("out_sharding") or ()
  return int(len(names) > 0 and names[0] == LAYER_AXIS)


def target_paths(params: nnx.State, targets: str = DEFAULT_TARGETS) -> list[tuple]:
  """State paths of the kernels in `params` that get LoRA factors: parameters whose dotted path
  matches the regex `targets`; each must be an (in, out) kernel, or (L, in, out) for stacked
  layers."""
  pattern = re.compile(targets)
  paths = []
  for path, variable in nnx.to_flat_state(params):
    if not isinstance(variable, nnx.Param) or not pattern.search(_dotted(path)):
      continue
    if len(variable.shape) != 2 + _layer_dims(variable):
      raise config_lib.ConfigError(
          f"config field lora.targets = {targets!r} selects {_dotted(path)} of shape "
          f"{variable.shape}; LoRA applies to (in, out) kernels only (with a leading layer axis "
          "for stacked layers)")
    paths.append(tuple(path))
  if not paths:
    kernels = [_dotted(path) for path, v in nnx.to_flat_state(params)
               if isinstance(v, nnx.Param) and len(v.shape) == 2 + _layer_dims(v)]
    shown = [k for k in kernels if ".layers." in k][:4] or kernels[:4]  # the decoder's first
    hint = ""
    if targets == DEFAULT_TARGETS:  # the reasoning stage trains the understanding expert
      hint = ("; the default targets the generation expert, which stages I and II train: "
              f"this stage's attention, for one, is lora.targets='{ATTENTION_TARGETS}'")
    raise config_lib.ConfigError(
        f"config field lora.targets = {targets!r} selects no kernel among the stage's trainable "
        f"parameters; a regex searched in their paths, e.g. {', '.join(shown)}{hint}")
  return paths


def _factor_sharding(kernel, which: str):
  """The kernel's sharding kept along its leading (layer) axes and its input axis for A
  (`which` 'a'), its output axis for B ('b')."""
  sharding = getattr(kernel, "sharding", None)
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return None
  spec = tuple(sharding.spec) + (None,) * (kernel.ndim - len(sharding.spec))
  kept = spec[:-2] + ((spec[-2], None) if which == "a" else (None, spec[-1]))
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*kept))


def init(params: nnx.State, rank: int, key: jax.Array, targets: str = DEFAULT_TARGETS
         ) -> nnx.State:
  """LoRA factors for the targeted kernels of `params`: A ~ N(0, 1/in) (in, rank), B = 0
  (rank, out) (with the kernel's leading layer axis, if stacked), float32, carrying the kernel's
  logical axis names and sharding."""
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  flat = dict(nnx.to_flat_state(params))
  paths = target_paths(params, targets)
  side, narrowest = min((min(flat[p].shape[-2:]), p) for p in paths)
  if rank > side:  # A @ B then holds more numbers than the kernel, and no lower rank
    raise config_lib.ConfigError(
        f"config field lora.rank = {rank} is above the side of the kernel "
        f"{_dotted(narrowest)} ({side}): its factors would hold more than the kernel; give "
        f"lora.rank <= {side}, or 0 to train the kernels themselves")
  keys = jax.random.split(key, len(paths))
  factors = {}
  for path, k in zip(paths, keys):
    kernel = flat[path]
    *lead, d_in, d_out = kernel.shape
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.ndim
    lead, lead_names = tuple(lead), tuple(names[:-2])
    make_a = lambda k, d_in=d_in, lead=lead: (
        jax.random.normal(k, lead + (d_in, rank), jnp.float32) / jnp.sqrt(jnp.float32(d_in)))
    make_b = lambda k, d_out=d_out, lead=lead: jnp.zeros(lead + (rank, d_out), jnp.float32)
    value = kernel.get_value()
    for name, make, which, axes in (("lora_a", make_a, "a", lead_names + (names[-2], None)),
                                    ("lora_b", make_b, "b", lead_names + (None, names[-1]))):
      # Created straight into the kernel's layout (jit out_shardings: fine on many hosts).
      x = jax.jit(make, out_shardings=_factor_sharding(value, which))(k)
      factors[path + (name,)] = nnx.Param(x, out_sharding=axes, eager_sharding=False)
  return nnx.from_flat_state(factors)


def scale(rank: int, alpha: float) -> float:
  return float(alpha) / rank


def merge(base: nnx.State, lora: nnx.State, scale_: float) -> nnx.State:
  """`base` with every kernel that has factors in `lora` replaced by W + scale * A @ B (in W's
  dtype); every other variable is passed through untouched. Pure: works under jit and grad."""
  factors: dict[tuple, dict[str, jax.Array]] = {}
  for path, variable in nnx.to_flat_state(lora):
    factors.setdefault(tuple(path[:-1]), {})[path[-1]] = variable.get_value()
  flat = []
  for path, variable in nnx.to_flat_state(base):
    ab = factors.pop(tuple(path), None)
    if ab is not None:
      w = variable.get_value()
      # (..., in, rank) @ (..., rank, out): per layer for stacked kernels.
      d = scale_ * jnp.matmul(ab["lora_a"].astype(jnp.float32),
                              ab["lora_b"].astype(jnp.float32))
      merged = (w.astype(jnp.promote_types(w.dtype, jnp.float32)) + d).astype(w.dtype)
      if isinstance(w, jax.Array) and not isinstance(w, jax.core.Tracer):
        merged = jax.device_put(merged, w.sharding)  # eager (saving): keep the kernel's layout
      variable = variable.replace(merged)
    flat.append((path, variable))
  if factors:
    raise ValueError(f"LoRA factors without a base kernel: {[_dotted(p) for p in factors]}")
  return nnx.from_flat_state(flat)


@dataclasses.dataclass(frozen=True)
class LoraGraphDef:
  """What the steps receive as `graphdef` when LoRA is on: `state.merge_model` builds the model
  from (LoRA factors, whole base state). Hashable, like a graph definition."""
  graphdef: nnx.GraphDef
  scale: float

  def merge_state(self, lora: nnx.State, base: nnx.State) -> nnx.State:
    return merge(base, lora, self.scale)

  def merge_model(self, lora: nnx.State, base: nnx.State) -> nnx.Module:
    return nnx.merge(self.graphdef, self.merge_state(lora, base))


def setup(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, rank: int, alpha: float,
          key: jax.Array, targets: str = DEFAULT_TARGETS
          ) -> tuple[LoraGraphDef, nnx.State, nnx.State]:
  """(graphdef, stage-trainable params, frozen rest) of `split_model` -> (LoraGraphDef, LoRA
  factors: the new trainable params, the whole base state: the new frozen part)."""
  factors = init(params, rank, key, targets)
  return LoraGraphDef(graphdef, scale(rank, alpha)), factors, nnx.merge_state(params, frozen)


def num_params(lora: nnx.State) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(lora))
