"""Orbax checkpoints of a whole `Bagel` model, and conversion to and from a BAGEL model directory.

An Orbax model checkpoint is a directory:
  params/             `ocp.StandardCheckpointer` of the parameters (a nested dict of arrays, keyed
                      by the model's state path, so it does not depend on Flax's Variable classes)
  bagel_config.json   the full BagelConfig (`bagel_dir.config_to_dict`), enough to rebuild the model
  tokenizer files     copied from the source, so the directory is self-contained
Restoring places every array directly onto its mesh sharding; nothing is initialised first.
Checkpoints written before the decoder and ViT layers were stacked (`models.layers.stack`) hold one
array per layer (`...layers.{i}....`); they restore too, each layer onto its shards, and are
stacked on the devices one parameter at a time.
`load_pretrained` accepts either kind of directory, so training can start from a released BAGEL /
Robust-U1 model or from a converted checkpoint alike.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from robust_u1_jax import files
from robust_u1_jax.checkpoints import bagel_dir, bagel_export, loader
from robust_u1_jax.checkpoints.clip_keys import CLIP_FILE
from robust_u1_jax.checkpoints.key_table import CheckpointError
from robust_u1_jax.models.bagel import Bagel

PARAMS = "params"
CONFIG = bagel_dir.ORBAX_CONFIG
REPORT = "report.json"  # an evaluation's, which a user may take for the model it evaluated


def _nested(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return out


def is_orbax_model(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isdir(os.path.join(path, PARAMS))


def is_model(path: str) -> bool:
  """An Orbax model checkpoint or a BAGEL model directory (by their config files)."""
  return is_orbax_model(path) or os.path.isfile(os.path.join(path, bagel_dir.LLM_CONFIG))


def models_below(path: str, depth: int = 4, limit: int = 200) -> list[str]:
  """Model folders under `path` (not `path` itself), at most `depth` levels down, of the first
  `limit` folders looked at, in order."""
  found, seen = [], 0
  level = [path] if os.path.isdir(path) else []
  for _ in range(depth):
    below = []
    for folder in level:
      try:
        names = sorted(os.listdir(folder))
      except OSError:
        continue
      for name in names:
        child = os.path.join(folder, name)
        if os.path.isdir(child) and seen < limit:
          seen += 1
          (found if is_model(child) else below).append(child)
    level = below
  return found


def _evaluated_model(report_dir: str) -> str | None:
  """The model an evaluation's report names in its settings, or None where it names none."""
  try:
    model = files.read_json_object(os.path.join(report_dir, REPORT)).get("settings", {}).get(
        "model")
  except (OSError, ValueError, AttributeError):  # unreadable, or settings not an object
    return None
  return model if isinstance(model, str) else None


def not_a_model(path: str) -> str:
  """Why `path` (a folder) is no model, naming what one holds; a stage's unfinished workdir and
  its training checkpoints are told apart, with where the model will be."""
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints) and not os.path.isdir(os.path.join(path, "model")):
    steps = sorted(int(n) for n in os.listdir(checkpoints) if n.isdigit())
    stopped = f"at step {steps[-1]}" if steps else "before its first checkpoint"
    return (f"{path} is a stage's workdir without its model/ yet: its run stopped {stopped}, "
            "before its last step; run its training command again to finish it, or give a "
            "finished one")
  if os.path.isfile(os.path.join(path, CLIP_FILE)):
    return (f"{path} holds a CLIP model ({CLIP_FILE}: the RL stage's reward model, "
            "rl.clip_checkpoint), not a BAGEL model; give a BAGEL or Robust-U1 model")
  if os.path.isfile(os.path.join(path, REPORT)):
    evaluated = _evaluated_model(path)
    return (f"{path} is an evaluation's output ({REPORT}), not a model"
            + (f"; the model it evaluated is {evaluated}" if evaluated else ""))
  held = set(os.listdir(path)) if os.path.isdir(path) else set()
  bagel_files = {bagel_dir.VIT_CONFIG, bagel_dir.VAE_FILE, *bagel_dir.WEIGHT_FILES}
  if held & bagel_files:  # is_model found no LLM_CONFIG, or this would be a model
    return (f"{path} has a BAGEL model directory's {', '.join(sorted(held & bagel_files))} but "
            f"no {bagel_dir.LLM_CONFIG}: copy it from the model's release")
  if PARAMS in held:
    return (f"{path} has an Orbax model checkpoint's {PARAMS}/ but no {CONFIG}: copy it from "
            "where the checkpoint was written")
  if CONFIG in held:
    return (f"{path} has an Orbax model checkpoint's {CONFIG} but no {PARAMS}/, its weights: "
            "copy the folder from where the checkpoint was written")
  message = (f"{path} is neither a BAGEL model directory ({bagel_dir.LLM_CONFIG}, "
             f"{bagel_dir.VIT_CONFIG}, ema.safetensors, {bagel_dir.VAE_FILE}) nor an Orbax model "
             f"checkpoint ({CONFIG}, {PARAMS}/)")
  # A folder of stages' workdirs (the demo's: vae, clip, ..., reason): name them.
  stages = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n, "model"))
                  ) if os.path.isdir(path) else []
  if stages:
    last = "reason" if "reason" in stages else stages[-1]
    message += (f"; it holds stages' workdirs ({', '.join(stages)}): give one, e.g. "
                f"{os.path.join(path, last)}")
  elif below := models_below(path):
    # A download's layout: a folder above the model, Hugging Face's cache (snapshots/<hash>/).
    message += f"; a model is below it: {', '.join(below[:3])}{' ...' if len(below) > 3 else ''}"
  parts = os.path.abspath(path).split(os.sep)
  if "checkpoints" in parts[-2:]:
    workdir = os.sep.join(parts[:parts.index("checkpoints", len(parts) - 2)])
    model = os.path.join(workdir, "model")
    message += (f"; it is a stage's training checkpoint: the stage's model is {model}"
                + ("" if os.path.isdir(model) else " once its run has finished"))
  return message


def save_orbax(model: Bagel, path: str, *, tokenizer_dir: str | None = None,
               overwrite: bool = False, write_beside: Callable[[str], None] | None = None) -> str:
  """Writes `model`'s parameters and config as an Orbax model checkpoint (atomically).

  Every process must call it (Orbax writes each process's shards); returns the absolute path.
  `write_beside(folder)` (process 0) adds files of the caller's into the folder before it takes
  `path`'s place, so an interrupted save never leaves a model without them.
  """
  params = {p: v.get_value() for p, v in loader.param_variables(model).items()}
  with bagel_export.atomic_directory(path, overwrite=overwrite, all_processes=True) as tmp:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS), _nested(params))
      checkpointer.wait_until_finished()
    if jax.process_index() == 0:
      bagel_export.write_json(os.path.join(tmp, CONFIG), bagel_dir.config_to_dict(model.config))
      if tokenizer_dir is not None:
        bagel_export.copy_tokenizer_files(tokenizer_dir, tmp)
      if write_beside is not None:
        write_beside(tmp)
  return os.path.abspath(path)


def read_orbax_config(path: str, **llm_overrides):
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path}: missing {CONFIG}; not an Orbax model checkpoint (which "
                            "`convert --from hf` and training write; a BAGEL model directory has "
                            "llm_config.json instead)")
  return bagel_dir.config_from_dict(files.read_json_object(file), source=file, **llm_overrides)


def _first_sentence(error: BaseException) -> str:
  """What first went wrong (the innermost cause: Orbax wraps TensorStore's error), without the
  library advice that follows it (Orbax suggests options of its API)."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip()
  return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(error).__name__


class _OrbaxWarnings(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "orbax" not in record.pathname


@contextlib.contextmanager
def _without_orbax_warnings() -> Iterator[None]:
  """Drops Orbax's warnings (absl's logger) for the block: reading a damaged checkpoint's
  metadata, it warns in a line of its own above the error that names what is missing."""
  absl_logger, quiet = logging.getLogger("absl"), _OrbaxWarnings()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def load_orbax(path: str, *, mesh: jax.sharding.Mesh | None = None, dtype=None, param_dtype=None,
               remat: str | None = None, attention: str | None = None) -> Bagel:
  """Restores a `save_orbax` checkpoint onto `mesh` (device 0 without one).

  `dtype`, `param_dtype`, `remat`, `attention` override the saved LLM config; Orbax casts the
  stored arrays to the parameter dtype while reading.
  """
  path = os.path.abspath(path)
  config = read_orbax_config(path, dtype=dtype, param_dtype=param_dtype, remat=remat,
                             attention=attention)
  params_dir = os.path.join(path, PARAMS)
  if not os.path.isdir(params_dir):
    raise FileNotFoundError(f"{path}: missing the {PARAMS}/ directory of the Orbax checkpoint")
  model = bagel_dir.abstract_bagel(config, mesh)
  variables = loader.param_variables(model)
  slots = loader.layer_slots(variables)
  with ocp.StandardCheckpointer() as checkpointer:
    with _without_orbax_warnings():
      metadata = checkpointer.metadata(params_dir).item_metadata
    if metadata is None:  # Orbax returns none where its _METADATA file or its arrays' are gone
      lost = ("no _METADATA" if not os.path.isfile(os.path.join(params_dir, "_METADATA"))
              else "its _METADATA is there, its array files are not readable")
      raise CheckpointError(f"{params_dir}: not a whole Orbax checkpoint ({lost}; a copy cut "
                            "short?): write or copy it again")
    stored_shapes = {p: getattr(m, "shape", None)
                     for p, m in traverse_util.flatten_dict(metadata.tree, sep=".").items()}
    stored = set(stored_shapes)
    per_layer = stored != set(variables) and stored == set(slots)  # written before stacking
    if per_layer:
      target = {}
      for p, s in slots.items():
        like = variables[s.path].get_value()
        sharding = like.sharding if s.layer is None else loader.layer_sharding(like.sharding)
        target[p] = jax.ShapeDtypeStruct(loader.slot_shape(variables[s.path], s), like.dtype,
                                         sharding=sharding)
    else:
      missing, extra = sorted(set(variables) - stored), sorted(stored - set(variables))
      if missing or extra:
        raise CheckpointError(f"{params_dir}: checkpoint does not fit the model of {CONFIG}: "
                              f"missing {missing[:10]}, unexpected {extra[:10]}")
      target = {p: v.get_value() for p, v in variables.items()}
    _check_shapes(params_dir, stored_shapes, target)
    try:
      restored = traverse_util.flatten_dict(checkpointer.restore(params_dir, _nested(target)),
                                            sep=".")
    except Exception as e:  # Orbax wraps TensorStore's reading errors in a bare Exception
      raise CheckpointError(f"{params_dir}: its arrays cannot be read (a file cut short, or "
                            f"other shapes than {CONFIG} describes): {_first_sentence(e)}") from e
  if per_layer:
    layers_of: dict[str, list[str]] = {}
    for p, s in slots.items():
      layers_of.setdefault(s.path, []).append(p)
    for path, parts in layers_of.items():
      if slots[parts[0]].layer is None:
        continue
      parts.sort(key=lambda p: slots[p].layer)
      restored[path] = loader.stack_layers([restored.pop(p) for p in parts],
                                           variables[path].get_value().sharding)
  for p, variable in variables.items():
    variable.set_value(restored[p])
  return model


def _check_shapes(params_dir: str, stored: dict[str, Any], target: dict[str, Any]) -> None:
  """Names the first array whose stored shape differs from the model's (a config edited, or of
  another checkpoint), where Orbax's error names shapes alone."""
  misfits = [(p, tuple(stored[p]), tuple(t.shape)) for p, t in target.items()
             if stored.get(p) is not None and tuple(stored[p]) != tuple(t.shape)]
  if misfits:
    p, have, want = misfits[0]
    more = f" (and {len(misfits) - 1} more arrays)" if len(misfits) > 1 else ""
    raise CheckpointError(f"{params_dir}: array {p!r} has shape {have}, but the model of {CONFIG} "
                          f"expects {want}{more}: the checkpoint and its {CONFIG} do not match")


def load_pretrained(path: str, *, mesh: jax.sharding.Mesh | None = None, dtype=None,
                    param_dtype=None, remat: str | None = None, attention: str | None = None,
                    allow_pickle: bool = False, progress: bool = False) -> Bagel:
  """A model from a BAGEL / Robust-U1 model directory or an Orbax model checkpoint."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"model not found: {path}")
  if is_orbax_model(path):
    return load_orbax(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, remat=remat,
                      attention=attention)
  if os.path.isfile(os.path.join(path, bagel_dir.LLM_CONFIG)):
    return bagel_dir.load_model_dir(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype,
                                    remat=remat, attention=attention, allow_pickle=allow_pickle,
                                    progress=progress)
  raise FileNotFoundError(not_a_model(path))


def hf_to_orbax(src: str, dst: str, *, overwrite: bool = False, allow_pickle: bool = False,
                param_dtype=None, mesh: jax.sharding.Mesh | None = None,
                progress: bool = False) -> str:
  """BAGEL model directory -> Orbax model checkpoint (tokenizer and side files copied along)."""
  check_paths(src, dst, overwrite)
  model = bagel_dir.load_model_dir(src, mesh=mesh, param_dtype=param_dtype,
                                   allow_pickle=allow_pickle, progress=progress)
  return save_orbax(model, dst, overwrite=overwrite, tokenizer_dir=_tokenizer_source(src),
                    write_beside=lambda folder: bagel_export.copy_side_files(src, folder))


def orbax_to_hf(src: str, dst: str, *, overwrite: bool = False, save_dtype=None,
                mesh: jax.sharding.Mesh | None = None, progress: bool = False) -> str:
  """Orbax model checkpoint -> BAGEL model directory (tokenizer and side files copied along)."""
  check_paths(src, dst, overwrite)
  model = load_orbax(src, mesh=mesh)
  try:
    return bagel_export.save_model_dir(
        model, dst, overwrite=overwrite, save_dtype=save_dtype,
        tokenizer_dir=_tokenizer_source(src), progress=progress,
        write_beside=lambda folder: bagel_export.copy_side_files(src, folder))
  except CheckpointError as e:  # a weight it cannot write: named with the checkpoint's folder
    raise CheckpointError(f"{src}: {e}") from None


def check_paths(src: str, dst: str, overwrite: bool) -> None:
  """A conversion from `src` to `dst` can start: `src` is a folder, `dst` is neither `src` nor a
  folder holding it or inside it (the write replaces `dst` whole), and `bagel_dir.
  check_destination` lets a model be written there. Errors name `dst` (or `src`) first. Checked
  before the (long) load, so a wrong path fails at once."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: source directory not found")
  source, target = os.path.realpath(src), os.path.realpath(dst)
  if target == source:
    raise ValueError(f"{dst}: the source folder itself; give another folder")
  if source.startswith(target.rstrip(os.sep) + os.sep):
    raise ValueError(f"{dst}: holds the source {src}, which writing there would delete; give a "
                     "folder outside it")
  if target.startswith(source + os.sep):
    raise ValueError(f"{dst}: inside the source {src}; give a folder outside it")
  bagel_export.check_destination(os.path.abspath(dst), overwrite)


def _tokenizer_source(src: str) -> str | None:
  present = any(os.path.isfile(os.path.join(src, n)) for n in ("tokenizer.json", "vocab.json"))
  return src if present else None

