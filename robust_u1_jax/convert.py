r"""Convert between a BAGEL / Robust-U1 model directory and an Orbax model checkpoint.

  python -m robust_u1_jax.convert --from hf --src BAGEL-7B-MoT --dst ckpt/bagel_orbax
  python -m robust_u1_jax.convert --to hf --src ckpt/bagel_orbax --dst out/Robust-U1 \
      --save_dtype bfloat16

`--from hf` reads ema.safetensors (or model.safetensors / a sharded index), ae.safetensors,
llm_config.json and vit_config.json and writes an Orbax checkpoint (params/, bagel_config.json,
tokenizer files). `--to hf` writes the model directory back. Parameters are sharded over the
devices while converting (`--fsdp`), so a model larger than one accelerator converts too. An
existing destination is refused unless --overwrite, which replaces only a model directory, an
Orbax model checkpoint or an empty folder (never a file, the source, or a folder holding it). A
bad input (a missing or unusable source, a stage's workdir given for its model, an unwritable
destination, a flag of the other direction, an --fsdp beyond the devices, a NaN or infinite
weight) is one `error:` line and exit status 2. A source without tokenizer files converts with a
note (`recover`, `answer`, `evaluate` and training read them beside the model), as does one whose
bfloat16 weights the float32 default widens.
"""

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import os
import sys

from absl import app
from absl import flags
import jax

from robust_u1_jax import files, sharding
from robust_u1_jax.checkpoints import bagel_dir, orbax_io, tensor_files

FORMATS = ("hf",)
_FROM = flags.DEFINE_enum("from", None, FORMATS, "Import this format into an Orbax checkpoint.")
_TO = flags.DEFINE_enum("to", None, FORMATS, "Export an Orbax checkpoint to this format.")
_SRC = flags.DEFINE_string("src", None, "Source directory.")
_DST = flags.DEFINE_string("dst", None, "Destination directory: a new one, or a model to replace "
                           "with --overwrite.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace an existing destination: a model directory, an Orbax model "
    "checkpoint or an empty folder.")
_ALLOW_PICKLE = flags.DEFINE_bool(
    "allow_pickle", False, "Accept pytorch_model.bin (loaded with torch.load(weights_only=True)).")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "float32", ("float32", "bfloat16"), "--from hf: dtype of the stored params.")
_SAVE_DTYPE = flags.DEFINE_enum(
    "save_dtype", None, ("float32", "bfloat16", "float16"),
    "--to hf: cast tensors on write (BAGEL releases bfloat16); default: the parameter dtype.")
_FSDP = flags.DEFINE_integer(
    "fsdp", -1, "Shard parameters over this many devices while converting (-1: all).")
# Flags of one direction only: refused in the other, so a mistyped command does not silently
# write another dtype than asked.
FROM_ONLY = ("param_dtype", "allow_pickle")
TO_ONLY = ("save_dtype",)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar over tensors.")


def _mesh():
  count = jax.device_count()
  if _FSDP.value == 0 or _FSDP.value < -1 or _FSDP.value > count:
    here = "1 (the one device here)" if count == 1 else f"1 to {count} (the devices here)"
    raise app.UsageError(f"--fsdp {_FSDP.value}: give {here}, or -1 for all")
  if _FSDP.value == 1 or jax.device_count() == 1:
    return None
  fsdp = _FSDP.value
  devices = jax.devices()[: fsdp] if fsdp > 0 else jax.devices()
  return sharding.make_mesh({"data": 1, "fsdp": len(devices), "tensor": 1}, devices)


def check_source(src: str, to_hf: bool) -> None:
  """--src is what the direction reads: an Orbax model checkpoint for --to (a stage's workdir
  holds one in model/), a BAGEL model directory for --from."""
  if not os.path.isdir(src):
    raise cli.PathError(f"--src {src}: no such folder" if not os.path.exists(src) else
                        f"--src {src}: a file; give a folder")
  has_config = os.path.isfile(os.path.join(src, orbax_io.CONFIG))
  if to_hf and not has_config and os.path.isdir(os.path.join(src, "model")):
    raise cli.PathError(f"--src {src}: a stage's workdir, not a model checkpoint; its model is "
                        f"--src {os.path.join(src, 'model')}")
  if to_hf and not has_config and os.path.isfile(os.path.join(src, bagel_dir.LLM_CONFIG)):
    raise cli.PathError(f"--src {src}: a BAGEL model directory (it has {bagel_dir.LLM_CONFIG}); "
                        "import it with --from hf, or give an Orbax checkpoint to --to hf")
  if not to_hf and has_config:
    raise cli.PathError(f"--src {src}: an Orbax checkpoint (it has {orbax_io.CONFIG}); convert "
                        "it with --to hf, or give a BAGEL model directory to --from hf")
  if not orbax_io.is_model(src):  # before the side files' checks and notes
    raise cli.PathError(f"--src {orbax_io.not_a_model(src)}")


def check_side_files(src: str) -> None:
  """The files a conversion copies beside the model are readable (SideFileError naming one that
  is not: `recover` would refuse the converted model); a note where tokenizer files are missing."""
  from robust_u1_jax.inference import images, recovery

  images.ImageRules.for_model_dir(src)
  recovery.Guidance.for_model_dir(src)
  recovery.instruction_of_model(src)
  if not any(os.path.isfile(os.path.join(src, name)) for name in ("tokenizer.json", "vocab.json")):
    print(f"note: {src} has no tokenizer files (tokenizer.json, or vocab.json and merges.txt); "
          "recover, answer, evaluate and a stage started from the model read them beside it: "
          "copy them into --dst (or give recover and answer --tokenizer DIR, a stage "
          "--config.data.tokenizer_dir=DIR)", file=sys.stderr)


def upcast_note(src: str, param_dtype: str) -> str | None:
  """A note when --from hf widens the weights (BAGEL releases bfloat16): the Orbax checkpoint,
  and a model written back from it, double in size. The weights' dtype is read from their files'
  headers; where those cannot say (a pickle), from llm_config.json's torch_dtype."""
  try:
    stored = tensor_files.stored_float_dtype(bagel_dir.find_weight_file(src))
  except OSError:  # the conversion itself names a missing file
    stored = None
  declared = None
  if stored is None:
    try:
      declared = files.read_json(os.path.join(src, bagel_dir.LLM_CONFIG)).get("torch_dtype")
    except (OSError, ValueError, AttributeError):  # the conversion itself names a bad file
      return None
  dtype = stored or declared
  if dtype not in ("bfloat16", "float16") or param_dtype != "float32":
    return None
  said = (f"its weights are stored as {dtype}" if stored else
          f"its {bagel_dir.LLM_CONFIG} says its weights are {dtype}")
  return (f"note: {src}: {said}; the checkpoint stores them as float32 (--param_dtype), twice "
          "their size: --param_dtype bfloat16 keeps them as they are, --to hf --save_dtype "
          f"{dtype} writes them back as {dtype}")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  missing = [f"--{f.name}" for f in (_SRC, _DST) if not f.value]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  if (_FROM.value is None) == (_TO.value is None):
    raise app.UsageError("give exactly one of --from hf (model dir -> Orbax) or --to hf "
                         "(Orbax -> model dir)")
  stray = [f"--{name}" for name in (FROM_ONLY if _TO.value else TO_ONLY)
           if flags.FLAGS[name].present]
  if stray:
    raise app.UsageError(f"{', '.join(stray)}: only used with --{'from' if _TO.value else 'to'} "
                         "hf")
  check_source(_SRC.value, to_hf=bool(_TO.value))
  check_side_files(_SRC.value)
  try:
    orbax_io.check_paths(_SRC.value, _DST.value, _OVERWRITE.value)
  except (ValueError, FileExistsError) as e:
    raise cli.PathError(f"--dst {e}") from None
  cli.output_dir(os.path.dirname(os.path.abspath(_DST.value)), f"--dst {_DST.value}: its folder",
                 create=False)
  note = upcast_note(_SRC.value, _PARAM_DTYPE.value) if _FROM.value else None
  if _FROM.value:
    out = orbax_io.hf_to_orbax(_SRC.value, _DST.value, overwrite=_OVERWRITE.value,
                               allow_pickle=_ALLOW_PICKLE.value, param_dtype=_PARAM_DTYPE.value,
                               mesh=_mesh(), progress=_PROGRESS.value)
  else:
    out = orbax_io.orbax_to_hf(_SRC.value, _DST.value, overwrite=_OVERWRITE.value,
                               save_dtype=_SAVE_DTYPE.value, mesh=_mesh(),
                               progress=_PROGRESS.value)
  print(f"wrote {out}")
  if note:  # after it, not above an error of the conversion's (a truncated file, a shape)
    print(note, file=sys.stderr)
  return 0


if __name__ == "__main__":
  cli.run(main)
