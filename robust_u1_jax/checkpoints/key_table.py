"""One mechanism for mapping PyTorch checkpoint tensors onto Flax NNX state and back.

A key table is a list of `Rule`s. Each rule pairs a PyTorch key template with a Flax state path
template (`"model.layers.{i}.mlp.up_proj.weight"` <-> `"layers.{i}.mlp.up.kernel"`) and a
`Transform` that converts the tensor layout in both directions. Placeholders match integers.
Import walks the checkpoint's keys, export walks the model's state, so both directions stay in sync
with one table per component and per on-disk naming.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
  """Layout change from the checkpoint's tensor to the Flax parameter (and its inverse)."""
  name: str
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda x: x, lambda x: x)
# torch.nn.Linear stores (out, in); a Flax kernel is (in, out).
LINEAR = Transform("linear", lambda x: x.T, lambda x: x.T)
# torch.nn.Conv2d stores (out, in, kh, kw); Flax convs use (kh, kw, in, out).
CONV2D = Transform(
    "conv2d", lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))


def conv_as_linear(patch: int, channels: int = 3) -> Transform:
  """A Conv2d patch embedding stored as (out, in, kh, kw) -> Linear kernel over (kh, kw, in)."""
  def to_flax(w):
    out = w.shape[0]
    return w.transpose(2, 3, 1, 0).reshape(patch * patch * channels, out)

  def to_torch(k):
    out = k.shape[1]
    return k.reshape(patch, patch, channels, out).transpose(3, 2, 0, 1)

  return Transform(f"conv_as_linear{patch}", to_flax, to_torch)


@dataclasses.dataclass(frozen=True)
class Rule:
  torch: str
  flax: str
  transform: Transform = IDENTITY

  def torch_regex(self) -> re.Pattern[str]:
    return _template_regex(self.torch)

  def flax_regex(self) -> re.Pattern[str]:
    return _template_regex(self.flax)


def _template_regex(template: str) -> re.Pattern[str]:
  parts = re.split(r"\{(\w+)\}", template)
  pattern = "".join(
      re.escape(p) if i % 2 == 0 else rf"(?P<{p}>\d+)" for i, p in enumerate(parts))
  return re.compile(pattern)


def prefixed(rules: Iterable[Rule], torch_prefix: str = "", flax_prefix: str = "") -> list[Rule]:
  """The same rules for a sub-model that lives under a prefix on either side."""
  return [dataclasses.replace(r, torch=torch_prefix + r.torch, flax=flax_prefix + r.flax)
          for r in rules]


class CheckpointError(ValueError):
  """A checkpoint does not fit the model: the message names the key, file and shapes."""


class KeyTable:
  """Compiled rules: finds the rule for a checkpoint key or a Flax path."""

  def __init__(self, rules: Iterable[Rule]):
    self.rules = list(rules)
    self._torch = [(r.torch_regex(), r) for r in self.rules]
    self._flax = [(r.flax_regex(), r) for r in self.rules]

  def to_flax_path(self, torch_key: str) -> tuple[str, Transform] | None:
    for regex, rule in self._torch:
      m = regex.fullmatch(torch_key)
      if m:
        return rule.flax.format(**m.groupdict()), rule.transform
    return None

  def to_torch_key(self, flax_path: str) -> tuple[str, Transform] | None:
    for regex, rule in self._flax:
      m = regex.fullmatch(flax_path)
      if m:
        return rule.torch.format(**m.groupdict()), rule.transform
    return None


def flat_paths(state: Any) -> dict[str, Any]:
  """Flattens an nnx.State (or nested dict) to {'a.b.0.kernel': leaf}."""
  from flax import nnx  # local: keeps this module importable for pure-numpy tools

  if isinstance(state, nnx.State):
    items = nnx.to_flat_state(state)
  else:
    items = _flatten_dict(state)
  out = {}
  for path, leaf in items:
    out[".".join(str(p) for p in path)] = leaf
  return out


def _flatten_dict(tree: Mapping, prefix: tuple = ()) -> list[tuple[tuple, Any]]:
  items = []
  for k, v in tree.items():
    if isinstance(v, Mapping):
      items.extend(_flatten_dict(v, prefix + (k,)))
    else:
      items.append((prefix + (k,), v))
  return items


def leaf_value(leaf: Any) -> Any:
  """The array held by an nnx.Variable (or the leaf itself)."""
  return leaf.get_value() if hasattr(leaf, "get_value") else leaf


def matches_any(patterns: Iterable[str]) -> Callable[[str], bool]:
  """A predicate: does a key (or path) match one of the regexes `patterns` whole."""
  compiled = [re.compile(p) for p in patterns]
  return lambda key: any(r.fullmatch(key) for r in compiled)


def non_finite(array: np.ndarray) -> str:
  """'holds N NaN or infinite value(s) of M (...)' for a float array holding any, else ''."""
  if not (array.dtype.kind == "f" or array.dtype.name == "bfloat16"):  # bfloat16 is kind "V"
    return ""
  bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
  return (f"holds {bad} NaN or infinite value(s) of {np.size(array)} (a damaged file, or "
          "weights saved after a run diverged)") if bad else ""


def convert_to_flax(
    tensors: Mapping[str, Callable[[], np.ndarray]],
    table: KeyTable,
    expected: Mapping[str, tuple[tuple[int, ...], Any]],
    *,
    source: str,
    source_of: Mapping[str, str] | None = None,
    optional: Iterable[str] = (),
    ignore: Iterable[str] = (),
) -> Iterable[tuple[str, np.ndarray]]:
  """Yields (flax_path, array) for every checkpoint tensor, converted and checked.

  Args:
    tensors: checkpoint key -> loader (called once, so memory-mapped files load one tensor at a
      time).
    table: the rules for this checkpoint's naming.
    expected: flax path -> (shape, dtype) of the model's parameters.
    source: the checkpoint's file name(s), for error messages.
    source_of: optional key -> file name, for multi-file checkpoints.
    optional: regexes of Flax paths the checkpoint may omit (rebuilt by the model, e.g. fixed
      sin-cos tables).
    ignore: regexes of checkpoint keys to skip (e.g. buffers such as rotary inv_freq).
  """
  ignored, is_optional = matches_any(ignore), matches_any(optional)
  unexpected, seen, where_of = [], set(), {}
  for key in tensors:
    if ignored(key):
      continue
    hit = table.to_flax_path(key)
    where = (source_of or {}).get(key, source)
    if hit is None or hit[0] not in expected:
      unexpected.append(key)
      where_of[key] = where
      continue
    path, transform = hit
    stored = np.asarray(tensors[key]())
    shape, dtype = expected[path]
    # Integers cast to a float parameter would read as weights.
    if stored.dtype.kind in "biu" and np.dtype(dtype).kind not in "biu":
      raise CheckpointError(f"{where}: tensor {key!r} holds {stored.dtype} values, but the "
                            f"model's {path!r} is a {np.dtype(dtype).name} weight")
    try:
      array = transform.to_flax(stored)
    except ValueError:  # a layout change of another rank (a conv's transpose of a 2-D tensor)
      array = None
    if array is None or tuple(array.shape) != tuple(shape):
      raise _misfit(where, key, stored, path, shape, transform)
    # A NaN or infinite weight turns every output NaN, many steps from its cause: refused here,
    # where the key and file can still be named.
    if bad := non_finite(stored):
      raise CheckpointError(f"{where}: tensor {key!r} {bad}")
    seen.add(path)
    yield path, array.astype(dtype)
  # Both halves in one message: a renamed key is one unexpected and one missing tensor.
  problems = []
  if unexpected:
    model_keys = [hit[0] for p in expected if (hit := table.to_torch_key(p))]
    past = _layers_past(unexpected, model_keys, "the model's last (the weights hold more layers "
                        "than the model's config describes)")
    problems.append(f"{len(unexpected)} unexpected tensor(s) that the model has no place for"
                    + past + ": " + ", ".join(f"{k} (in {where_of[k]})" for k in unexpected[:20])
                    + (" ..." if len(unexpected) > 20 else ""))
  missing = [p for p in expected if p not in seen and not is_optional(p)]
  if missing:
    keys = [(table.to_torch_key(p) or ("?",))[0] for p in missing]
    names = [f"{k} (model path {p})" for k, p in zip(keys[:8], missing)]
    past = _layers_past(keys, tensors, "its last (the model's config describes more layers than "
                        "the weights hold)")
    problems.append(f"{len(missing)} tensor(s) missing from the checkpoint{past}: "
                    + ", ".join(names) + (" ..." if len(missing) > 8 else ""))
  if problems:
    raise CheckpointError(f"{source}: " + "; and ".join(problems))


def _misfit(where: str, key: str, stored: np.ndarray, path: str, shape: Sequence[int],
            transform: Transform) -> CheckpointError:
  """A tensor of another shape than its parameter's: the shapes as the file stores them, which a
  user can look up, compared like with like; the model's own layout after."""
  wanted = tuple(transform.to_torch(np.empty(shape, np.float32)).shape)
  layout = "" if wanted == tuple(shape) else f" ({tuple(shape)} in the model's layout)"
  return CheckpointError(f"{where}: tensor {key!r} has shape {tuple(stored.shape)}, but the "
                         f"model's {path!r} expects {wanted} there{layout}.")


_LAYER_KEY = re.compile(r"^(.*\.layers)\.(\d+)\.")


def _layers_past(keys: Sequence[str], others: Iterable[str], last: str) -> str:
  """', all of layers a to b, past <last>' where every one of `keys` lies in a layer past the
  last of `others`' (same stack): a config that describes other layers than the weights hold,
  where the list alone reads as damaged weights."""
  held: dict[str, int] = {}
  for key in others:
    if m := _LAYER_KEY.match(key):
      held[m.group(1)] = max(held.get(m.group(1), -1), int(m.group(2)))
  found = [_LAYER_KEY.match(key) for key in keys]
  if not all(m and m.group(1) in held and int(m.group(2)) > held[m.group(1)] for m in found):
    return ""
  layers = sorted({int(m.group(2)) for m in found})
  span = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]} to {layers[-1]}"
  return f", all of {span}, past {last}"


def convert_to_torch(
    flat_state: Mapping[str, Any], table: KeyTable, *, skip: Iterable[str] = ()
) -> dict[str, np.ndarray]:
  """Flat Flax state -> {checkpoint key: numpy array in PyTorch layout}."""
  skipped = matches_any(skip)
  out = {}
  for path, leaf in flat_state.items():
    if skipped(path):
      continue
    hit = table.to_torch_key(path)
    if hit is None:
      raise CheckpointError(f"no checkpoint key for model parameter {path!r}: add a rule to the "
                            "key table.")
    key, transform = hit
    # order='C', not ascontiguousarray, which turns a 0-d tensor (CLIP's logit_scale) into (1,).
    out[key] = np.asarray(transform.to_torch(np.asarray(leaf_value(leaf))), order="C")
  return out
