"""The Robust-R1 answer texts of the shapes world's questions, and the world's text corpus.

`answer_text(question, corruption_name)` fills the Robust-R1 answer format (`answer_format.py`)
from what the world knows about a question: which corruptions hurt which question kinds, and how
the answer is found in the scene. The pipeline calls it after corrupting, when the corruption is
known.

Apart from `shapes.py`, which draws the scene and asks its questions: an answer depends on the
corruption applied later, not only on the record. `text_corpus` is here because the tokenizer's
corpus holds these answers beside the world's captions and questions.
"""

from collections.abc import Sequence

from robust_u1_jax.data import answer_format
from robust_u1_jax.data import shapes

# What each known corruption does to the scene: (effect sentence, question kinds it makes harder).
_EFFECTS = {
    "noise": ("Random noise speckles every pixel and hides fine detail.",
              ("color", "shape", "existence")),
    "blur": ("Blur smears the edges, so outlines soften and nearby objects run together.",
             ("shape", "count", "existence")),
    "blocks": ("Blocky artifacts break the outlines into coarse squares.",
               ("shape", "count", "existence")),
    "color": ("The colors and brightness are shifted away from their true values.",
              ("color", "existence")),
    "occlusion": ("Overlays cover parts of the image and can hide objects.", shapes.QUESTION_KINDS),
    "warp": ("The image is warped, which bends the outlines.", ("shape", "existence")),
    "sharpen": ("Sharpening adds halos and ringing around the edges.", ("shape",)),
}
# Every ImageNet-C and Robust-R1 corruption of docs/design.md#corruptions, by effect.
CORRUPTION_EFFECTS = {
    "gaussian_noise": "noise", "shot_noise": "noise", "impulse_noise": "noise",
    "speckle_noise": "noise", "defocus_blur": "blur", "glass_blur": "blur", "motion_blur": "blur",
    "zoom_blur": "blur", "gaussian_blur": "blur", "lens_blur": "blur",
    "atmospheric_turbulence": "blur", "pixelate": "blocks", "jpeg_compression": "blocks",
    "block_exchange": "blocks", "saturate": "color", "hsv_saturation": "color",
    "brightness": "color", "contrast": "color", "mean_shift": "color", "color_diffusion": "color",
    "dark_illumination": "color", "snow": "occlusion", "frost": "occlusion", "fog": "occlusion",
    "spatter": "occlusion", "lens_flare": "occlusion", "dirty_lens": "occlusion",
    "graffiti": "occlusion", "watermark_damage": "occlusion", "scan_lines": "occlusion",
    "elastic_transform": "warp", "sharpness_change": "sharpen",
}
_ATTRIBUTE_WORDS = {"color": "the colors", "shape": "the shapes", "count": "the number of objects",
                    "position": "the positions", "existence": "colors and shapes"}


# ---------------------------------------------------------------------------------- answer text

def _count_phrase(n: int, singular: str, plural: str) -> str:
  return f"{shapes.NUMBER_WORDS[n]} {singular if n == 1 else plural}"


def _influence(kind: str, applied: Sequence[tuple[str, object]]) -> str:
  """The INFLUENCE field: what the applied corruptions do to questions of `kind`."""
  if not applied:
    return "The image is clean, so colors, shapes and counts can be read directly."
  sentences, hurt = [], set()
  for name, _ in applied:
    words = answer_format.corruption_words(name)
    effect = CORRUPTION_EFFECTS.get(name.split("/")[-1])
    sentence, attrs = (_EFFECTS[effect] if effect else
                       (f"The {words} degrades the image and hides detail.", shapes.QUESTION_KINDS))
    if sentence not in sentences:
      sentences.append(sentence)
    hurt.update(attrs)
  attribute = _ATTRIBUTE_WORDS[kind]
  if kind in hurt:
    sentences.append(f"This makes {attribute} harder to judge, so I check the recovered image.")
  else:
    verb = "is" if kind == "count" else "are"
    sentences.append(f"{attribute[0].upper() + attribute[1:]} {verb} still reliable.")
  return " ".join(sentences)


def _reasoning_and_conclusion(q: dict) -> tuple[str, str]:
  t, kind, subject = q["target"], q["kind"], q["subject"]
  option = f"which is option {q['answer']}."
  if kind in ("color", "shape"):
    where = "" if "at the" in subject else f" It is at the {t['quadrant']}."
    if kind == "color":
      return (f"I look for {subject}.{where} Its color is closest to {t['color']}.",
              f"{subject[0].upper() + subject[1:]} is {t['color']}, {option}")
    return (f"I look for {subject}.{where} Its outline matches {shapes.a_or_an(t['shape'])}.",
            f"{subject[0].upper() + subject[1:]} is {shapes.a_or_an(t['shape'])}, {option}")
  if kind == "count":
    n = t["count"]
    if n == 0:
      return (f"I check every object and find no {t['plural']}.",
              f"There are no {t['plural']}, {option}")
    quads = list(dict.fromkeys(t["quadrants"]))
    where = quads[0] if len(quads) == 1 else ", ".join(quads[:-1]) + " and " + quads[-1]
    verb = "is" if n == 1 else "are"
    return (f"I count the {t['plural']} one by one and find {shapes.NUMBER_WORDS[n]}, "
            f"at the {where}.",
            f"There {verb} {_count_phrase(n, t['singular'], t['plural'])}, {option}")
  if kind == "position":
    vertical, horizontal = t["quadrant"].split()
    where = {"quadrant": f"at the {t['quadrant']}", "horizontal": f"on the {horizontal}",
             "vertical": f"in the {vertical} half"}[t["axis"]]
    return (f"I find {subject}. Its center is in the {vertical} half and the {horizontal} half "
            f"of the image.", f"{subject[0].upper() + subject[1:]} is {where}, {option}")
  if kind == "existence":
    thing = f"{t['color']} {t['shape']}"
    if t["present"]:
      return (f"I check each object for {shapes.a_or_an(thing)}. There is one at the "
              f"{t['quadrant']}.", f"Yes, there is {shapes.a_or_an(thing)}, {option}")
    return (f"I check each object for {shapes.a_or_an(thing)}. None of the objects is "
            f"{shapes.a_or_an(thing)}.", f"No, there is no {thing}, {option}")
  raise ValueError(f"question kind {kind!r} is unknown: allowed {', '.join(shapes.QUESTION_KINDS)}")


def answer_text(question: dict, corruption_name: str | Sequence[str] | None = None, *,
                strength: float | Sequence[float] | None = None) -> str:
  """The Robust-R1 answer for `question`, ending exactly with `<ANSWER>X<ANSWER_END>`.

  Args:
    question: a question dict of a shapes-world record.
    corruption_name: the applied corruption ("gaussian_noise", "imagenet_c/pixelate"), a list of
      them (pipeline stages), or None / "none" for a clean image.
    strength: optional intensity or severity per corruption, written as `name(0.45)` in TYPE.
  """
  applied = answer_format.applied_corruptions(corruption_name, strength)
  reasoning, conclusion = _reasoning_and_conclusion(question)
  return answer_format.format_answer(answer_format.type_text(applied),
                                     _influence(question["kind"], applied), reasoning, conclusion,
                                     question["answer"])


# --------------------------------------------------------------------------------------- corpus

def text_corpus(corruption_names: Sequence[str] = (), num_records: int = 200) -> list[str]:
  """Every kind of text the world produces, deterministically (the tokenizer's training corpus).

  Captions, prompts and answer texts of `num_records` validation records (answers cycle through
  `corruption_names` with and without a strength), plus every vocabulary word on its own.
  """
  names = ["none", *sorted(set(corruption_names) | set(CORRUPTION_EFFECTS))]
  world = shapes.ShapesWorld("validation", size=num_records, seed=0)
  texts, k = [], 0
  for i in range(num_records):
    rec = world.record(i, render=False)
    texts.append(rec["caption"])
    for q in rec["questions"]:
      texts.append(answer_format.format_question(q))
      name = names[k % len(names)]
      texts.append(answer_text(q, name, strength=(k % 5) / 4 if k % 2 else None))
      k += 1
  words = [*shapes.COLOR_NAMES, *shapes.SHAPES, *shapes.PLURALS.values(), *shapes.BACKGROUNDS,
           *shapes.QUADRANTS, *shapes.NUMBER_WORDS, *shapes.QUESTION_KINDS, "yes", "no", "left",
           "right", "top", "bottom", "half", "center",
           *(answer_format.corruption_words(n) for n in names)]
  texts.extend(" ".join(words[i:i + 8]) for i in range(0, len(words), 8))
  return texts
