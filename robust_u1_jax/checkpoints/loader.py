"""Streams checkpoint tensors into (and out of) a Flax NNX module through a key table.

Every component importer (LLM, SigLIP, VAE, CLIP, the whole BAGEL model) goes through
`load_into` and `export_from`: tensors are read one at a time from memory-mapped files, converted
by the table's transforms, checked against the model's shapes, cast to the parameter dtype and
placed straight onto each parameter's current sharding with `jax.make_array_from_callback`, so
every host only materialises the shards it owns.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints.tensor_files import TensorFiles, open_tensor_files

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
  expected = {p: (tuple(v.shape), v.dtype) for p, v in variables.items()}
  for path, array in kt.convert_to_flax(
      loaders, kt.KeyTable(rules), expected, source=files.files, source_of=files.file_of,
      ignore=ignore, optional=optional):
    variable = variables[path]
    variable.set_value(_place(array, variable.get_value()))
  return files


def export_from(module: nnx.Module, rules: Iterable[kt.Rule], *, skip: Iterable[str] = ()
                ) -> dict[str, np.ndarray]:
  """The module's parameters as {checkpoint key: numpy array} in PyTorch layout."""
  host = {p: np.asarray(jax.device_get(kt.leaf_value(v)))
          for p, v in param_variables(module).items()}
  return kt.convert_to_torch(host, kt.KeyTable(rules), skip=skip)


def matches_any(patterns: Iterable[str]) -> Callable[[str], bool]:
  compiled = [re.compile(p) for p in patterns]
  return lambda key: any(r.fullmatch(key) for r in compiled)
