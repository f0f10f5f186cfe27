"""Tests of the built-in shapes world: determinism, splits, rendering vs metadata, questions."""

import colorsys
import hashlib
import math
import pickle
import re

import numpy as np
import pytest

from robust_u1_jax.data import answer_format
from robust_u1_jax.data import shapes
from robust_u1_jax.data import shapes_answers


@pytest.fixture(scope="module")
def sample():
  world = shapes.ShapesWorld("train", size=1000)
  return [world[i] for i in range(300)]


def _digest(image: np.ndarray) -> str:
  return hashlib.sha256(image.tobytes()).hexdigest()


def test_record_structure(sample):
  rec = sample[0]
  assert {"image", "caption", "objects", "questions", "background", "split", "index",
          "id"} <= set(rec)
  assert rec["image"].shape == (64, 64, 3) and rec["image"].dtype == np.uint8
  for o in rec["objects"]:
    assert set(o) == {"shape", "color", "center", "size", "rotation", "quadrant"}
  for q in rec["questions"]:
    assert {"kind", "question", "options", "answer", "answer_index", "answer_option", "subject",
            "target"} <= set(q)
    assert 2 <= len(q["options"]) <= 6 and len(set(q["options"])) == len(q["options"])
    assert q["answer"] == shapes.LETTERS[q["answer_index"]]
    assert q["options"][q["answer_index"]] == q["answer_option"]


def test_deterministic_and_seeded():
  a = shapes.ShapesWorld("validation", seed=3)
  b = shapes.ShapesWorld("validation", seed=3)
  c = shapes.ShapesWorld("validation", seed=4)
  for i in (0, 7, 999):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    assert ra["caption"] == rb["caption"] and ra["questions"] == rb["questions"]
  assert _digest(a[5]["image"]) != _digest(c[5]["image"])
  # Texts do not depend on rendering, so the tokenizer corpus can skip images.
  text_only = a.record(7, render=False)
  assert "image" not in text_only and text_only["questions"] == a[7]["questions"]
  assert shapes_answers.text_corpus(num_records=20) == shapes_answers.text_corpus(num_records=20)


def test_random_access_and_bounds():
  world = shapes.ShapesWorld("test", size=10)
  assert len(world) == 10 and len(shapes.ShapesWorld("train")) == 100_000
  np.testing.assert_array_equal(world[-1]["image"], world[9]["image"])
  assert world[np.int64(3)]["index"] == 3
  with pytest.raises(IndexError, match="out of range"):
    world[10]
  restored = pickle.loads(pickle.dumps(world))  # Grain workers receive the source pickled
  np.testing.assert_array_equal(restored[4]["image"], world[4]["image"])


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, "train, validation, test"),
    ({"image_size": 31}, ">= 32"),
    ({"image_size": (64, 16)}, ">= 32"),
    ({"image_size": (64, 64, 3)}, "pair"),
    ({"size": 0}, "positive"),
    ({"seed": -1}, ">= 0"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    shapes.ShapesWorld(**kwargs)


def test_splits_disjoint_and_streams_independent():
  digests = {}
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split, size=200)
    digests[split] = {_digest(world[i]["image"]) for i in range(150)}
    assert len(digests[split]) == 150
  assert not digests["train"] & digests["validation"]
  assert not digests["train"] & digests["test"]
  assert not digests["validation"] & digests["test"]
  # The same index in different splits (or seeds) draws unrelated streams.
  n = 400
  streams = {(split, seed): np.asarray([shapes._Draws(shapes.record_key(split, i, seed)).random()
                                        for i in range(n)])
             for split in shapes.SPLITS for seed in (0, 1)}
  keys = list(streams)
  for j, k1 in enumerate(keys):
    for k2 in keys[j + 1:]:
      assert abs(np.corrcoef(streams[k1], streams[k2])[0, 1]) < 0.2, (k1, k2)
      assert not np.any(streams[k1] == streams[k2])
  assert len({shapes.record_key(s, i, 0) for s in shapes.SPLITS for i in range(1000)}) == 3000


@pytest.mark.parametrize("image_size", [64, (40, 72), 96])
def test_objects_match_pixels(image_size):
  world = shapes.ShapesWorld("train", image_size=image_size, seed=1)
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  scale = min(h, w) / 64
  palette = np.asarray([shapes.COLORS[c] for c in shapes.COLOR_NAMES]) * 255
  for i in range(40):
    rec = world[i]
    assert rec["image"].shape == (h, w, 3)
    objs = rec["objects"]
    assert 1 <= len(objs) <= 4
    for k, o in enumerate(objs):
      cx, cy = o["center"]
      assert 9 * scale - 1e-6 <= o["size"] <= 20 * scale + 1e-6
      assert 0 < cx - o["size"] / 2 and cx + o["size"] / 2 < w
      assert 0 < cy - o["size"] / 2 and cy + o["size"] / 2 < h
      assert o["quadrant"] == ("top" if cy < h / 2 else "bottom") + " " + (
          "left" if cx < w / 2 else "right")
      for p in objs[k + 1:]:  # no overlaps, so counts are well defined
        assert math.hypot(cx - p["center"][0], cy - p["center"][1]) > (o["size"] + p["size"]) / 2
      # The pixel at the object's centre has the object's named colour (nearest in the palette).
      pixel = rec["image"][int(cy), int(cx)].astype(float)
      nearest = shapes.COLOR_NAMES[int(np.argmin(np.linalg.norm(palette - pixel, axis=1)))]
      assert nearest == o["color"], (i, o, pixel)


def test_colors_are_separated_and_backgrounds_muted(sample):
  hues = sorted(colorsys.rgb_to_hsv(*shapes.COLORS[c])[0] * 360 for c in shapes.COLOR_NAMES)
  gaps = np.diff(hues + [hues[0] + 360])
  # About 60 degrees apart: a strong hue shift turns one named colour into its neighbour.
  assert gaps.min() > 40 and gaps.max() < 80
  for c in shapes.COLOR_NAMES:
    assert colorsys.rgb_to_hsv(*shapes.COLORS[c])[1] > 0.7
  for rec in sample[:50]:  # corners are background (objects keep off the border)
    for y, x in ((0, 0), (0, -1), (-1, 0), (-1, -1)):
      r, g, b = rec["image"][y, x] / 255
      assert colorsys.rgb_to_hsv(r, g, b)[1] < 0.4, rec["index"]


def _find(objects, color=None, shape=None, quadrant=None):
  return [o for o in objects if (color is None or o["color"] == color)
          and (shape is None or o["shape"] == shape)
          and (quadrant is None or o["quadrant"] == quadrant)]


def _parse_subject(subject: str) -> dict:
  m = re.fullmatch(r"the (\w+)( object)?(?: at the (\w+ \w+))?", subject)
  word, is_color, quadrant = m.groups()
  return {"color" if is_color else "shape": word, "quadrant": quadrant}


def _truth(q: dict, objects: list[dict]) -> str:
  """The correct option re-derived from the objects and the question's wording only."""
  kind = q["kind"]
  if kind in ("color", "shape"):
    (o,) = _find(objects, **_parse_subject(q["subject"]))
    return o[kind]
  if kind == "count":
    m = re.fullmatch(r"How many (?:(\w+) )?(\w+) are there\?", q["question"])
    color, noun = m.groups()
    if noun == "objects":
      return str(len(_find(objects, color=color)))
    shape = next(s for s, p in shapes.PLURALS.items() if p == noun)
    return str(len(_find(objects, color=color, shape=shape)))
  if kind == "position":
    color, shape = re.search(r"the (\w+) (\w+)", q["question"]).groups()
    (o,) = _find(objects, color=color, shape=shape)
    if q["question"].startswith("Where"):
      return o["quadrant"]
    vertical, horizontal = o["quadrant"].split()
    return horizontal if "left or" in q["question"] else vertical
  if kind == "existence":
    color, shape = re.fullmatch(r"Is there an? (\w+) (\w+)\?", q["question"]).groups()
    return "yes" if _find(objects, color=color, shape=shape) else "no"
  raise AssertionError(kind)


def test_answers_are_true(sample):
  for rec in sample:
    kinds = [q["kind"] for q in rec["questions"]]
    assert "count" in kinds and "existence" in kinds
    for q in rec["questions"]:
      assert _truth(q, rec["objects"]) == q["answer_option"], (rec["index"], q)


def test_balance_and_coverage(sample):
  kinds, counts, colors, shapes_seen = set(), set(), set(), set()
  for rec in sample:
    counts.add(len(rec["objects"]))
    colors.update(o["color"] for o in rec["objects"])
    shapes_seen.update(o["shape"] for o in rec["objects"])
    kinds.update(q["kind"] for q in rec["questions"])
  assert kinds == set(shapes.QUESTION_KINDS)
  assert counts == {1, 2, 3, 4}
  assert colors == set(shapes.COLOR_NAMES) and shapes_seen == set(shapes.SHAPES)


def test_fixed_options_with_answers_a_blind_model_cannot_guess():
  """Every question of a kind (position: of an axis) lists the same options in the same order, so
  the letter is a function of the answer; answers are about uniform over those options, so
  neither the most frequent answer nor the most frequent letter beats chance by much."""
  world = shapes.ShapesWorld("validation", size=1500)
  by_options = {}
  for i in range(1500):
    for q in world.record(i, render=False)["questions"]:
      by_options.setdefault(tuple(q["options"]), []).append(q)
  assert set(by_options) == set(shapes.OPTIONS.values())
  for options, qs in by_options.items():
    for q in qs:
      assert q["answer"] == shapes.LETTERS[q["answer_index"]]
      assert q["options"][q["answer_index"]] == q["answer_option"]
    assert len(qs) > 100, options
    freq = np.bincount([q["answer_index"] for q in qs], minlength=len(options)) / len(qs)
    chance = 1 / len(options)
    np.testing.assert_allclose(freq, chance, atol=0.07, err_msg=str(options))


def test_answer_text(sample):
  q = next(q for q in sample[0]["questions"] if len(q["options"]) >= 2)
  assert set(q["answer"]) <= set(shapes.LETTERS)
  clean = shapes_answers.answer_text(q)
  assert clean.endswith(f"<ANSWER>{q['answer']}<ANSWER_END>")
  assert clean.startswith("<TYPE>none<TYPE_END>")
  tags = re.findall(r"<([A-Z_]+)>", clean)
  assert tags == ["TYPE", "TYPE_END", "INFLUENCE", "INFLUENCE_END", "REASONING", "REASONING_END",
                  "CONCLUSION", "CONCLUSION_END", "ANSWER", "ANSWER_END"]
  assert answer_format.parse_answer(clean) == q["answer"]

  noisy = shapes_answers.answer_text(q, "robust_r1/gaussian_noise", strength=0.45)
  assert "<TYPE>gaussian noise(0.45)<TYPE_END>" in noisy
  assert "noise" in noisy.split("<INFLUENCE>")[1]
  both = shapes_answers.answer_text(q, ["lens_blur", "imagenet_c/saturate"], strength=[0.2, 3])
  assert "<TYPE>lens blur(0.20), saturate(3)<TYPE_END>" in both
  assert "Blur" in both and "colors and brightness" in both
  unknown = shapes_answers.answer_text(q, "mystery_filter")
  assert "<TYPE>mystery filter<TYPE_END>" in unknown
  with pytest.raises(ValueError, match="one strength per corruption"):
    shapes_answers.answer_text(q, ["lens_blur", "fog"], strength=[0.1])


def test_influence_names_the_attribute_the_corruption_destroys():
  world = shapes.ShapesWorld("validation", size=50)
  by_kind = {}
  for i in range(50):
    for q in world.record(i, render=False)["questions"]:
      by_kind.setdefault(q["kind"], q)
  def influence(kind, name):
    return shapes_answers.answer_text(by_kind[kind], name).split("<INFLUENCE>")[1]
  assert "harder to judge" in influence("color", "hsv_saturation")
  assert "still reliable" in influence("color", "motion_blur")
  assert "harder to judge" in influence("count", "pixelate")
  assert "harder to judge" in influence("shape", "defocus_blur")
  assert "still reliable" in influence("count", "brightness")
  for name in shapes_answers.CORRUPTION_EFFECTS:  # every known corruption has an explicit effect
    assert "degrades the image and hides detail" not in influence("shape", name)


def test_caption_mentions_every_object(sample):
  for rec in sample[:100]:
    cap = rec["caption"]
    assert cap[0].isupper() and (cap.endswith(f"on a {rec['background']} background.")
                                 or cap.endswith(f"on an {rec['background']} background."))
    for o in rec["objects"]:
      assert o["color"] in cap
      assert o["shape"] in cap  # "cross" is also inside "crosses"


def test_corruption_destroys_what_the_questions_ask():
  """Colour answers flip under a 60-degree hue shift; counts blur together; both clean-exact."""
  from scipy import ndimage

  def blob_count(img):
    top = img.max(axis=-1)
    saturation = (top - img.min(axis=-1)) / np.maximum(top, 1e-6)
    mask = (saturation > 0.45) & (top > 0.3)  # object pixels: backgrounds are muted
    labels, k = ndimage.label(mask)
    return int((np.asarray(ndimage.sum(mask, labels, range(1, k + 1))) >= 5).sum())

  def nearest_name(rgb):
    palette = np.asarray([shapes.COLORS[c] for c in shapes.COLOR_NAMES])
    return shapes.COLOR_NAMES[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]

  world = shapes.ShapesWorld("validation", size=100)
  counts = {"clean": 0, "blur": 0, "pixelate": 0}
  colors = {"clean": 0, "shifted": 0}
  n_objects = 0
  for i in range(100):
    rec = world[i]
    img = rec["image"] / 255.0
    n = len(rec["objects"])
    counts["clean"] += blob_count(img) == n
    counts["blur"] += blob_count(ndimage.gaussian_filter(img, sigma=(3.5, 3.5, 0))) == n
    counts["pixelate"] += blob_count(img[4::8, 4::8].repeat(8, 0).repeat(8, 1)) == n
    for o in rec["objects"]:
      rgb = img[int(o["center"][1]), int(o["center"][0])]
      h, sat, val = colorsys.rgb_to_hsv(*rgb)
      n_objects += 1
      colors["clean"] += nearest_name(rgb) == o["color"]
      shifted = colorsys.hsv_to_rgb((h + 1 / 6) % 1, sat, val)
      colors["shifted"] += nearest_name(shifted) == o["color"]
  assert counts["clean"] == 100
  assert counts["blur"] < 90 and counts["pixelate"] < 90, counts
  assert colors["clean"] == n_objects and colors["shifted"] < 0.1 * n_objects, colors
