"""Streams checkpoint tensors into (and out of) a Flax NNX module through a key table.

Every component importer (LLM, SigLIP, VAE, CLIP, the whole BAGEL model) goes through
`load_into` and `export_from`: tensors are read one at a time from memory-mapped files, converted
by the table's transforms, checked against the model's shapes, cast to the parameter dtype and
placed straight onto each parameter's current sharding with `jax.make_array_from_callback`, so
every host only materialises the shards it owns.

Stacked layers (`models.layers.stack`: parameters with a leading axis named `layers`, held by an
attribute named `layers`) are addressed per layer: the key tables name layer i of
`encoder.layers.attn.q.kernel` (L, in, out) as `encoder.layers.{i}.attn.q.kernel` (in, out), the
path it had before the layers were stacked (`layer_slots`). Import reads the L tensors of one
stacked parameter one after the other (the checkpoint's keys are visited grouped by parameter),
stacks them on the host and places the whole parameter, so at most one stacked parameter is held
on the host beyond the model; export hands out one layer at a time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints.tensor_files import TensorFiles, open_tensor_files
from robust_u1_jax.models.layers import LAYER_AXIS

Source = str | TensorFiles | Mapping[str, Any]


def open_tensors(source: Source) -> TensorFiles:
  """A path (.safetensors, .index.json), opened TensorFiles, or an in-memory {key: array} dict."""
  if isinstance(source, str):
    return open_tensor_files(source)
  if isinstance(source, TensorFiles):
    return source
  loaders = {k: (lambda v=v: np.asarray(v)) for k, v in source.items()}
  return TensorFiles(loaders, {k: "<in-memory tensors>" for k in loaders})


def param_variables(module: nnx.Module) -> dict[str, nnx.Variable]:
  """Flat {dotted path: nnx.Param} of a module, e.g. 'layers.0.attn.q_proj.kernel'."""
  return kt.flat_paths(nnx.state(module, nnx.Param))


@dataclasses.dataclass(frozen=True)
class Slot:
  """Where a per-layer path lives: the model's parameter `path`, row `layer` of it when the
  parameter is stacked (None: the whole parameter)."""
  path: str
  layer: int | None = None


def is_stacked(variable: nnx.Variable) -> bool:
  """A parameter of a `layers.stack`: its first logical axis is the layer axis."""
  names = variable.get_metadata().get("out_sharding") or ()
  return len(names) > 0 and names[0] == LAYER_AXIS


def layer_slots(variables: Mapping[str, nnx.Variable]) -> dict[str, Slot]:
  """{per-layer path: Slot} of a module's parameters (`param_variables`): stacked parameters
  once per layer, at their path with the layer index after the stack's `layers` segment
  ('encoder.layers.attn.q.kernel' -> 'encoder.layers.{i}.attn.q.kernel'), the others as they are.
  """
  slots = {}
  for path, variable in variables.items():
    if not is_stacked(variable):
      slots[path] = Slot(path)
      continue
    parts = path.split(".")
    if LAYER_AXIS not in parts:
      raise TypeError(f"stacked parameter {path!r} is not under an attribute named "
                      f"{LAYER_AXIS!r}: checkpoint key tables cannot address its layers")
    at = parts.index(LAYER_AXIS) + 1
    for i in range(variable.shape[0]):
      slots[".".join(parts[:at] + [str(i)] + parts[at:])] = Slot(path, i)
  return slots


def slot_shape(variable: nnx.Variable, slot: Slot) -> tuple[int, ...]:
  return tuple(variable.shape[1:] if slot.layer is not None else variable.shape)


@jax.jit
def _take(stacked: jax.Array, layer: jax.Array) -> jax.Array:
  return jax.lax.dynamic_index_in_dim(stacked, layer, 0, keepdims=False)


def take_layer(stacked: jax.Array, layer: int) -> jax.Array:
  """Row `layer` of a stacked parameter, on its devices (sharded like the rest of its axes).
  The index is traced: one compile per parameter shape, not per layer."""
  return _take(stacked, np.int32(layer))


def layer_sharding(sharding: jax.sharding.Sharding | None):
  """The sharding of one layer of a stacked parameter sharded by `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)[1:]
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
  return sharding


def stack_layers(arrays: Sequence[jax.Array], sharding: jax.sharding.Sharding | None
                 ) -> jax.Array:
  """One stacked parameter from its layers, on devices, placed by `sharding`."""
  return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*arrays)


def _grouped(loaders: Mapping[str, Any], table: kt.KeyTable, slots: Mapping[str, Slot],
             variables: Mapping[str, Any]) -> dict[str, Any]:
  """`loaders` with the keys of each stacked parameter next to each other, in layer order, so
  its host buffer is complete (and freed) before the next one starts."""
  order = {path: n for n, path in enumerate(variables)}

  def rank(key: str) -> tuple[int, int]:
    hit = table.to_flax_path(key)
    slot = slots.get(hit[0]) if hit else None
    if slot is None:
      return (len(order), 0)
    return (order[slot.path], slot.layer or 0)

  return dict(sorted(loaders.items(), key=lambda item: rank(item[0])))


def _place(array: np.ndarray, like: Any) -> jax.Array:
  sharding = getattr(like, "sharding", None)
  if sharding is None:
    return jax.numpy.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_into(module: nnx.Module, source: Source, rules: Iterable[kt.Rule], *,
              prefix: str = "", ignore: Iterable[str] = (), optional: Iterable[str] = (),
              key_filter: Callable[[str], bool] | None = None) -> TensorFiles:
  """Loads every checkpoint tensor under `prefix` into `module`'s parameters, in place.

  Args:
    module: the target; its parameters decide which keys are required and their shapes.
    source: see `open_tensors`.
    rules: the key table for this checkpoint's naming (torch keys include `prefix`).
    prefix: only keys starting with it are read, so one file holding several components (a BAGEL
      `ema.safetensors`) serves each component's importer.
    ignore: regexes of checkpoint keys to skip (buffers, heads the model does not have).
    optional: regexes of model paths a checkpoint may omit (fixed tables rebuilt on load).
    key_filter: a further predicate on checkpoint keys.
  Raises:
    CheckpointError naming the key, file and shapes on a missing, unexpected or misshapen tensor;
    the module may then be partially loaded.
  """
  files = open_tensors(source)
  loaders = {k: v for k, v in files.loaders.items()
             if k.startswith(prefix) and (key_filter is None or key_filter(k))}
  variables = param_variables(module)
  slots = layer_slots(variables)
  expected = {p: (slot_shape(variables[s.path], s), variables[s.path].dtype)
              for p, s in slots.items()}
  table = kt.KeyTable(rules)
  stacking: dict[str, tuple[np.ndarray, set[int]]] = {}
  for path, array in kt.convert_to_flax(
      _grouped(loaders, table, slots, variables), table, expected, source=files.files,
      source_of=files.file_of, ignore=ignore, optional=optional):
    slot = slots[path]
    variable = variables[slot.path]
    if slot.layer is None:
      variable.set_value(_place(array, variable.get_value()))
      continue
    buffer, done = stacking.setdefault(slot.path,
                                       (np.empty(variable.shape, array.dtype), set()))
    buffer[slot.layer] = array
    done.add(slot.layer)
    if len(done) == variable.shape[0]:
      variable.set_value(_place(buffer, variable.get_value()))
      del stacking[slot.path]
  return files


def export_from(module: nnx.Module, rules: Iterable[kt.Rule], *, skip: Iterable[str] = ()
                ) -> dict[str, np.ndarray]:
  """The module's parameters as {checkpoint key: numpy array} in PyTorch layout."""
  variables = param_variables(module)
  whole = {p: np.asarray(jax.device_get(kt.leaf_value(v))) for p, v in variables.items()}
  host = {p: whole[s.path] if s.layer is None else whole[s.path][s.layer]
          for p, s in layer_slots(variables).items()}
  return kt.convert_to_torch(host, kt.KeyTable(rules), skip=skip)


