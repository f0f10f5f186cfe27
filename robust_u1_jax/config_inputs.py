"""The files and folders a validated stage config names (`check_inputs`), checked by the entry
modules before any model is built, so a wrong path stops a run at once with the field's name (not
after minutes of compilation).
"""

import glob
import json
import os

import ml_collections

from robust_u1_jax.config_lib import ConfigError, samples_recoveries
from robust_u1_jax.data import image_files  # the standard library only


def _remote(path: str) -> bool:
  return "://" in path  # gs://...: opened by the library that reads it


def _check_path(field: str, path: str, kind: str, fix: str) -> None:
  """`kind`: 'file', 'folder' or 'any'."""
  if not path or _remote(path):
    return
  if not os.path.exists(path):
    what = "file or folder" if kind == "any" else kind
    raise ConfigError(f"config field {field} = {path!r}: no such {what}; give {fix}")
  if kind == "folder" and not os.path.isdir(path):
    raise ConfigError(f"config field {field} = {path!r}: a file, not a folder; give {fix}")
  if kind == "file" and not os.path.isfile(path):
    raise ConfigError(f"config field {field} = {path!r}: a folder, not a file; give {fix}")


PARQUET_EXTENSIONS = (".parquet", ".pq")
TABLE_EXTENSIONS = (".tsv", ".csv", *PARQUET_EXTENSIONS)
_TABLE = ("a VQA .tsv, .csv or .parquet table, a folder of .parquet shards or a pattern of "
          "them (data/test-*.parquet)")


def check_table(field: str, path: str) -> None:
  """A benchmark table: a file of a table's extension, a folder holding .parquet files (a
  Hugging Face dataset's shards), or a pattern of such shards (`data/test-*.parquet`)."""
  from robust_u1_jax.data import sources_vqa

  if path and not _remote(path) and sources_vqa.is_pattern(path):
    if not any(f.endswith(".parquet") for f in glob.glob(path, recursive=True)):
      raise ConfigError(f"config field {field} = {path!r}: the pattern matches no .parquet "
                        f"file; give {_TABLE}")
    return
  _check_path(field, path, "any", _TABLE)
  if not path or _remote(path):
    return
  if os.path.isdir(path):
    if not any(name.endswith(".parquet") for _, _, names in os.walk(path)
               for name in names):
      raise ConfigError(f"config field {field} = {path!r}: a folder without .parquet files; "
                        f"give {_TABLE}")
  elif not path.lower().endswith(TABLE_EXTENSIONS):
    extension = os.path.splitext(path)[1]
    raise ConfigError(f"config field {field} = {path!r}: "
                      f"{f'a {extension} file' if extension else 'no file extension'}; give "
                      f"{_TABLE}")


DATA_PATH_KIND = {"folder": ("folder", "a folder of images"),
                  "jsonl": ("file", "a .jsonl file of records"),
                  "vqa_tsv": ("file", "a VQA .tsv (or .csv) table"),
                  "vqa_parquet": ("file", "a VQA .parquet table")}


def check_data_inputs(d: ml_collections.ConfigDict, prefix: str = "data") -> None:
  """The data source's path, TFDS data_dir and tokenizer folder exist."""
  if d.source in DATA_PATH_KIND:
    kind, what = DATA_PATH_KIND[d.source]
    _check_path(f"{prefix}.path", d.path, kind, f"{what} for {prefix}.source={d.source!r}")
  if d.source == "folder" and d.path and not _remote(d.path) and not image_files.holds_images(
      d.path):  # found here, not after the model is built (sources.ImageFolderSource)
    raise ConfigError(f"config field {prefix}.path = {d.path!r}: no image files under it (looked "
                      f"for {image_files.looked_for()}, recursively)")
  if d.source == "tfds":
    _check_path(f"{prefix}.tfds_data_dir", d.tfds_data_dir, "folder",
                "the TFDS data folder (empty: $TFDS_DATA_DIR)")
  _check_path(f"{prefix}.tokenizer_dir", d.tokenizer_dir, "folder",
              "a folder with tokenizer.json (empty: the built-in tokenizer)")


# How many images (their headers) or JSONL rows the start-up checks of the data read, spread over
# a folder's sorted list or a file's rows.
SIZE_PEEK = 64


def _model_sizes(path: str, d: ml_collections.ConfigDict) -> tuple | None:
  """(VAE, ViT) sizes the pipeline gives the image at `path`, from its header; None for one it
  skips (unreadable, too small)."""
  from PIL import Image

  from robust_u1_jax.data import transforms  # JAX: imported only for a stage that needs this

  try:
    with Image.open(path) as img:
      w, h = img.size
      if img.getexif().get(transforms.EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn
        h, w = w, h
  except Exception:  # noqa: BLE001 (the pipeline names and skips a bad file)
    return None
  return transforms.pipeline_sizes(h, w, d)


def _peeked_rows(path: str) -> list[tuple[int, object]]:
  """(line number, parsed row or None where it does not parse) of up to SIZE_PEEK rows spread
  over a JSONL file; read in two streamed passes, holding no copy of the file."""
  with open(path, encoding="utf-8", errors="replace") as f:
    step = max(1, sum(1 for line in f if line.strip()) // SIZE_PEEK)
    f.seek(0)
    rows = (row for row in enumerate(f, 1) if row[1].strip())
    lines = [row for k, row in enumerate(rows) if k % step == 0][:SIZE_PEEK]
  out = []
  for i, line in lines:
    try:
      out.append((i, json.loads(line)))
    except ValueError:
      out.append((i, None))  # the source names a bad row when it reads it
  return out


def _peeked_images(d: ml_collections.ConfigDict, rows: list[tuple[int, object]]
                   ) -> list[tuple[str, str]]:
  """(name shown, file) of up to SIZE_PEEK images spread over a folder's sorted list or a JSONL's
  `rows` (their "image", the corrupted one the step recovers)."""
  if d.source == "folder":
    names = sorted(image_files.image_paths(d.path))
    return [(n, os.path.join(d.path, n)) for n in names[::max(1, len(names) // SIZE_PEEK)]]
  base = os.path.dirname(os.path.abspath(d.path))
  return [(f"line {i} ({row['image']})", os.path.join(base, row["image"]))
          for i, row in rows if isinstance(row, dict) and isinstance(row.get("image"), str)]


def check_data_rows(c: ml_collections.ConfigDict) -> None:
  """What a stage needs of its folder's or JSONL's rows, read from SIZE_PEEK of them spread over
  it (the JSONL once for both checks): `check_questions`, `check_one_size`."""
  d = c.data
  if c.stage not in ("rl", "reason") or d.source not in ("folder", "jsonl") or not d.path or (
      _remote(d.path) or not os.path.exists(d.path)):
    return  # the other stages need neither: SFT's data is read as it trains
  rows = _peeked_rows(d.path) if d.source == "jsonl" and os.path.isfile(d.path) else []
  check_questions(c, rows)
  check_one_size(c, rows)


def check_questions(c: ml_collections.ConfigDict, rows: list[tuple[int, object]]) -> None:
  """The reasoning stage on a JSONL without questions (Robust-R1 pairs, which SFT and RL read) is
  refused here, not after the model is built, at a first batch whose every row is bad: none of
  the JSONL's peeked `rows` holds both texts it trains on (sources.QUESTION_KEYS)."""
  if c.stage != "reason" or c.data.source != "jsonl":
    return
  d = c.data
  if rows and not any(isinstance(row, dict) and "question" in row and "answer" in row
                      for _, row in rows):
    i, row = rows[0]
    held = ", ".join(row) if isinstance(row, dict) else "no JSON object"
    raise ConfigError(
        f"config field data.path = {d.path!r}: no row of the {len(rows)} read holds the "
        f"'question' and 'answer' texts the reasoning stage trains on (line {i} has: {held}); "
        "Robust-R1 pairs without them train the SFT and RL stages")


def check_one_size(c: ml_collections.ConfigDict, rows: list[tuple[int, object]]) -> None:
  """A stage that samples recoveries in its step (RL; reasoning with recoveries made on the fly)
  takes images of one model size: a folder or JSONL of several is refused here, before the model
  is built and its step compiled, not at the first batch that mixes them. Reads the headers of
  SIZE_PEEK images spread over the data, so data whose odd images are rare still fails later, at
  that batch, with the same fix."""
  d = c.data
  if not samples_recoveries(c):
    return
  seen: dict[tuple, str] = {}
  for shown, path in _peeked_images(d, rows)[:SIZE_PEEK]:
    sizes = _model_sizes(path, d)
    if sizes is not None:
      seen.setdefault(sizes, shown)
    if len(seen) > 1:
      listed = "; ".join(f"{name}: VAE {v[1]}x{v[0]}, ViT {t[1]}x{t[0]}"
                         for (v, t), name in seen.items())
      unset = [s for s, done in (("data.crop_square=True", d.crop_square),
                                  ("data.vae_min_side = data.vae_max_side",
                                   d.vae_min_side == d.vae_max_side)) if not done]
      fix = f"set {' and '.join(unset)}"
      if c.stage == "reason":
        fix += ", or precompute the recoveries (reason.recovered_images=cache)"
      raise ConfigError(
          f"config field data.path = {d.path!r}: images of several model sizes, width x height "
          f"({listed}), but the {c.stage} stage samples recoveries of one size per batch; {fix}")


def check_inputs(c: ml_collections.ConfigDict, *, recovery_cache: bool = True) -> None:
  """Every file and folder a validated config reads exists (ConfigError naming the field).
  `recovery_cache=False` leaves out reason.recovery_cache (for the command that writes it)."""
  if c.get("stage") == "eval":
    _check_path("model", c.model, "folder",
                "a model directory, an Orbax checkpoint or a stage's workdir")
    _check_path("clip_checkpoint", c.clip_checkpoint, "file",
                "a CLIP .safetensors file (empty: no CLIP similarity)")
    for name, path in c.compare.items():
      _check_path(f"compare.{name}", path, "folder", "a model to compare with (or empty)")
    for name, path in c.benchmarks.items():
      check_table(f"benchmarks.{name}", path)
    _check_path("rl_workdir", c.rl_workdir, "folder", "the RL stage's workdir (or empty)")
    return
  if c.get("stage") == "demo":
    return  # each part reads what the earlier parts wrote
  if c.init_from != "random":
    _check_path("init_from", c.init_from, "any",
                "'random', a BAGEL/Robust-U1 model directory, an Orbax checkpoint or the workdir "
                "of an earlier stage")
  check_data_inputs(c.data, "data")
  check_data_rows(c)
  if "eval_data" in c:
    check_data_inputs(c.eval_data, "eval_data")
  if "rl" in c:
    _check_path("rl.clip_checkpoint", c.rl.clip_checkpoint, "file",
                "a CLIP .safetensors file (or empty without a CLIP reward)")
  if "reason" in c and c.reason.recovered_images == "cache" and recovery_cache:
    _check_path("reason.recovery_cache", c.reason.recovery_cache, "folder",
                "the folder `python -m robust_u1_jax.recover --config ... --cache_dir DIR` wrote")
