"""Export of a model as a BAGEL / Robust-U1 model directory (the format `bagel_dir` reads), and
the atomic folder writes that Orbax model checkpoints share.

Each parameter (each layer of a stacked one) is gathered, converted through `bagel_dir`'s key
table and written before the next one is touched, so the export never holds a second copy of the
model. A directory is written beside its destination (`<path>.partial`) and takes its place only
when complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from robust_u1_jax.checkpoints import bagel_dir
from robust_u1_jax.checkpoints import key_table as kt
from robust_u1_jax.checkpoints import loader, tensor_files
from robust_u1_jax.checkpoints.bagel_dir import (EXTRA_CONFIG, LATENT_POS_KEY, LLM_CONFIG,
                                                 ORBAX_CONFIG, SIDE_FILES, TOKENIZER_FILES,
                                                 VAE_FILE, VAE_PREFIX, VIT_CONFIG, VIT_POS_KEY,
                                                 WEIGHT_FILES)
from robust_u1_jax.models import layers
from robust_u1_jax.models.bagel import Bagel


def _host_value(value: jax.Array) -> np.ndarray:
  if isinstance(value, jax.Array) and not value.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))
  return np.asarray(jax.device_get(value))


_Entries = list[tuple[str, tensor_files.LazyTensor]]


def _export_entries(model: Bagel, out_dtype) -> tuple[_Entries, _Entries]:
  """(ema, ae): (checkpoint key, lazy tensor) of every parameter, in checkpoint layout."""
  table = kt.KeyTable(bagel_dir.model_rules(model.config))
  ema, ae = [], []
  variables = loader.param_variables(model)
  for path, slot in loader.layer_slots(variables).items():
    hit = table.to_torch_key(path)
    if hit is None:
      raise kt.CheckpointError(f"no checkpoint key for model parameter {path!r}: add a rule to "
                               "bagel_dir.model_rules.")
    key, transform = hit
    value = variables[slot.path].get_value()
    layer_shape = loader.slot_shape(variables[slot.path], slot)
    shape = jax.eval_shape(transform.to_torch, jax.ShapeDtypeStruct(layer_shape, value.dtype)).shape
    dtype = np.dtype(out_dtype or value.dtype)

    def fetch(value=value, layer=slot.layer, transform=transform, path=path, key=key):
      # One layer of a stacked parameter is cut out on its devices, then gathered alone.
      part = value if layer is None else loader.take_layer(value, layer)
      array = _host_value(part)
      if bad := kt.non_finite(array):  # every process gathers it: all raise together
        raise kt.CheckpointError(f"model parameter {path!r} (tensor {key!r}) {bad}")
      return transform.to_torch(array)

    entry = (key, tensor_files.LazyTensor(tuple(shape), dtype, fetch))
    (ae if path.startswith(VAE_PREFIX) else ema).append(entry)
  c = model.config
  table_dtype = np.dtype(out_dtype or c.llm.param_dtype)
  for key, grid in ((LATENT_POS_KEY, c.max_latent_size), (VIT_POS_KEY, c.vit.max_patches_per_side)):
    ema.append((key, tensor_files.LazyTensor(
        (grid * grid, c.llm.hidden_size), table_dtype,
        lambda grid=grid: layers.sincos_2d_table(c.llm.hidden_size, grid))))
  return ema, ae


def check_destination(path: str, overwrite: bool) -> None:
  """FileExistsError, naming `path` first, unless a model may be written there: `path` is new, or
  `overwrite` and it holds what a model write replaces (a BAGEL model directory, an Orbax model
  checkpoint, or nothing). Any other folder or a file is refused even with `overwrite`, since the
  write deletes it whole: a mistyped destination (a parent of the source, a home folder) must
  not be."""
  if not os.path.exists(path):
    return
  only = ("overwriting replaces only a model directory, an Orbax model checkpoint or an empty "
          "folder, deleting it whole")
  if not os.path.isdir(path):
    raise FileExistsError(f"{path}: a file, not a model folder; give a new folder ({only})")
  names = os.listdir(path)
  if names and not {LLM_CONFIG, ORBAX_CONFIG} & set(names):
    raise FileExistsError(f"{path}: not a model folder (no {LLM_CONFIG} or {ORBAX_CONFIG} among "
                          f"its {len(names)} entries); give a new folder ({only})")
  if not overwrite:
    raise FileExistsError(f"{path}: already exists; give a new folder, or replace it "
                          "(--overwrite; overwrite=True in Python)")


def _sync(name: str, all_processes: bool) -> None:
  if all_processes and jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_directory(path: str, *, overwrite: bool = False, all_processes: bool = False
                     ) -> Iterator[str]:
  """Yields `<path>.partial`, which replaces `path` only if the block succeeds.

  `all_processes`: every process enters (e.g. Orbax writes each one's shards into the directory);
  the name is the same on all of them and process 0 alone creates, renames and deletes.
  Otherwise only process 0 may call it.
  """
  path = os.path.abspath(path)
  check_destination(path, overwrite)
  tmp, old = path + ".partial", path + ".replaced"
  main = jax.process_index() == 0
  try:  # from its creation: an interrupt between it and the write would leave it too
    if main:
      shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted write
      os.makedirs(tmp)
    _sync(f"atomic_directory:start:{path}", all_processes)
    yield tmp
  except BaseException:
    if main:
      remove_settled(tmp)
    raise
  _sync(f"atomic_directory:written:{path}", all_processes)
  if main:
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(path):
      os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
  _sync(f"atomic_directory:done:{path}", all_processes)


def remove_settled(folder: str, *, quiet_s: float = 1.0, limit_s: float = 10.0) -> None:
  """Removes `folder` until it has stayed away `quiet_s` (at most `limit_s`): the writes of an
  interrupted Orbax save go on in TensorStore's threads for a moment and create it again, which
  left `<dst>.partial/` beside a `convert` stopped by Ctrl-C."""
  start = last_seen = time.monotonic()
  while True:
    if os.path.lexists(folder):
      shutil.rmtree(folder, ignore_errors=True)
      last_seen = time.monotonic()
    now = time.monotonic()
    if now - last_seen >= quiet_s or now - start >= limit_s:
      return
    time.sleep(0.05)


def copy_tokenizer_files(src_dir: str, dst_dir: str, *, required: bool = True) -> list[str]:
  """Copies the tokenizer files (`TOKENIZER_FILES`) present in `src_dir`; returns their names."""
  if not os.path.isdir(src_dir):
    raise FileNotFoundError(f"tokenizer directory not found: {src_dir}")
  names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src_dir, n))]
  if required and not {"tokenizer.json", "vocab.json"} & set(names):
    raise FileNotFoundError(f"{src_dir}: no tokenizer files (needs tokenizer.json or vocab.json + "
                            f"merges.txt; copied names: {list(TOKENIZER_FILES)})")
  for name in names:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return names


def write_json(path: str, content: Mapping[str, Any]) -> None:
  """A model directory's JSON side file: sorted keys, indented, a final newline."""
  with open(path, "w") as f:
    json.dump(content, f, indent=2, sort_keys=True)
    f.write("\n")


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the trained model's side files (SIDE_FILES) that `src_dir` has."""
  names = [n for n in SIDE_FILES if os.path.isfile(os.path.join(src_dir, n))]
  for name in names:
    shutil.copy2(os.path.join(src_dir, name), os.path.join(dst_dir, name))
  return names


def save_model_dir(model: Bagel, path: str, *, tokenizer_dir: str | None = None,
                   overwrite: bool = False, save_dtype=None, progress: bool = False,
                   write_beside: Callable[[str], None] | None = None) -> str:
  """Writes `model` as a BAGEL model directory (atomically: temp dir, then rename).

  Args:
    model: the model; its parameters may be sharded over any mesh.
    path: the directory to create.
    tokenizer_dir: a directory whose tokenizer files are copied alongside.
    overwrite: replace an existing `path` (otherwise FileExistsError).
    save_dtype: cast every tensor (e.g. 'bfloat16', as BAGEL releases); default: parameter dtype.
    progress: show a tqdm bar over tensors.
    write_beside: adds files of the caller's into the folder before it takes `path`'s place.
  Returns the absolute path. Only process 0 writes; every process must call (to gather shards).
  """
  check_destination(os.path.abspath(path), overwrite)  # on every process, before any gather
  ema, ae = _export_entries(model, save_dtype)
  if jax.process_index() != 0:
    for _, e in ema + ae:
      e.fetch()  # the gathers are collective: take part in each
    return os.path.abspath(path)
  torch_dtype = np.dtype(save_dtype or model.config.llm.param_dtype).name
  with atomic_directory(path, overwrite=overwrite) as tmp:
    with bagel_dir.progress_bar(len(ema) + len(ae), f"writing {os.path.basename(path.rstrip('/'))}",
                   progress) as bar:
      tensor_files.save_safetensors(ema, os.path.join(tmp, WEIGHT_FILES[0]), bar=bar)
      tensor_files.save_safetensors(ae, os.path.join(tmp, VAE_FILE), bar=bar)
    c = model.config
    write_json(os.path.join(tmp, LLM_CONFIG), bagel_dir.llm_config_json(c.llm, torch_dtype))
    write_json(os.path.join(tmp, VIT_CONFIG), bagel_dir.vit_config_json(c.vit))
    write_json(os.path.join(tmp, EXTRA_CONFIG), bagel_dir.extra_config_json(c))
    if tokenizer_dir is not None:
      copy_tokenizer_files(tokenizer_dir, tmp)
    if write_beside is not None:
      write_beside(tmp)
  return os.path.abspath(path)

