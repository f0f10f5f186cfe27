"""Reading and writing PyTorch-format tensor files, one tensor at a time.

Safetensors files are memory-mapped, so importing a 7B checkpoint never holds more than one tensor
in host memory beyond the model itself. Pickle files (`*.bin`, `*.pt`) can run arbitrary code when
loaded, so they are refused unless the caller opts in, and then loaded with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from robust_u1_jax import files
from robust_u1_jax.checkpoints.key_table import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class TensorFiles:
  """Lazy view of the tensors in one or more checkpoint files: key -> loader."""

  def __init__(self, loaders: dict[str, Callable[[], np.ndarray]], file_of: dict[str, str]):
    self.loaders = loaders
    self.file_of = file_of

  def keys(self):
    return self.loaders.keys()

  def __contains__(self, key: str) -> bool:
    return key in self.loaders

  def load(self, key: str) -> np.ndarray:
    return self.loaders[key]()

  @property
  def files(self) -> str:
    return ", ".join(sorted(set(self.file_of.values())))


def open_tensor_files(path: str, *, allow_pickle: bool = False) -> TensorFiles:
  """Opens a .safetensors file, a sharded `*.safetensors.index.json`, or (opt-in) a pickle file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.endswith(".index.json"):
    weight_map = files.read_json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise files.UnreadableFile(f"{path}: no \"weight_map\" object of tensor names and their "
                                 "shard files, as a sharded checkpoint's index holds")
    if bad := [v for v in weight_map.values() if not isinstance(v, str)]:
      raise files.UnreadableFile(f"{path}: weight_map names a shard as {json.dumps(bad[0])}, not "
                                 "a file name")
    base = os.path.dirname(path)
    loaders, file_of = {}, {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(base, shard)
      if not os.path.exists(shard_path):
        raise FileNotFoundError(f"checkpoint file not found: {shard_path}, a shard that {path} "
                                "lists; download it, or the index that goes with these shards")
      part = open_tensor_files(shard_path)
      loaders.update(part.loaders)
      file_of.update(dict.fromkeys(part.file_of, shard_path))
    return TensorFiles(loaders, file_of)
  if path.endswith(".safetensors"):
    return _open_safetensors(path)
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise CheckpointError(
          f"{path}: a pickle file, which can execute code when loaded, refused by default; "
          "convert it once with `python -m robust_u1_jax.convert --from hf --allow_pickle ...` "
          "(an Orbax checkpoint every command reads), or load it with allow_pickle=True in Python "
          "(torch.load(weights_only=True))")
    return _open_pickle(path)
  raise CheckpointError(f"{path}: unknown checkpoint format; expected .safetensors, "
                   f".safetensors.index.json or (opt-in) one of {PICKLE_SUFFIXES}")


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def stored_float_dtype(path: str) -> str | None:
  """The float dtype most of the tensors of a .safetensors file (or the shards of an index) are
  stored in, read from their headers alone; None for another format or an unreadable file."""
  if path.endswith(".index.json"):
    try:
      shards = sorted(set(files.read_json(path)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      return None
    paths = [os.path.join(os.path.dirname(path), s) for s in shards]
  elif path.endswith(".safetensors"):
    paths = [path]
  else:
    return None
  from safetensors import safe_open

  counts: dict[str, int] = {}
  try:
    for shard in paths:
      with safe_open(shard, framework="numpy") as handle:
        for key in handle.keys():
          dtype = _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype())
          if dtype:
            counts[dtype] = counts.get(dtype, 0) + 1
  except Exception:  # pylint: disable=broad-except  # the conversion itself names a bad file
    return None
  return max(counts, key=counts.get) if counts else None


def _open_safetensors(path: str) -> TensorFiles:
  from safetensors import safe_open

  try:
    handle = safe_open(path, framework="numpy")
    keys = list(handle.keys())
  except Exception as e:  # safetensors raises its own error types for truncated headers.
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e

  def loader(key):
    def load():
      try:
        return handle.get_tensor(key)
      except TypeError:
        # bfloat16 has no numpy dtype in safetensors' numpy backend: go through torch.
        return _load_via_torch(path, key)
    return load

  return TensorFiles({k: loader(k) for k in keys}, dict.fromkeys(keys, path))


def _load_via_torch(path: str, key: str) -> np.ndarray:
  import torch  # only needed for bfloat16 tensors
  from safetensors import safe_open

  with safe_open(path, framework="pt") as f:
    return f.get_tensor(key).to(torch.float32).numpy()


def _open_pickle(path: str) -> TensorFiles:
  import torch

  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, Mapping):
    raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
  loaders = {k: (lambda t=t: t.detach().to(torch.float32).numpy()
                 if t.dtype == torch.bfloat16 else t.detach().numpy()) for k, t in state.items()}
  return TensorFiles(loaders, dict.fromkeys(state, path))


# numpy dtype name -> safetensors dtype tag.
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                      "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "complex64": "C64",
                      "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
                      "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8",
                      "bool": "BOOL"}


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor known by shape and dtype, whose values `fetch()` produces only when written."""
  shape: tuple[int, ...]
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]


def save_safetensors(tensors: Mapping[str, np.ndarray | LazyTensor]
                     | Iterable[tuple[str, np.ndarray | LazyTensor]],
                     path: str, *, bar=None) -> None:
  """Writes a .safetensors file one tensor at a time, atomically (temp file + rename).

  `tensors`: {name: array} or (name, array) pairs, in file order. A `LazyTensor` value is fetched
  (and cast to its dtype) only when its bytes are written, after the header has been built from
  shapes alone, so a model larger than host memory can be exported. `bar`: anything with
  `update(1)`, called per tensor written. An interrupted write leaves no half file behind.
  """
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  entries = []
  for key, value in items:
    if not isinstance(value, LazyTensor):
      array = np.asarray(value)
      value = LazyTensor(array.shape, array.dtype, lambda array=array: array)
    entries.append((key, value))
  header, offset = {}, 0
  for key, e in entries:
    name = np.dtype(e.dtype).name
    if name not in SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {key!r} has dtype {name}, which safetensors cannot "
                       f"store; allowed: {sorted(SAFETENSORS_DTYPES)}")
    if key in header:
      raise ValueError(f"{path}: tensor {key!r} is given twice")
    size = int(np.prod(e.shape, dtype=np.int64)) * np.dtype(e.dtype).itemsize
    header[key] = {"dtype": SAFETENSORS_DTYPES[name], "shape": [int(n) for n in e.shape],
                   "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the tensor data starts 8-byte aligned
  with files.atomic_write(path) as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for key, e in entries:
      # order='C', not ascontiguousarray, which turns a 0-d array into shape (1,).
      array = np.asarray(np.asarray(e.fetch()).astype(e.dtype, copy=False), order="C")
      if tuple(array.shape) != tuple(e.shape):
        raise CheckpointError(f"{path}: tensor {key!r} has shape {array.shape}, the header "
                              f"says {tuple(e.shape)}")
      f.write(array.tobytes())
      if bar is not None:
        bar.update(1)
