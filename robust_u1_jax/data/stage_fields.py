"""What a stage reads from a record: `StageFields`, the pipeline's map after corruption.

It adds the ViT-size copy of the corrupted image, the description of the applied corruption, and
the stage's texts: the recovery instruction (or the record's own prompt) for SFT and RL; for the
reasoning, VQA and pretraining stages one question drawn from (seed, index, epoch) with its
answer (the Robust-R1 format for the shapes world, `shapes_answers.answer_text`; the bare answer
otherwise), and for pretraining the caption too.

Apart from `pipeline.py`, which orders the maps and batches the records: which texts a stage's
records carry, and how a question and its answer are chosen, is decided here alone.
"""

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from robust_u1_jax.data import answer_format
from robust_u1_jax.data import bad_records
from robust_u1_jax.data import shapes_answers
from robust_u1_jax.data import transforms

# Mixed into the question draw so it is independent of the corruption draw of the same record.
_QUESTION_STREAM = 0x9_0E57
# The same for the draw of an SFT or RL record's question prompt (data.question_prompt_fraction).
_PROMPT_STREAM = 0x9_0E58


def _steps_and_levels(record: Mapping[str, Any]) -> tuple[list[str], list[int | float]]:
  """Applied corruption names with their levels: ImageNet-C severities as ints."""
  steps = list(record.get("corruption_steps", []))
  levels = [int(v) if name.startswith("imagenet_c/") else float(v)
            for name, v in zip(steps, record.get("corruption_levels", []))]
  return steps, levels


def _steps_text(record: Mapping[str, Any]) -> str:
  steps, levels = _steps_and_levels(record)
  if not steps:
    return str(record.get("corruption", "none"))
  return "+".join(f"{name}({level})" if isinstance(level, int) else f"{name}({level:.2f})"
                  for name, level in zip(steps, levels))


def _answer_text(question: Mapping[str, Any], record: Mapping[str, Any]) -> str:
  """The reasoning target: Robust-R1 format for the shapes world, the bare answer otherwise."""
  if "target" in question:  # a shapes-world question: its reasoning text is known
    steps, levels = _steps_and_levels(record)
    return shapes_answers.answer_text(question, steps or None, strength=levels or None)
  answer = str(question["answer"])
  # A JSONL row's answer is written out by the data (Robust-R1 reasoning), unless it has no answer
  # field: then it is the answer alone ("B"), trained in the field that `answer` reads.
  if question.get("raw_answer") and answer_format.ANSWER_TAG in answer:
    return answer
  return answer_format.bare_answer(answer.strip())


class StageFields(grain.transforms.Map):
  """Adds the stage's texts, the ViT-size corrupted image and the corruption description."""

  def __init__(self, stage: str, *, seed: int, instruction: str, vit_rule: Mapping[str, int],
               question_prompt_fraction: float = 0.0):
    self.stage, self.seed, self.instruction = stage, int(seed), instruction
    self.vit_rule = dict(vit_rule)
    self.question_prompt_fraction = float(question_prompt_fraction)

  def map(self, element):
    if bad_records.is_skip(element):
      return element
    out = dict(element)
    if out["corrupted"].shape != out["clean"].shape:  # stored pairs of different sizes
      out["corrupted"] = transforms.resize_image(out["corrupted"], out["clean"].shape[:2])
    out["corrupted_vit"], _ = transforms.bagel_resize(out["corrupted"], **self.vit_rule)
    if self.stage not in ("sft", "rl"):
      out = self._question(out)
      if self.stage == "pretrain" and not bad_records.is_skip(out):
        out = self._caption(out)
    else:
      prompt = out.get("prompt")  # Robust-R1 pairs carry their own instruction
      out["instruction"] = prompt if isinstance(prompt, str) and prompt else self.instruction
      if self.question_prompt_fraction > 0 and out.get("questions"):
        out["instruction"] = self._question_prompt(out)
    if not bad_records.is_skip(out):
      out["corruption_steps"] = _steps_text(out)
    return out

  def _rng(self, out: dict, stream: int) -> np.random.Generator:
    """The record's draws of `stream` in this epoch, whatever the batch or process reads it."""
    return np.random.default_rng([self.seed, int(out["index"]), int(out.get("epoch", 0)), stream])

  def _question_prompt(self, out: dict) -> str:
    """The instruction, or for data.question_prompt_fraction of the records (drawn per record and
    epoch) the release's prompt for one of the record's questions around it: the context in which
    `answer` generates its recovery, so the generation path recovers there too."""
    rng = self._rng(out, _PROMPT_STREAM)
    if rng.uniform() >= self.question_prompt_fraction:
      return out["instruction"]
    questions = out["questions"]
    return answer_format.format_question(questions[int(rng.integers(len(questions)))],
                                         out["instruction"])

  def _caption(self, out: dict) -> dict:
    caption = out.get("caption")
    if not isinstance(caption, str) or not caption:
      return bad_records.skip_record(
          f"stage {self.stage!r} needs a record with a 'caption' text (the shapes world has "
          f"one); this one has {sorted(out)}", out.get("path"), out.get("index"),
          out.get("epoch"))
    out["caption_text"] = caption
    return out

  def _question(self, out: dict) -> dict:
    questions = out.get("questions")
    if not questions and isinstance(out.get("question"), str) and isinstance(
        out.get("answer"), str):  # a JSONL row of reasoning data: {question, answer, options?}
      questions = [{"question": out["question"], "answer": out["answer"], "raw_answer": True,
                    "options": out.get("options") or ()}]
    if not questions:
      return bad_records.skip_record(
          f"stage {self.stage!r} needs a record with 'questions' (shapes world, VQA tables) or "
          f"'question' and 'answer' texts (JSONL); this one has {sorted(out)}",
          out.get("path"), out.get("index"), out.get("epoch"))
    rng = self._rng(out, _QUESTION_STREAM)
    q = questions[int(rng.integers(len(questions)))]
    question = answer_format.format_question(q)
    # The config's instruction, not a row's prompt: the on-the-fly recovery reads it too.
    recovery_question = answer_format.format_question(q, self.instruction)
    if self.stage == "reason":
      question = recovery_question
    answer = _answer_text(q, out)
    letter = (answer_format.parse_answer(answer) or "") if q.get("raw_answer") else str(q["answer"])
    out.update(question=question, answer=answer, question_text=question, answer_letter=letter)
    out["answer_text"] = out["answer"]
    if self.stage == "pretrain":  # the base's two-image rows
      out["recovery_question"] = recovery_question
    return out
