"""The released Robust-U1 reasoner: text, a self-generated recovery, more text, an answer.

Behaviour of `inference/reasoner.py` in the Robust-U1 release
(docs/design.md#reasoning-and-the-answer-format), rebuilt on this package: the corrupted image and
the prompt enter the contexts in order; then, for at most `max_iterations` steps, the model
writes text, and the token it stops on chooses the next step: `<|vision_start|>` generates an
image of the input image's VAE size from the three contexts and appends it (VAE + ViT tokens) to
the full and `cfg_text` contexts; `<|im_start|>` writes more text; `<|endoftext|>` (or running out
of tokens) stops. The text stays in the context as written.
From a third `<ANSWER>` tag on, the answer text is dropped, as the release does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from robust_u1_jax.data import answer_format
from robust_u1_jax.inference import engine as engine_lib
from robust_u1_jax.inference import recovery as recovery_lib

# An answer field ends at its closing tag, at the next field's tag (a reply that never closed it
# writes on into another field) or at the end of the text.
ANSWER_RE = re.compile(r"<ANSWER>(.*?)(?=<[A-Z]+(?:_END)?>|$)", re.S)


def prompt(question: str, options: Sequence[str] = (), *, recover: bool = True,
           instruction: str = answer_format.RESTORE) -> str:
  """The release's prompt: question, lettered options, restore `instruction` (a model's own:
  `Engine.instruction`), answer instruction."""
  return answer_format.prompt(question, options, instruction=instruction if recover else None)


def cut_answers(text: str, keep: int = 2) -> str:
  """The text before the (keep + 1)-th `<ANSWER>` tag."""
  start = -1
  for _ in range(keep + 1):
    start = text.find(answer_format.ANSWER_TAG, start + 1)
    if start < 0:
      return text
  return text[:start]


def leading_letter(answer: str, letters: str) -> str:
  """The letter of `letters` that `answer` starts with, alone or closed by '.', ')' or ':' ('B',
  '(B)', 'B. square'; not the article of 'A red circle'), or ''."""
  m = re.match(rf"^\(?([{letters}])(?:[.):]|\s*$)", answer)
  return m.group(1) if m else ""


# VLMEvalKit's option matching (`can_infer_option`) reads a reply as words once these characters
# are spaces, and an option letter as a word that is the letter.
_WORD_EDGE = r"[\s.()\[\],:;!*#{}]"


# What follows 'A' or 'I' when it is the option letter, not the English word: a verb ("A is
# right", "Option A seems best") or a word that offers another option ("A or B").
_AFTER_LETTER = re.compile(r"\s+(?:is|was|seems|looks|appears|would|could|might|must|should|may|"
                           r"can|fits|matches|or|and|nor)\b")


def named_letter(answer: str, letters: str) -> str:
  """The option letter of `letters` that `answer` names, or '': the whole answer one letter in
  either case (the answer field's, or a reply of one letter); a capital letter the answer starts
  with, alone or closed by '.', ')' or ':' ('' when it is none of `letters`); else, as VLMEvalKit
  reads a reply, the one letter that stands as a word of it, punctuation aside ("Answer: B", "the
  answer is (C) as shown"). Several such letters name none ("It is not A. The answer is B.", "A or
  B"); 'A' and 'I' before a lowercase word are the English words ("A red circle", "I think"),
  unless that word is a verb or "or", "and", "nor" ("Option A is correct", "A or B"); and, as
  VLMEvalKit reads it, a letter first standing before the last four words names none (a letter in
  passing in a long text)."""
  answer = answer.strip()
  if len(answer) == 1 and answer.upper() in letters:
    return answer.upper()
  letter = leading_letter(answer, answer_format.LETTERS)  # "C. B" names C, no option of A, B
  if letter:
    return letter if letter in letters else ""
  standing = {m.group(1) for m in re.finditer(
      rf"(?:^|(?<={_WORD_EDGE}))([{letters}])(?={_WORD_EDGE}|$)", answer)
      if not (m.group(1) in "AI" and re.match(r"\s+[a-z]", answer[m.end():])
              and not _AFTER_LETTER.match(answer[m.end():]))}
  if len(standing) != 1:
    return ""
  letter = standing.pop()
  words = [w for w in re.split(f"{_WORD_EDGE}+", answer) if w]
  return letter if words.index(letter) >= len(words) - 4 else ""


def answer_field(text: str) -> str:
  """The last `<ANSWER>` field's content, stripped, else the whole text."""
  found = ANSWER_RE.findall(text)
  return (found[-1] if found else text).strip()


def extract_answer(text: str, options: Sequence[str] = ()) -> str:
  """The final answer: the last `<ANSWER>...` content (else the whole text); with options, its
  option letter (`named_letter`), or '' when none can be told: else VLMEvalKit's text rule, the
  one option whose text the answer holds, in an answer at most twice as long as the options'
  texts together (a reply that names several, or one in passing in a long text, names none)."""
  answer = answer_field(text)
  if not options:
    return answer
  letters, bodies = answer_format.option_letters(options)
  letter = named_letter(answer, letters)
  if letter:
    return letter
  bodies = [body.lower() for body in bodies]
  if len(answer) <= 2 * sum(map(len, bodies)):
    named = [letter for letter, body in zip(letters, bodies) if body and body in answer.lower()]
    if len(named) == 1:
      return named[0]
  return ""


@dataclasses.dataclass(frozen=True)
class Settings:
  max_iterations: int = 5
  max_new_tokens: int = 512
  temperature: float = 0.3  # 0: greedy
  recover: bool = True  # False: answer from the corrupted image alone (no recovery instruction)
  # None: the release's 50 steps at the model's own guidance (`Engine.guidance`).
  sampler: recovery_lib.Sampler | None = None
  image_progress: bool = False  # a bar over each image's sampling steps, on stderr

  def __post_init__(self):
    # Each message starts with its field's name, which the `answer` command's flag shares.
    for name in ("max_iterations", "max_new_tokens"):
      if not getattr(self, name) >= 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if not self.temperature >= 0:  # NaN included
      raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")


@dataclasses.dataclass
class Step:
  kind: str  # 'text' | 'image'
  text: str = ""
  image: np.ndarray | None = None
  seconds: float = 0.0


@dataclasses.dataclass
class Exchange:
  prompt: str
  steps: list[Step]
  answer_text: str  # every text step joined, cut after the answers
  answer: str  # with options, the option letter ('' when the reply names none); else the answer
  stopped_by: str  # 'end_of_text' | 'no_stop_token' | 'max_iterations'
  seconds: dict[str, float]  # time per phase: context, text, image

  def record(self, image_paths: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON-ready record; `image_paths` for the image steps, in order."""
    images = sum(s.kind == "image" for s in self.steps)
    if len(image_paths) != images:
      raise ValueError(f"record: {len(image_paths)} image paths for {images} image steps")
    paths = iter(image_paths)
    steps = [{"type": s.kind, "seconds": round(s.seconds, 3),
              **({"text": s.text} if s.kind == "text" else {"image": next(paths)})}
             for s in self.steps]
    return {"prompt": self.prompt, "steps": steps, "answer_text": self.answer_text,
            "answer": self.answer, "stopped_by": self.stopped_by,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def answer(engine: engine_lib.Engine, image: np.ndarray, question: str,
           options: Sequence[str] = (), settings: Settings = Settings(), *, seed: int = 0,
           posterior: str = "sample",
           on_step: Callable[[int, Step], None] | None = None) -> Exchange:
  """Runs the interleaved loop on one uint8 image and a question; `on_step(n, step)` is called
  as each step (numbered from 1) is done, for callers that show the exchange as it goes."""
  special = engine.special
  seconds: dict[str, float] = {}
  text_prompt = prompt(question, options, recover=settings.recover,
                       instruction=engine.instruction)
  with _timed(seconds, "context"):
    conv = engine.conversation(seed, posterior)
    conv.add_image(image)
    conv.add_text(text_prompt)
  steps: list[Step] = []

  def done(step: Step) -> None:
    steps.append(step)
    if on_step is not None:
      on_step(len(steps), step)

  stops = (special["vision_start"], special["im_start"], special["endoftext"])
  start, stopped_by = "im_start", "max_iterations"
  for _ in range(settings.max_iterations):
    t0 = time.perf_counter()
    with _timed(seconds, "text"):
      ids, stop = conv.generate_text(max_new_tokens=settings.max_new_tokens,
                                     temperature=settings.temperature, stop_ids=stops,
                                     start=start, keep=True)
    text = _clean(engine.decode(ids), special, engine)
    if text:
      done(Step("text", text=text, seconds=time.perf_counter() - t0))
    if stop == special["vision_start"] and settings.recover:
      t0 = time.perf_counter()
      with _timed(seconds, "image"):
        generated, _ = conv.generate_image(
            sampler=settings.sampler, progress="image" if settings.image_progress else None)
        conv.add_image(generated, generated=True)
      done(Step("image", image=generated, seconds=time.perf_counter() - t0))
      start = "im_start"
    elif stop == special["im_start"] or (stop == special["vision_start"] and not settings.recover):
      start = "im_start"
    else:
      stopped_by = "end_of_text" if stop == special["endoftext"] else "no_stop_token"
      break
  answer_text = cut_answers("\n".join(s.text for s in steps if s.kind == "text"))
  return Exchange(text_prompt, steps, answer_text, extract_answer(answer_text, options),
                  stopped_by, seconds)


def _clean(text: str, special: dict[str, int], engine: engine_lib.Engine) -> str:
  """Generated text without its block markers."""
  for name in ("im_start", "im_end"):
    text = text.replace(engine.decode([special[name]]), "")
  return text.strip()


@contextlib.contextmanager
def _timed(totals: dict[str, float], phase: str):
  t0 = time.perf_counter()
  try:
    yield
  finally:
    totals[phase] = totals.get(phase, 0.0) + time.perf_counter() - t0
