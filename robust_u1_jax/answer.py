r"""Asks the model a question about a (corrupted) image: the released Robust-U1 reasoner.

  python -m robust_u1_jax.answer --model /disks/Robust-U1 --image photo.jpg \
      --question "Which animal is in the picture?" --options "A. cat" --options "B. dog" \
      --out answers/photo

The model writes text, may generate a recovered image of its input and continue from it, and ends
with `<ANSWER>...`. A line says when the model is loaded, each step is printed as it is done, then a
last line `answer: X` (the option letter when options are given, as benchmarks score it: `answer:
none`, and "" in exchange.json, when the reply names no option, several, or one only in passing in
a long text; without options, the `<ANSWER>` field's text, or the whole reply on that one line
when the model wrote no such field). A note says when the rounds ran out before that field.
With --out, the generated images are written as `step_NN.png` (NN: the step's number) and the
whole exchange as `exchange.json`: each step's text or image file, the prompt, the settings, the
seconds of each phase and the model; the folder is created once the answer is there, and an
earlier answer's files in it are replaced (step images that no answer wrote, with neither an
exchange.json nor an interrupted write's marker beside them, are refused).
--model takes what `recover` takes; an unreadable or too small image, an unusable model
directory, or an --out that is unwritable or named as an image file is one `error:` line and exit
status 2, found before the model loads.
"""

from __future__ import annotations

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence

from absl import app, flags, logging

from robust_u1_jax import files, model_cli
from robust_u1_jax.data import answer_format

EXCHANGE_FILE = "exchange.json"
WRITING = ".answer_writing"  # beside the step images until exchange.json is written
NO_OPTION = "none"  # the last line's answer when the reply names no option (or several)
STOPS = {"end_of_text": "end_of_text", "no_stop_token": "max_new_tokens (no stop token)",
         "max_iterations": "max_iterations"}


def define_flags(values: flags.FlagValues = flags.FLAGS) -> None:
  model_cli.define_model_flags(values)
  flags.DEFINE_string("image", None, "The image the question is about.", flag_values=values)
  flags.DEFINE_string("question", None, "The question.", flag_values=values)
  flags.DEFINE_multi_string(
      "options", [], "An answer option; repeat it for each ('cat': letters A, B, ... are added "
      "in order; options that each carry their own letter, 'B. cat' 'C. dog', keep them).",
      flag_values=values)
  flags.DEFINE_integer("max_iterations", 5, "Most rounds of the model: each writes a text step, "
                       "then an image step where the text asks for one (the release's loop).",
                       flag_values=values)
  flags.DEFINE_integer("max_new_tokens", 512, "Most tokens of one text step.", flag_values=values)
  flags.DEFINE_float("temperature", 0.3, "Text sampling temperature.", flag_values=values)
  flags.DEFINE_bool("greedy", False, "Greedy text decoding (temperature 0).", flag_values=values)
  flags.DEFINE_bool("no_recover", False, "Answer from the corrupted image alone: no restore "
                    "instruction, no generated image.", flag_values=values)
  flags.DEFINE_integer("steps", 50, "Sampling steps of a generated image.", flag_values=values)
  model_cli.define_sampler_flags(values)
  flags.DEFINE_integer("seed", 0, "Seed of the text sampling and the image noise.",
                       flag_values=values)
  flags.DEFINE_string("out", None, "Folder for step_NN.png and exchange.json (created if missing; "
                      "an earlier answer's files there are replaced).", flag_values=values)
  # The shared flags are defined in `model_cli`; without this --help would list them only in full.
  flags.adopt_module_key_flags(model_cli, flag_values=values)


def printable(text: str) -> str:
  """Model text for a terminal: control characters escaped (an untrained model writes any token,
  and a raw carriage return or escape sequence would garble or restyle the terminal)."""
  return "".join(c if c.isprintable() or c in "\n\t" else ascii(c)[1:-1] for c in text)


def settings_record(values: flags.FlagValues, settings) -> dict:
  return {"max_iterations": settings.max_iterations, "max_new_tokens": settings.max_new_tokens,
          "temperature": settings.temperature, "recover": settings.recover, "seed": values.seed,
          "dtype": values.dtype, "mesh": values.mesh, "posterior": "sample",
          "sampler": dataclasses.asdict(settings.sampler)}


def step_line(n: int, step, out: str | None) -> str:
  """Step `n` as printed: its text, or its image's size (written to --out once the answer is
  there)."""
  if step.kind == "text":
    return f"[{n}] text ({step.seconds:.2f} s)\n{printable(step.text)}"
  h, w = step.image.shape[:2]
  return f"[{n}] image {w}x{h} ({step.seconds:.2f} s)" + ("" if out else ": not saved (give --out)")


def _step_files(out: str) -> list[str]:
  return sorted(name for name in os.listdir(out) if re.fullmatch(r"step_\d{2,}\.png", name))


def _check_no_foreign_steps(out: str) -> None:
  """Refuses an --out holding step images without an earlier answer's exchange.json (or the
  marker of one whose write was cut short): files of the user's own, which this answer would
  write over or remove."""
  if not os.path.isdir(out) or any(os.path.exists(os.path.join(out, name))
                                   for name in (EXCHANGE_FILE, WRITING)):
    return
  if steps := _step_files(out):
    more = f" and {len(steps) - 1} more" if len(steps) > 1 else ""
    raise cli.PathError(f"--out {out}: holds {steps[0]}{more} but no {EXCHANGE_FILE}, so no "
                        "earlier answer wrote them, and this one would replace them; give "
                        "another folder")


def _remove_earlier_answer(out: str, written: Sequence[str]) -> None:
  """Removes the images an earlier answer wrote in `out` that this one does not write over
  (`written`): a reused folder would otherwise hold images of another exchange beside this one's
  exchange.json."""
  earlier = [name for name in _step_files(out) if name not in written]
  for name in earlier:
    os.remove(os.path.join(out, name))
  if earlier:
    print(f"removed {len(earlier)} file{'' if len(earlier) == 1 else 's'} of an earlier answer "
          f"in {out}")


def _check_option_letters(options: Sequence[str]) -> None:
  """Refuses options that all carry letters, some the same ('A. cat', 'A. dog': they would be
  lettered anew, 'B. A. dog'), and options of which only some carry one ('cyan', 'A. red' were
  'A. cyan', 'B. A. red'); notes a single option that reads as a list of several."""
  letters = [answer_format.own_letter(o) for o in options]
  if any(letters) and not all(letters):
    carries = next(o for o, x in zip(options, letters) if x)
    bare = next(o for o, x in zip(options, letters) if not x)
    raise app.UsageError(f"--options: {carries!r} carries a letter and {bare!r} none; give each "
                         "option its own letter, or none (then they are lettered A, B, ... in "
                         "order)")
  if len(options) > 1 and all(letters) and len(set(letters)) < len(letters):
    twice = next(x for x in letters if letters.count(x) > 1)
    same = [repr(o) for o, x in zip(options, letters) if x == twice]
    raise app.UsageError(f"--options: {' and '.join(same)} carry the same letter {twice}; give "
                         "each option its own letter, or none (then they are lettered A, B, ... "
                         "in order)")
  if len(options) == 1 and ("," in options[0] or "/" in options[0]):
    print(f"note: --options gives one option, {options[0]!r}; give each option with its own "
          "--options", file=sys.stderr)


def _answer(values: flags.FlagValues) -> int:
  from robust_u1_jax.inference import reasoner

  if values.greedy and values["temperature"].present:
    raise app.UsageError("give --greedy or --temperature, not both")
  try:  # its checks name its fields, which the flags share
    settings = reasoner.Settings(max_iterations=values.max_iterations,
                                 max_new_tokens=values.max_new_tokens,
                                 temperature=0.0 if values.greedy else values.temperature,
                                 recover=not values.no_recover)
  except ValueError as e:
    raise app.UsageError(f"--{e}") from None
  blank = [k for k, option in enumerate(values.options, start=1) if not option.strip()]
  if blank:
    raise app.UsageError(f"--options: option {blank[0]} of {len(values.options)} is empty")
  try:  # the prompt's own checks (at most 26 options), before the model loads
    answer_format.prompt(values.question, values.options)
  except ValueError as e:
    raise app.UsageError(f"--options: {e}") from None
  _check_option_letters(values.options)
  # A bad image, --model or --out fails before the model loads.
  image = model_cli.read_image(values.image,
                               model_cli.model_rules(values.model).min_side)
  settings = dataclasses.replace(settings, sampler=model_cli.make_sampler(values, values.steps),
                                 image_progress=values.progress)
  if values.out:
    cli.output_dir(values.out, "--out", create=False,  # created once there is an answer
                   of=f"the step images and {EXCHANGE_FILE}")
    _check_no_foreign_steps(values.out)
  engine = model_cli.load_engine(values, "answering")
  # Each step as it is done: on a large model a step takes seconds to minutes.
  exchange = reasoner.answer(engine, image, values.question, values.options, settings,
                             seed=values.seed,
                             on_step=lambda n, step: print(step_line(n, step, values.out),
                                                           flush=True))
  phases = ", ".join(f"{k} {v:.2f}" for k, v in exchange.seconds.items())
  steps = len(exchange.steps)
  rounds = (f" ({settings.max_iterations} round{'' if settings.max_iterations == 1 else 's'})"
            if exchange.stopped_by == "max_iterations" else "")
  print(f"stopped by {STOPS.get(exchange.stopped_by, exchange.stopped_by)}{rounds} after {steps} "
        f"step{'' if steps == 1 else 's'}; seconds: {phases}")
  if (exchange.stopped_by == "max_iterations"
      and answer_format.ANSWER_TAG not in exchange.answer_text):
    print(f"note: the rounds ran out before the model wrote its {answer_format.ANSWER_TAG} field; "
          f"give more than --max_iterations={settings.max_iterations}", file=sys.stderr)
  image_names = [f"step_{n:02d}.png" for n, step in enumerate(exchange.steps, 1)
                 if step.kind == "image"]
  if values.out:
    cli.output_dir(values.out, "--out")
    with open(os.path.join(values.out, WRITING), "w"):  # this answer's images, until the record
      pass
    _remove_earlier_answer(values.out, image_names)
    images = [s.image for s in exchange.steps if s.kind == "image"]
    for name, generated in zip(image_names, images):
      path = os.path.join(values.out, name)
      try:
        model_cli.write_image(path, generated)
      except OSError as e:
        raise model_cli.InputError(f"{path}: {e.strerror or e}") from None
      print(f"wrote {path}")
    record = {"model": os.path.abspath(values.model), "image": os.path.abspath(values.image),
              "question": values.question, "options": list(values.options),
              **exchange.record(image_names),
              "settings": settings_record(values, settings)}
    path = os.path.join(values.out, EXCHANGE_FILE)
    with files.atomic_write(path, "w") as f:  # never taken half written for a finished one
      json.dump(record, f, indent=1, ensure_ascii=False)
    os.remove(os.path.join(values.out, WRITING))
    print(f"wrote {path}")
  # One line whatever the model wrote, so scripts can take the last line.
  answer = exchange.answer if exchange.answer or not values.options else NO_OPTION
  print(f"answer: {printable(' '.join(answer.split()))}", flush=True)
  return 0


def _run(values: flags.FlagValues) -> int:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO
  missing = [f"--{n}" for n in ("model", "image", "question")
             if not (values[n].value or "").strip()]  # a blank question is no question
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")
  return _answer(values)  # a bad input (cli.Error) is reported by cli.run / cli.call


def run(argv: Sequence[str]) -> int:
  """The command line `argv` as the program runs it (`cli.call`: a bad input is one line and exit
  status 2), on flags of its own (`model_cli.own_flags`)."""
  return cli.call(lambda argv: _run(model_cli.own_flags(argv, define_flags)), argv)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  return _run(flags.FLAGS)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
