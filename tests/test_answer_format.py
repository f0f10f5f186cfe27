"""The question and answer format shared by every source: prompts, the five tagged fields, the
letter read back."""

import re

import numpy as np
import pytest

from robust_u1_jax.data import answer_format


def test_format_question_is_the_release_prompt_with_every_option_lettered():
  q = {"question": "What color is the circle?", "options": ["red", "blue", "green", "cyan", "pink"]}
  lines = answer_format.format_question(q).split("\n")
  # VQA tables may carry more options than the shapes world's four.
  options = ["A. red", "B. blue", "C. green", "D. cyan", "E. pink"]
  assert lines == ["Question: What color is the circle?", "Options:", *options,
                   answer_format.SELECT, ""]
  lines = answer_format.format_question(q, answer_format.RESTORE).split("\n")
  assert lines == ["Question: What color is the circle?", "Options:", *options,
                   answer_format.RESTORE, answer_format.ANSWER_FROM_RESTORED, ""]
  assert answer_format.format_question({"question": "Why?"}) == "Question: Why?\n"
  # Without options, the request after the recovery names none.
  assert answer_format.format_question({"question": "Why?"}, answer_format.RESTORE) == (
      f"Question: Why?\n{answer_format.RESTORE}\n{answer_format.ANSWER_OPEN_FROM_RESTORED}\n")


def test_format_answer_has_the_five_fields_in_order():
  text = answer_format.format_answer("blur(0.45)", "Edges soften.", "I look.", "It is red.", "B")
  tags = re.findall(r"<([A-Z_]+)>", text)
  assert tags == [t for f in answer_format.FIELDS for t in (f, f"{f}_END")]
  assert text.endswith(answer_format.bare_answer("B")) and text.count("\n") == 4
  assert answer_format.parse_answer(text) == "B"


@pytest.mark.parametrize("text,letter", [
    ("<ANSWER>C<ANSWER_END>", "C"),
    ("<ANSWER> d <ANSWER_END>", "D"),  # spaces and lower case, as a model may write them
    ("<ANSWER>A<ANSWER_END> then <ANSWER>B<ANSWER_END>", "B"),  # the last one counts
    ("no answer here", None),
    ("<ANSWER>C", None),  # unterminated
])
def test_parse_answer(text, letter):
  assert answer_format.parse_answer(text) == letter


def test_type_text_names_corruptions_with_their_strengths():
  applied = answer_format.applied_corruptions(["robust_r1/lens_blur", "imagenet_c/saturate"],
                                              [0.2, np.int64(3)])
  assert answer_format.type_text(applied) == "lens blur(0.20), saturate(3)"
  one = answer_format.applied_corruptions("gaussian_noise", 0.45)
  assert answer_format.type_text(one) == "gaussian noise(0.45)"
  assert answer_format.type_text(answer_format.applied_corruptions("mystery_filter")) == (
      "mystery filter")
  for clean in (None, "none", [], ["none", ""]):
    assert answer_format.applied_corruptions(clean) == []
  assert answer_format.type_text([]) == "none"
  with pytest.raises(ValueError, match="one strength per corruption"):
    answer_format.applied_corruptions(["lens_blur", "fog"], [0.1])


def test_a_prompt_refuses_options_it_cannot_letter():
  # A string read as one option per character; a 27th option had no letter (an IndexError).
  with pytest.raises(ValueError, match="options: a list of option texts, got the string 'red'"):
    answer_format.prompt("Which colour?", "red")
  with pytest.raises(ValueError, match="27 options; at most 26, one per letter A to Z"):
    answer_format.prompt("Which?", [f"o{i}" for i in range(27)])
