"""The question and answer texts every source goes through
(docs/design.md#reasoning-and-the-answer-format).

A multiple-choice prompt is the question, then one `X. option` line per option. An answer is the
Robust-R1 format, five tagged fields:

  <TYPE>..<TYPE_END>              the corruptions seen, `name(strength)` each, or `none`
  <INFLUENCE>..<INFLUENCE_END>    what they do to what the question asks about
  <REASONING>..<REASONING_END>    how the answer is found
  <CONCLUSION>..<CONCLUSION_END>  the answer in words
  <ANSWER>X<ANSWER_END>           the option letter

Data without reasoning (VQA tables) trains on the last field alone. What the fields say is the
business of the source that knows the scene (`shapes_answers.answer_text` for the built-in world);
this module only writes and reads the format, so sources and the pipeline need nothing of the
shapes world to use it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

FIELDS = ("TYPE", "INFLUENCE", "REASONING", "CONCLUSION", "ANSWER")
ANSWER_TAG = "<ANSWER>"
_ANSWER_RE = re.compile(r"<ANSWER>\s*([A-Za-z])\s*<ANSWER_END>")


def format_question(q: Mapping[str, Any], instruction: str | None = None) -> str:
  """`prompt` of a question record ({'question', 'options'?}): answered from the image as given,
  or after the recovery `instruction`."""
  return prompt(str(q["question"]), q.get("options") or (), instruction=instruction)


RESTORE = "Please restore this corrupted image to its clean version."
ANSWER_FROM_RESTORED = ("Based on what you observe in the restored image, please select the "
                        "correct answer from the options above.")
SELECT = "Please select the correct answer from the options above."
# Ours, for a question without options, where the release's request would name options that are
# not there.
ANSWER_OPEN_FROM_RESTORED = ("Based on what you observe in the restored image, please answer the "
                             "question.")


LETTERS = string.ascii_uppercase  # an option's letter: at most 26 options


# An option that carries its own letter: 'B. cat', 'B) cat', '(B) cat', 'b. cat'.
_LETTERED = re.compile(r"^\(?([A-Za-z])[.)]\)?\s+(\S.*)$", re.DOTALL)


def own_letter(option: str) -> str | None:
  """The letter an option carries ('B. cat', '(b) cat': B), or None."""
  found = _LETTERED.match(option)
  return found.group(1).upper() if found else None


def option_letters(options: Sequence[str]) -> tuple[str, list[str]]:
  """(each option's letter, each option's text): the options' own letters where every option
  carries a different one ('B. cat', 'C. dog' stay B and C), else A, B, C, ... in order, an
  option that carries another letter than its place's kept whole ('B. cat' first is 'A. B. cat')."""
  found = [_LETTERED.match(o) for o in options]
  if found and all(found) and len({m.group(1).upper() for m in found}) == len(found):
    return "".join(m.group(1).upper() for m in found), [m.group(2).strip() for m in found]
  letters = LETTERS[:len(options)]
  return letters, [m.group(2).strip() if m and m.group(1).upper() == letter else o.strip()
                   for letter, m, o in zip(letters, found, options)]


def option_lines(options: Sequence[str]) -> list[str]:
  """'X. text' per option, lettered as `option_letters` says."""
  letters, texts = option_letters(options)
  return [f"{letter}. {text}" for letter, text in zip(letters, texts)]


def prompt(question: str, options: Sequence[str] = (), *, instruction: str | None = RESTORE
           ) -> str:
  """The Robust-U1 release's prompt (docs/design.md#reasoning-and-the-answer-format): the
  question, its lettered options, then the recovery `instruction` and the request to answer from
  the restored image (`instruction=None`: answer from the image as given; a question without
  options is asked to be answered, not to select from options). The text between the
  two images of the reasoning layout (the reasoning stage's rows, the base's two-image rows, the
  evaluation's corrupted + recovered mode) and the `answer` command's prompt, so a model trained
  on the built-in world runs the release's loop."""
  if isinstance(options, str):  # it would read as one option per character
    raise ValueError(f"options: a list of option texts, got the string {options!r}")
  if len(options) > len(LETTERS):
    raise ValueError(f"{len(options)} options; at most {len(LETTERS)}, one per letter A to Z")
  lines = [f"Question: {question}"]
  if options:
    lines.append("Options:")
    lines += option_lines(options)
  if instruction is not None:
    lines += [instruction, ANSWER_FROM_RESTORED if options else ANSWER_OPEN_FROM_RESTORED]
  elif options:
    lines.append(SELECT)
  return "\n".join(lines) + "\n"


def format_answer(type_text: str, influence: str, reasoning: str, conclusion: str,
                  letter: str) -> str:
  """The five fields, one per line, ending exactly with `<ANSWER>X<ANSWER_END>`."""
  values = (type_text, influence, reasoning, conclusion)
  return "\n".join([*(f"<{f}>{v}<{f}_END>" for f, v in zip(FIELDS[:4], values)),
                    bare_answer(letter)])


def bare_answer(letter: str) -> str:
  """The answer field alone: the target of data that carries no reasoning."""
  return f"{ANSWER_TAG}{letter}<ANSWER_END>"


def parse_answer(text: str) -> str | None:
  """The letter of the last `<ANSWER>X<ANSWER_END>` in a generated text, or None."""
  found = _ANSWER_RE.findall(text)
  return found[-1].upper() if found else None


def corruption_words(name: str) -> str:
  """'imagenet_c/gaussian_noise' -> 'gaussian noise': a corruption as the TYPE field says it."""
  return name.split("/")[-1].replace("_", " ")


def _format_strength(s) -> str:
  # Integers are ImageNet-C severities, floats Robust-R1 intensities.
  return str(int(s)) if np.issubdtype(np.asarray(s).dtype, np.integer) else f"{float(s):.2f}"


def applied_corruptions(corruption_name: str | Sequence[str] | None,
                        strength=None) -> list[tuple[str, Any]]:
  """[(name, strength or None)] of the corruptions applied to an image, `none` and empty names
  dropped; one strength for all of them, or one each."""
  names = ([corruption_name] if isinstance(corruption_name, str) else list(corruption_name or []))
  names = [n for n in names if n and n != "none"]
  strengths = list(strength) if np.ndim(strength) > 0 else [strength] * len(names)
  if names and len(strengths) != len(names):
    raise ValueError(f"answer_text: {len(strengths)} strengths for {len(names)} corruptions "
                     f"{names}: give one strength per corruption name")
  return list(zip(names, strengths))


def type_text(applied: Sequence[tuple[str, Any]]) -> str:
  """The TYPE field: `gaussian noise(0.45), saturate(3)`, or `none` for a clean image."""
  if not applied:
    return "none"
  return ", ".join(corruption_words(name) if s is None
                   else f"{corruption_words(name)}({_format_strength(s)})" for name, s in applied)
