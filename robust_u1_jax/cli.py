"""What every entry module (`python -m robust_u1_jax.<command>`) does the same way.

  from robust_u1_jax import cli  # before the modules that import jax or transformers
  ...
  if __name__ == "__main__":
    cli.run(main)

- A bad input is one line on stderr, `error: <the file, field or flag>: <what is wrong and what
  would fix it>`, and exit status 2. Bad inputs are the project's own error types
  (`BAD_INPUT_TYPES`: config errors, unusable checkpoints and model directories, undecodable or
  too small images, too many bad records, a diverged run (a non-finite loss), refused AOT
  configurations, `Error` and `PathError` raised by the entry modules), usage and flag errors,
  file-system errors about a path (missing, unreadable, read-only, a folder where a file belongs)
  and `sys.exit("message")` of a library.
  `--verbosity=1` or ROBUST_U1_TRACEBACK=1 prints the traceback above the line.
- Anything else is a bug, and Python prints its traceback as usual (exit status 1).
- `--help`, `--helpshort` and `--helpfull` print the help on stdout and exit 0 (absl exits 1).
- Ctrl-C prints `interrupted` and exits 130, as a shell reports SIGINT (a training loop catches it
  first: it saves a checkpoint, stops cleanly and exits 130 too, `checkpoint.Stopped`); SIGTERM
  within `signals.sigterm_stops` (the evaluation) stops the same way, `terminated`, 143. One that
  lands in a garbage collector callback, where Python drops it, is sent again
  (`redeliver_interrupts`). The process then ends without freeing JAX's client, which a compile
  may still be using (`leave_at_once`). Once the work is done, a Ctrl-C during the exit is
  ignored: the program's status stands (`exits_with`).
- A quiet start: importing this module silences the start-up messages of libraries that are not
  the project's (`QUIET_ENV`; set a variable yourself to override it), and absl logging shows
  warnings and errors only, as `warning: ...` lines, unless --verbosity is given (then absl's
  whole lines; Orbax logs every file at INFO).
- On CPU, malloc keeps freed memory for the next run of a program (`host_malloc`;
  ROBUST_U1_MALLOC=glibc turns it off).
- Compiled programs are kept between commands in `cache_dirs.compiled_programs()` unless
  JAX_COMPILATION_CACHE_DIR says elsewhere.
- `--config` overrides: an unknown field is named, with the nearest field names (or the fields
  there); a wrong type names the field's type; a missing config file names the config files
  beside it.

`output_dir` and `output_file` check an output location before any work is done (creating a
missing folder), so a bad --out or --workdir fails at once, not after a model has been built.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import signal
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import jax  # already imported by the package (flax): reading its config is free

from robust_u1_jax import cache_dirs
from robust_u1_jax import host_malloc
from robust_u1_jax import signals
from robust_u1_jax.data import image_files  # the standard library only

# Set before jax or transformers is imported by an entry module (both read them at import or at
# backend start): libtpu's C++ INFO lines, and transformers' "PyTorch was not found" advisory.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "1",  # XLA and libtpu C++ logging: warnings and errors only
    "TPU_STDERR_LOG_LEVEL": "2",  # libtpu on stderr: errors only (its log files keep the rest)
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
for _name, _value in QUIET_ENV.items():
  os.environ.setdefault(_name, _value)
# Before jax's backend starts its threads: on CPU, freed memory stays for the next step.
host_malloc.configure()
# Compiled programs persist between commands: JAX_COMPILATION_CACHE_DIR of your own puts them
# elsewhere, JAX_ENABLE_COMPILATION_CACHE=false compiles every time. The package's flax import has
# already read the environment into jax.config, so the default goes there (and into the
# environment, for the processes a command starts).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dirs.compiled_programs())
if jax.config.jax_compilation_cache_dir is None:
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + 2  # 128 + SIGINT, what a shell reports for a Ctrl-C
EXIT_TERMINATED = 128 + 15  # 128 + SIGTERM
TRACEBACK_ENV = "ROBUST_U1_TRACEBACK"
HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "-h", "-?")
# The project's bad-input exceptions, by the module that defines them: matched by name along the
# exception's class hierarchy, so this module imports none of them (it loads before jax).
BAD_INPUT_TYPES = (
    "robust_u1_jax.cli.Error",
    "robust_u1_jax.config_lib.ConfigError",
    "robust_u1_jax.checkpoints.key_table.CheckpointError",
    "robust_u1_jax.checkpoints.bagel_dir.SideFileError",
    "robust_u1_jax.training.checkpoint.UnreadableCheckpoints",
    "robust_u1_jax.inference.engine.ModelError",
    "robust_u1_jax.data.transforms.BadImageError",
    "robust_u1_jax.data.bad_records.TooManyBadRecords",
    "robust_u1_jax.training.checkpoint.NonFiniteLoss",  # a run its settings made diverge
    "robust_u1_jax.benchmarks.aot.AotError",
    "robust_u1_jax.files.UnreadableFile",
)
# File-system errors that are about the user's paths, not the program.
BAD_PATH_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                   NotADirectoryError)
BAD_PATH_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM,
                   errno.ENAMETOOLONG, errno.ELOOP}
_ERRNO_HINTS = {
    errno.EROFS: "a read-only file system; give a writable location",
    errno.EACCES: "permission denied; give a location you can write (or read)",
    errno.EPERM: "permission denied; give a location you can write (or read)",
    errno.EISDIR: "a folder, where a file belongs",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOSPC: "no space left on the device; free some or give another location",
    errno.EDQUOT: "the disk quota is exceeded; free some space or give another location",
}


class Error(Exception):
  """A bad input found by an entry module; the message names the flag or path and the fix."""


class PathError(Error):
  """A path given on the command line cannot be used (missing, a file for a folder, unwritable)."""


# ------------------------------------------------------------------------------------ the program

def run(main: Callable[[list[str]], int | None],
        flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """absl's app.run(main), with this module's help, flag, logging and error behaviour."""
  sys.unraisablehook = redeliver_interrupts(sys.unraisablehook)
  if "--helpfull" in _flag_args(sys.argv):
    app.usage(shorthelp=False, writeto_stdout=True, exitcode=0)
  if set(HELP_FLAGS) & set(_flag_args(sys.argv)):
    app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
  app.run(lambda argv: exits_with(call(main, argv, on_interrupt=leave_at_once)),
          flags_parser=lambda argv: parse_flags(argv, flag_values))


def exits_with(status: int) -> int:
  """`status`, the program's, which a Ctrl-C during the exit that follows (the interpreter's
  teardown, JAX's: up to half a second) keeps: the work is done and its output written, where the
  interrupt killed the process silently (status 130 after `wrote ...`). Ignored, not handled: the
  interpreter puts a handler of its own back to the default as it finalizes, and keeps an
  ignored signal ignored."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  return status


def call(main: Callable[[list[str]], int | None], argv: Sequence[str], *,
         on_interrupt: Callable[[int], int] = lambda status: status) -> int:
  """main(argv) as the program runs it: its exit status, a bad input reported as one line (2),
  Ctrl-C as `interrupted` (130, given to `on_interrupt`). For tests that run an entry module in
  process."""
  try:
    return main(list(argv)) or 0
  except app.UsageError as e:
    first, _, rest = str(e).partition("\n")
    return report(f"{first} (--help lists the flags)\n{rest}", e)
  except SystemExit as e:
    if not isinstance(e.code, str):
      raise
    return report(e.code, e)  # sys.exit("message"): a library's own way of refusing an input
  except KeyboardInterrupt as e:  # outside a training loop: nothing unsaved, no traceback to read
    sys.stdout.flush()
    if show_traceback():
      traceback.print_exception(e)
    terminated = isinstance(e, signals.Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr, flush=True)
    return on_interrupt(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    if (line := out_of_memory(e)) is not None:
      report(line, e)
      return 1
    if not is_bad_input(e):
      raise
    return report(message(e), e)


def out_of_memory(e: BaseException) -> str | None:
  """The error line for a device that ran out of memory (XLA's RESOURCE_EXHAUSTED: inputs too
  large for it, not a bug to trace back), None for any other error."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text or not any(
      c.__name__ == "JaxRuntimeError" for c in type(e).__mro__):
    return None
  import jax

  asked = re.search(r"allocating (\d+) bytes", text)
  size = f" allocating {int(asked.group(1)) / 2**30:.1f} GiB" if asked else ""
  devices = jax.devices()
  return (f"out of memory on {len(devices)} {devices[0].device_kind} device(s){size} (XLA: "
          f"{text.strip().splitlines()[0][:200]}): the inputs are too large for this memory; give "
          "smaller ones (a shorter text, a smaller image or batch) or more devices")


def leave_at_once(status: int) -> NoReturn:
  """Ends the program with `status` after a stop outside a training loop, without freeing JAX's
  client.

  What Ctrl-C interrupts is most often a wait for XLA, which compiles on a thread of its own and
  goes on after the wait is given up. Python's normal exit frees the client under that compile,
  and the process died of a segmentation fault or an abort after printing `interrupted` (status
  139 or 134 instead of 130; jax 0.10.2 on CPU, every time in
  `test_ctrl_c_during_a_compile_ends_with_status_130_not_a_crash`). So every exit handler runs but
  JAX's (which frees the client), and the process ends without the interpreter's teardown."""
  import atexit

  from jax._src import api as jax_api  # private: the exit handler JAX registers at import

  jax_exit = getattr(jax_api, "clean_up", None)
  if jax_exit is not None:
    atexit.unregister(jax_exit)
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
      pass
  os._exit(status)


def redeliver_interrupts(previous: Callable, delay_s: float = 0.05) -> Callable:
  """An unraisable-exception hook that sends a dropped Ctrl-C again.

  JAX runs a callback at every garbage collection, and a model being built collects often; a
  KeyboardInterrupt raised inside such a callback is 'ignored' (printed, then dropped) and the
  program runs on. This hook sends SIGINT again from another thread, after `delay_s`, so that it
  reaches the code the program runs; anything else goes to `previous`."""

  def hook(unraisable) -> None:
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
      resend = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGINT))
      resend.daemon = True  # a program that is ending anyway does not wait for it
      resend.start()
      return
    previous(unraisable)

  return hook


def is_bad_input(e: BaseException) -> bool:
  """Whether `e` is about the user's input (reported in a line) rather than a bug (traceback)."""
  names = {f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__}
  if names & set(BAD_INPUT_TYPES):
    return True
  return isinstance(e, BAD_PATH_ERRORS) or (isinstance(e, OSError) and e.errno in BAD_PATH_ERRNOS)


def message(e: BaseException) -> str:
  """The text of an error line: the path and the reason for file-system errors, else the
  exception's own message."""
  if isinstance(e, OSError) and e.filename is not None and e.strerror:
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else f"{e.filename}"
    hint = _ERRNO_HINTS.get(e.errno)
    return f"{where}: {e.strerror}" + (f" ({hint})" if hint and hint != e.strerror else "")
  text = str(e)
  if isinstance(e, KeyError) and len(e.args) == 1:
    text = str(e.args[0])
  return text or type(e).__name__


def report(text: str, e: BaseException | None = None) -> int:
  """Prints `error: text` on stderr (the traceback first when asked for); returns exit status 2.
  A message of several lines (the bad-record tracker's list of files) keeps them, indented."""
  sys.stdout.flush()
  if e is not None and show_traceback():
    traceback.print_exception(e)
  first, *rest = text.strip().splitlines() or [""]
  lines = [f"error: {first}"] + [f"  {line}" for line in rest if line.strip()]
  print("\n".join(lines), file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def show_traceback() -> bool:
  if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
    return True
  try:
    if flags.FLAGS["verbosity"].present:
      return flags.FLAGS.verbosity >= 1
  except (KeyError, flags.Error):
    pass
  # A flag the parser refused before it reached --verbosity (an unknown --config field first).
  given = _verbosity_in(sys.argv)
  return given is not None and given >= 1


def _verbosity_in(argv: Sequence[str]) -> int | None:
  """The value of --verbosity (or -v) on a command line not parsed (yet), None without one."""
  args = _flag_args(argv)
  for i, arg in enumerate(args):
    name, eq, value = arg.partition("=")
    if name not in ("--verbosity", "-v"):
      continue
    if not eq:
      value = args[i + 1] if i + 1 < len(args) else ""
    try:
      return int(value)
    except ValueError:
      return None
  return None


# ---------------------------------------------------------------------------------------- flags

def _flag_args(argv: Sequence[str]) -> list[str]:
  """The flags of a command line: everything after the program, up to a `--`."""
  args = list(argv[1:])
  return args[:args.index("--")] if "--" in args else args


def parse_flags(argv: Sequence[str], values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` into `values` (absl's parse_flags_with_usage, with one-line errors)."""
  argv = list(argv)
  try:
    rest = values(argv)
  except flags.Error as e:
    sys.exit(report(flag_error_text(str(e), values, argv), e))
  except (AttributeError, KeyError, OSError) as e:
    # ml_collections applies --config.a.b overrides while parsing, and raises these for an unknown
    # field or an unloadable file.
    text = config_flag_problem(values, argv)
    if text is None:
      raise
    sys.exit(report(text, e))
  text = config_flag_problem(values, argv, only_failed=True)  # ml_collections defers this one
  if text is not None:
    sys.exit(report(text))
  if not values["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    plain_log_lines()
  return rest


def plain_log_lines() -> None:
  """Log records as `warning: message` lines, written above any progress bar (tqdm's write), in
  place of absl's handler: its prefix (level, date, thread, file:line) is for a log file, and its
  lines, written from a data loader's thread, landed in the middle of the bar's line."""
  root = std_logging.getLogger()
  root.removeHandler(logging.get_absl_handler())
  if not any(isinstance(h, _PlainLines) for h in root.handlers):
    root.addHandler(_PlainLines())


# Library warnings that every clean stop logs, which read as problems: Orbax's on each process at a
# SIGTERM or Ctrl-C, where the trainer's own line says where it stopped and saved.
EXPECTED_WARNINGS = ("Reached preemption sync point",)


class _PlainLines(std_logging.Handler):

  def emit(self, record: std_logging.LogRecord) -> None:
    import tqdm

    try:
      message = record.getMessage()
      if record.levelno < std_logging.ERROR and any(w in message for w in EXPECTED_WARNINGS):
        return
      text = f"{record.levelname.lower()}: {message}"
      if record.exc_info:
        text += "\n" + std_logging.Formatter().formatException(record.exc_info)
      tqdm.tqdm.write(text, file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)


def _config_flag_names(values: flags.FlagValues) -> list[str]:
  from ml_collections.config_flags import config_flags as config_flags_lib

  return [name for name in values if config_flags_lib.is_config_flag(values[name])]


def config_spec(values: flags.FlagValues, name: str, argv: Sequence[str]) -> str:
  """The `path.py[:variant]` the config flag `name` was given (its default if absent)."""
  args = _flag_args(argv)
  spec = None
  for i, arg in enumerate(args):
    match = re.fullmatch(rf"--?{re.escape(name)}(=(.*))?", arg)
    if match:
      spec = match.group(2) if match.group(1) else (args[i + 1] if i + 1 < len(args) else "")
  if spec is None:
    spec = str(values[name].default_as_str or "").strip("'\"")
  return spec


def config_flag_problem(values: flags.FlagValues, argv: Sequence[str], *,
                        only_failed: bool = False) -> str | None:
  """What is wrong with a config flag of this command line (None: nothing found): a config file
  that does not exist or failed to load, or an override of a field the config does not have.
  `only_failed`: look only at config flags whose file failed to load (after a parse)."""
  from ml_collections.config_flags import config_flags as config_flags_lib

  from robust_u1_jax import config_lib

  # ml_collections' stand-in for a config file that failed to load (its error comes on first use).
  error_config = getattr(config_flags_lib, "_ErrorConfig", ())
  for name in _config_flag_names(values):
    failed = isinstance(values[name].value, error_config)
    if only_failed and not failed:
      continue
    spec = config_spec(values, name, argv)
    path = spec.partition(":")[0]
    if not spec:
      continue
    if not os.path.isfile(path):
      return f"--{name} {spec}: {config_lib.missing_config_file(path)}"
    try:
      config = config_lib.load_file(spec)
    except (ValueError, TypeError, OSError) as e:
      return f"--{name} {spec}: cannot load the config: {message(e).splitlines()[0]}"
    for arg in _flag_args(argv):
      match = re.match(rf"--?(?:no)?{re.escape(name)}\.([^=]+)", arg)
      problem = match and config_lib.unknown_field(config, match.group(1))
      if problem:
        return f"--{name}.{match.group(1)}: {spec} has {problem}"
  return None


def flag_error_text(text: str, values: flags.FlagValues, argv: Sequence[str]) -> str:
  """absl's flag error, on one line and with what a --config.x override takes."""
  if "Error whilst parsing config file" in text:  # get_config raised: its last line says why
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
    match = re.match(r"flag (--\S+?)=(\S+):", text)
    if not match:
      return reason
    # The flag's value names the file: not again as the reason's own prefix ("configs/sft.py: ").
    return f"{match.group(1)} {match.group(2)}: {re.sub(r'^[^ :]+[.]py(:[^ :]+)?: ', '', reason)}"
  match = re.match(r"flag --(\w+)\.([\w.]+)=(.*?): (.*)", text, re.S)
  if match and match.group(1) in _config_flag_names(values):
    name, field, value, reason = match.groups()
    from robust_u1_jax import config_lib

    try:
      current = config_lib.field_value(config_lib.load_file(config_spec(values, name, argv)),
                                       field)
      if hasattr(current, "keys") and len(current):  # a section: its repr runs to many lines
        names = sorted(current.keys())
        # absl's reason for a section is a Python parse error of the value, no help here.
        return (f"--{name}.{field}={value}: {field} is a section, not a value: set its fields "
                f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}), e.g. "
                f"--{name}.{field}.{names[0]}=...")
      kind = f" {config_lib.takes(current)}"
      if type(current) in (int, float, bool):  # said in words; Python's own reason adds nothing
        return f"--{name}.{field}={value}: {field}{kind}"
    except Exception:  # pylint: disable=broad-except
      kind = ""
    return f"--{name}.{field}={value}: {field}{kind}; {reason.splitlines()[0]}"
  match = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: ([^?]+?) \?)?", text)
  if match:
    given, near = match.group(1), (match.group(2) or "").split(", ")
    off = re.fullmatch(r"no[-_](\w+)", given)
    if off and isinstance(values[off.group(1)].value if off.group(1) in values else None, bool):
      return f"unknown flag --{given}: turn a flag off with --no{off.group(1)}"
    hint = f"; did you mean {' or '.join('--' + n for n in near)}?" if near != [""] else ""
    field = re.fullmatch(r"config\.(\S+)", given)
    if field and "override" in values and not _config_flag_names(values):  # `bench`
      hint = f"; a config field here is --override {field.group(1)}"
    return f"unknown flag --{given}{hint} (--help lists the flags)"
  return f"{text.splitlines()[0]} (--help lists the flags)"


# -------------------------------------------------------------------------------------- outputs

def _remote(path: str) -> bool:
  return "://" in path  # gs://, s3://...: checked by the library that writes there


def output_dir(path: str, flag: str, *, create: bool = True, of: str | None = None) -> str:
  """Checks a file can be written in the folder `path`, creating it (and its parents) if missing;
  PathError naming `flag` otherwise. `create=False` creates nothing: the nearest existing folder
  on the path must be writable (for a command that creates its output only once it has one).
  `of`: what the folder is for, where a new one named as an image file (`res.png`) is refused,
  as a user who meant a file would find a folder there. Returns `path`."""
  if _remote(path):
    return path
  if of and not os.path.isdir(path) and image_files.is_image_name(path):
    raise PathError(f"{flag} {path}: an image file's name, but it is the folder of {of}; give a "
                    f"folder, e.g. {os.path.splitext(path)[0]}")
  if os.path.exists(path) and not os.path.isdir(path):
    raise PathError(f"{flag} {path}: a file, not a folder; give a folder (created if missing)")
  if not create and not os.path.exists(path):
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise PathError(f"{flag} {path}: {existing} is a file, not a folder; give a folder")
    _check_writable(existing, f"{flag} {path}: its parent {existing}")
    return path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise PathError(f"{flag} {path}: cannot create the folder ({e.strerror or e}); give a "
                    "writable location") from None
  _check_writable(path, f"{flag} {path}")
  return path


def _check_writable(folder: str, where: str) -> None:
  try:
    fd, probe = tempfile.mkstemp(prefix=".write_check_", dir=folder)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PathError(f"{where}: cannot write there ({e.strerror or e}); give a writable "
                    "folder") from None


def names_folder(path: str) -> bool:
  """Whether an output path names a folder: an existing one, or one to create (ending in a
  separator), into which a command writes its default file name."""
  return os.path.isdir(path) or path.endswith(os.sep)


def output_file(path: str, flag: str, *, image: bool = False, create: bool = True,
                input_path: str | None = None) -> str:
  """Checks `path` can be written as a file, creating its folder if missing (not with
  `create=False`); with `image`, that its extension names an image format; that it is not the
  file `input_path` (a command's input, which writing would destroy). PathError naming `flag`
  otherwise. Returns `path`."""
  if _remote(path):
    return path
  if names_folder(path):
    raise PathError(f"{flag} {path}: a folder; give a file name, e.g. "
                    f"{os.path.join(path, 'out.png' if image else 'out')}")
  if (input_path and os.path.exists(path) and os.path.exists(input_path)
      and os.path.samefile(path, input_path)):
    raise PathError(f"{flag} {path}: the input itself; give another file, so it is kept")
  if image:
    image_format(path, flag)
  folder = os.path.dirname(os.path.abspath(path))
  output_dir(folder, f"{flag} {path}: its folder", create=create)
  return path


def image_format(path: str, flag: str = "") -> str:
  """PIL's format name for the extension of `path`; PathError listing common ones if unknown."""
  from PIL import Image

  extension = os.path.splitext(path)[1].lower()
  fmt = Image.registered_extensions().get(extension)
  if fmt is None or fmt not in Image.SAVE:
    where = f"{flag} {path}" if flag else path
    what = f"unknown image extension {extension!r}" if extension else "no file extension"
    raise PathError(f"{where}: {what}; use .png, .jpg, .webp, .bmp or .tif")
  return fmt

