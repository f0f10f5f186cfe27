"""Reading and writing PyTorch-format tensor files, one tensor at a time.

Safetensors files are memory-mapped, so importing a 7B checkpoint never holds more than one tensor
in host memory beyond the model itself. Pickle files (`*.bin`, `*.pt`) can run arbitrary code when
loaded, so they are refused unless the caller opts in, and then loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import numpy as np

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
    with open(path) as f:
      weight_map = json.load(f)["weight_map"]
    base = os.path.dirname(path)
    loaders, file_of = {}, {}
    for shard in sorted(set(weight_map.values())):
      part = open_tensor_files(os.path.join(base, shard))
      loaders.update(part.loaders)
      file_of.update(part.file_of)
    return TensorFiles(loaders, file_of)
  if path.endswith(".safetensors"):
    return _open_safetensors(path)
  if path.endswith(PICKLE_SUFFIXES):
    if not allow_pickle:
      raise ValueError(
          f"{path} is a pickle file, which can execute code when loaded; it is refused by default. "
          "Convert it to safetensors, or pass allow_pickle=True (--allow_pickle) to load it with "
          "torch.load(weights_only=True).")
    return _open_pickle(path)
  raise ValueError(f"{path}: unknown checkpoint format; expected .safetensors, "
                   f".safetensors.index.json or (opt-in) one of {PICKLE_SUFFIXES}")


def _open_safetensors(path: str) -> TensorFiles:
  from safetensors import safe_open

  name = os.path.basename(path)
  try:
    handle = safe_open(path, framework="numpy")
    keys = list(handle.keys())
  except Exception as e:  # safetensors raises its own error types for truncated headers.
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from e

  def loader(key):
    def load():
      try:
        return handle.get_tensor(key)
      except TypeError:
        # bfloat16 has no numpy dtype in safetensors' numpy backend: go through torch.
        return _load_via_torch(path, key)
    return load

  return TensorFiles({k: loader(k) for k in keys}, {k: name for k in keys})


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
  name = os.path.basename(path)
  loaders = {k: (lambda t=t: t.detach().to(torch.float32).numpy()
                 if t.dtype == torch.bfloat16 else t.detach().numpy()) for k, t in state.items()}
  return TensorFiles(loaders, {k: name for k in state})


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  """Writes tensors atomically (temp file + rename), so an interrupted export leaves no half file."""
  from safetensors.numpy import save_file

  tmp = path + ".tmp"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp)
  os.replace(tmp, path)
