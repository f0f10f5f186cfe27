"""Device mesh and logical-to-mesh sharding rules, one rule set per model component.

Parameters carry logical axis names (`nnx.with_partitioning(init, ("embed", "mlp"))`), never mesh
axes, so the same module code shards as FSDP on a pod, tensor-parallel on a GPU box, or not at all
on a laptop. Which mesh axis a logical name maps to is decided here, per component: the LLM and ViT
shard their large matrices over `fsdp` and `tensor`; the small frozen VAE and CLIP towers only over
`fsdp` so they never pay for tensor-parallel collectives.

Logical names:
  parameters: vocab, embed, mlp, q_heads, kv_heads, heads, head_dim, patch, pos, conv_in, conv_out,
              norm; layers (the leading axis of stacked layer parameters, `models.layers.stack`)
  activations: batch, length, act_embed, act_heads, act_mlp, act_vocab
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

_ACTIVATIONS: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
# The layer axis of stacked parameters stays whole on every device: `lax.scan` slices one layer
# per step from each device's shard (FSDP gathers that layer only), so sharding it would make
# every step move a layer between devices.
_STACKED: Rules = (("layers", None),)

RULES: dict[str, Rules] = {
    "llm": (
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("heads", "tensor"),
        ("head_dim", None),
        ("patch", None),
        ("pos", None),
        ("norm", None),
    ) + _STACKED + _ACTIVATIONS,
    "vit": (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("head_dim", None),
        ("patch", None),
        ("pos", None),
        ("norm", None),
    ) + _STACKED + _ACTIVATIONS,
    "vae": (
        ("conv_in", None),
        ("conv_out", "fsdp"),
        ("embed", None),
        ("heads", None),
        ("head_dim", None),
        ("norm", None),
    ) + _STACKED + _ACTIVATIONS,
    "clip": (
        ("vocab", None),
        ("embed", "fsdp"),
        ("mlp", None),
        ("heads", None),
        ("head_dim", None),
        ("patch", None),
        ("pos", None),
        ("norm", None),
    ) + _STACKED + _ACTIVATIONS,
}


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ('data', 'fsdp', 'tensor') from a config with one size per axis; -1 fills the rest."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh: {len(devices)} devices are not divisible by the fixed axes "
                       f"{dict(zip(MESH_AXES, sizes))}")
    sizes[fill[0]] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh: axes {dict(zip(MESH_AXES, sizes))} need {int(np.prod(sizes))} "
                     f"devices, but {len(devices)} are available")
  # Auto axes: GSPMD propagates shardings from the parameter and activation constraints.
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Mesh) -> P:
  """Logical axis names -> PartitionSpec; mesh axes of size 1 or already used become None."""
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return P(*spec)


def _fits(shape: Sequence[int], spec: P, mesh: Mesh) -> P:
  """Drops sharding on dimensions the mesh does not divide (tiny configs on many devices)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    size = int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))
    out.append(axes if dim % size == 0 else None)
  return P(*out)


def state_shardings(state: nnx.State, component: str | Mapping[str, str], mesh: Mesh
                    ) -> nnx.State:
  """NamedSharding for every variable of a state, from its logical names.

  `component` names one rule set, or maps a model's top-level attribute names to rule sets (a
  composite model such as BAGEL: {'language_model': 'llm', 'vit_model': 'vit', 'vae': 'vae'});
  attributes not in the mapping use its '*' entry, or 'llm'.
  """
  def rules_for(path) -> Rules:
    if isinstance(component, str):
      return RULES[component]
    return RULES[component.get(str(path[0]), component.get("*", "llm"))]

  def one(path, variable):
    names = variable.get_metadata().get("out_sharding")
    spec = _fits(variable.shape, logical_to_spec(names, rules_for(path), mesh), mesh)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(
      lambda kp, v: one(tuple(_key_name(k) for k in kp), v), state,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def abstract_model(create: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """Shape-only model (no memory allocated): the target for restoring and importing."""
  abstract = nnx.eval_shape(create)
  return nnx.split(abstract)


def create_sharded(create: Callable[[], nnx.Module], component: str | Mapping[str, str],
                   mesh: Mesh) -> nnx.Module:
  """Initialises a model directly into its sharding: no host ever holds the whole model."""
  graphdef, abstract_state = abstract_model(create)
  shardings = state_shardings(abstract_state, component, mesh)

  @jax.jit
  def init():
    return nnx.state(create())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def activation_constraint(x: jax.Array, names: Sequence[str | None], component: str = "llm"):
  """with_sharding_constraint by logical names, a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return x
  spec = logical_to_spec(names, RULES[component], mesh)
  return jax.lax.with_sharding_constraint(x, spec)
