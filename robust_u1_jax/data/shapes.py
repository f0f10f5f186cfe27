"""The built-in procedural shapes world: images, captions, multiple-choice VQA
(docs/design.md#the-built-in-shapes-world).

Every record is a pure function of (split, index, seed), so Grain can shuffle, shard and resume
over it without storing anything. A record holds 1 to 4 small anti-aliased objects (5 shapes,
6 colours) on a muted textured background, a caption, and one question of each kind that the scene
supports (colour, shape, count, position, existence) with 2 to 6 lettered options.

The world is built so that corruption matters: objects are 9-20 px at 64 x 64 (heavy blur or
pixelation merges them and rounds their outlines), object colours are saturated hues about 60
degrees apart (a strong hue shift or colour noise turns one named colour into its neighbour), and
backgrounds are low-saturation so they are never mistaken for an object colour.

Every question of a kind lists the same options in the same order (all six colours, all five
shapes, counts 0..4, the four quadrants, left / right, top / bottom, yes / no), so the option
letter is a fixed function of the answer. Answers are about uniform over each kind's options
(count answers by weighting the counts), so the options alone give a blind model little more than
chance. Fixed options keep what the world tests (reading the image) apart from a text skill it
does not: with options drawn and shuffled per question, the letter is an in-context lookup of the
concluded word among the options, which BAGEL brings from Qwen2.5's language pretraining and the
tiny from-scratch LLM did not learn in the demo's budget (its letters matched its own conclusions
no more often than random letters; docs/design.md#the-built-in-shapes-world).

The answers to the questions, which depend on the corruption applied later, are written by
`shapes_answers.py`.
"""

from collections.abc import Sequence
import colorsys
import functools
import hashlib
import math
import random

import numpy as np

# Hue order matters: neighbours in this tuple are what a strong hue shift confuses.
COLORS = {
    "red": (0.88, 0.14, 0.14),
    "yellow": (0.93, 0.83, 0.12),
    "green": (0.14, 0.70, 0.22),
    "cyan": (0.10, 0.78, 0.86),
    "blue": (0.14, 0.30, 0.92),
    "purple": (0.66, 0.20, 0.86),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "star", "cross")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars",
           "cross": "crosses"}
# Circumradius of each outline in units of the nominal radius (size / 2): bounding boxes, spacing.
_EXTENT = {"circle": 1.0, "square": 1.14, "triangle": 1.15, "star": 1.1, "cross": 1.0}
QUESTION_KINDS = ("color", "shape", "count", "position", "existence")
BACKGROUNDS = ("mottled", "striped", "checkered", "gradient")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
MAX_OBJECTS = 4
NUMBER_WORDS = ("no", "one", "two", "three", "four")
# Count-question weights by answer; fitted so that answers 0..4 come out about equally often.
_COUNT_WEIGHTS = (1.0, 1.0, 2.5, 8.0, 20.0)
# The options of each question kind (position questions: by axis), in the order they are listed.
OPTIONS = {"color": COLOR_NAMES, "shape": SHAPES,
           "count": tuple(str(n) for n in range(MAX_OBJECTS + 1)), "quadrant": QUADRANTS,
           "horizontal": ("left", "right"), "vertical": ("top", "bottom"),
           "existence": ("yes", "no")}
LETTERS = "ABCDEF"
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 100_000, "validation": 1_000, "test": 1_000}
MIN_IMAGE_SIDE = 32


# ------------------------------------------------------------------------------------ randomness

class _Draws:
  """Scalar draws built only on `random.Random.random`, whose sequence for an int seed Python
  guarantees across versions (its randint/choice/shuffle are not). Python's generator is also an
  order of magnitude cheaper per scalar draw than numpy's, which matters at 0.5 ms per record."""

  def __init__(self, key: int):
    self.random = random.Random(key).random

  def uniform(self, lo: float, hi: float) -> float:
    return lo + (hi - lo) * self.random()

  def randint(self, n: int) -> int:
    return min(int(self.random() * n), n - 1)

  def choice(self, seq):
    return seq[self.randint(len(seq))]

  def weighted_choice(self, items: Sequence, weights: Sequence[float]):
    u = self.random() * sum(weights)
    for item, w in zip(items, weights):
      u -= w
      if u < 0:
        return item
    return items[-1]


def record_key(split: str, index: int, seed: int) -> int:
  """The 128-bit seed of one record's stream: a hash of (split, seed, index), so streams of
  different splits, seeds and indices are unrelated and any record is reachable directly."""
  digest = hashlib.blake2b(f"robust_u1_jax.shapes|{split}|{seed}|{index}".encode(),
                           digest_size=16).digest()
  return int.from_bytes(digest, "little")


# ---------------------------------------------------------------------------------------- scene

def _quadrant(cx: float, cy: float, h: int, w: int) -> str:
  return ("top " if cy < h / 2 else "bottom ") + ("left" if cx < w / 2 else "right")


def _sample_objects(d: _Draws, h: int, w: int) -> list[dict]:
  scale = min(h, w) / 64
  gap = max(2.0, 0.05 * min(h, w))  # centres stay off the midlines, so quadrants are well defined
  objects: list[dict] = []
  for _ in range(1 + d.randint(MAX_OBJECTS)):
    # Repeats make counting subsets ("how many blue squares") non-trivial.
    color = objects[-1]["color"] if objects and d.random() < 0.3 else d.choice(COLOR_NAMES)
    shape = objects[-1]["shape"] if objects and d.random() < 0.3 else d.choice(SHAPES)
    size = d.uniform(9.0, 20.0) * scale
    ext = _EXTENT[shape] * size / 2
    for _ in range(100):
      cx, cy = d.uniform(ext + 1, w - ext - 1), d.uniform(ext + 1, h - ext - 1)
      if abs(cx - w / 2) < gap or abs(cy - h / 2) < gap:
        continue
      if all(math.hypot(cx - o["center"][0], cy - o["center"][1])
             >= ext + _EXTENT[o["shape"]] * o["size"] / 2 + 1.5 for o in objects):
        break
    else:
      continue  # no room: fewer objects, so every count stays true
    objects.append({"shape": shape, "color": color, "center": (round(cx, 2), round(cy, 2)),
                    "size": round(size, 2), "rotation": round(d.uniform(-15.0, 15.0), 1),
                    "quadrant": _quadrant(cx, cy, h, w)})
  return objects


@functools.lru_cache(maxsize=64)
def _upsample_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights with both ends aligned."""
  pos = np.linspace(0.0, n_in - 1, n_out)
  lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
  frac = (pos - lo).astype(np.float32)
  m = np.zeros((n_out, n_in), np.float32)
  m[np.arange(n_out), lo] = 1 - frac
  m[np.arange(n_out), lo + 1] = frac
  return m


@functools.lru_cache(maxsize=64)
def _pixel_centers(n: int) -> np.ndarray:
  return np.arange(n, dtype=np.float32) + 0.5


def _hsv255(h: float, s: float, v: float) -> np.ndarray:
  return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32) * 255.0


def _render_background(kind: str, d: _Draws, h: int, w: int) -> np.ndarray:
  """3 x H x W float32 in [0, 255] + 0.5 (the rounding offset, so the end is one truncation).

  Every kind is `offset + gain * pattern` with a pattern built from 1-D axes. Channels come first
  while drawing because numpy loops over a trailing axis of 3 several times slower.
  """
  hue, sat, val = d.random(), d.uniform(0.04, 0.2), d.uniform(0.35, 0.72)
  base = _hsv255(hue, sat, val) + 0.5
  tint = np.asarray([d.uniform(0.7, 1.3) for _ in range(3)], np.float32) * 255.0
  theta = d.uniform(0.0, math.pi)
  ys, xs = _pixel_centers(h), _pixel_centers(w)
  if kind == "gradient":
    other = _hsv255(hue + d.uniform(-0.15, 0.15), sat, val + d.uniform(-0.2, 0.2)) + 0.5
    ty, tx = (math.sin(theta) / h) * ys, (math.cos(theta) / w) * xs
    lo = float(min(ty[0], ty[-1]) + min(tx[0], tx[-1]))
    span = max(float(max(ty[0], ty[-1]) + max(tx[0], tx[-1])) - lo, 1e-6)
    pattern = ty[:, None] + tx[None, :]
    gain = (other - base) / span
    offset = base - lo * gain
  elif kind == "mottled":
    gh, gw = 3 + d.randint(4), 3 + d.randint(4)
    grid = np.asarray([2.0 * d.random() - 1.0 for _ in range(gh * gw)], np.float32)
    pattern = _upsample_matrix(gh, h) @ grid.reshape(gh, gw) @ _upsample_matrix(gw, w).T
    gain, offset = d.uniform(0.05, 0.1) * tint, base
  elif kind == "striped":
    k = 2 * math.pi / (d.uniform(5.0, 14.0) * min(h, w) / 64)
    phase = d.uniform(0.0, 2 * math.pi)
    pattern = np.sin((k * math.sin(theta)) * ys[:, None] + ((k * math.cos(theta)) * xs + phase))
    gain, offset = d.uniform(0.03, 0.07) * tint, base
  elif kind == "checkered":
    cell = max(2, round(d.uniform(5.0, 12.0) * min(h, w) / 64))
    parity = (np.arange(h) // cell % 2)[:, None] ^ (np.arange(w) // cell % 2)[None, :]
    pattern = parity.astype(np.float32)
    amp = d.uniform(0.025, 0.05) * tint
    gain, offset = 2.0 * amp, base - amp
  else:
    raise ValueError(f"unknown background {kind!r}: allowed {', '.join(BACKGROUNDS)}")
  return (gain.astype(np.float32)[:, None, None] * pattern
          + offset.astype(np.float32)[:, None, None])


# Outlines as half-planes in the object's frame (normal angle in degrees, offset in units of the
# nominal radius r), combined in `_signed_distance`; y grows downwards, triangle and star point up.
_C72 = math.cos(math.radians(72))
_HALF_PLANES = {
    "square": [(a, 0.8) for a in (0, 90, 180, 270)],
    "triangle": [(a, 0.575) for a in (90, 210, 330)],  # equilateral, circumradius 1.15 r
    "star": [(-18 + 72 * k, _EXTENT["star"] * _C72) for k in range(5)],
    # Plus sign: two overlapping bars (overlap, not abutment, so the union has no seam).
    "cross": [(0, 0.95), (180, 0.95), (90, 0.32), (270, 0.32),
              (0, 0.32), (180, 0.32), (90, 0.95), (270, 0.95)],
}
_HALF_PLANE_ARRAYS = {k: (np.radians([a for a, _ in v]), np.asarray([o for _, o in v], np.float32))
                      for k, v in _HALF_PLANES.items()}


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float,
                     rotation_deg: float) -> np.ndarray:
  """Approximate signed distance in pixels (negative inside) on the grid dy[:, None], dx[None, :].

  Exact near the outline, which is all the one-pixel anti-aliasing ramp looks at.
  """
  if shape == "circle":
    return np.sqrt((dy * dy)[:, None] + (dx * dx)[None, :]) - r
  if shape not in _HALF_PLANE_ARRAYS:
    raise ValueError(f"unknown shape {shape!r}: allowed {', '.join(SHAPES)}")
  phi, offsets = _HALF_PLANE_ARRAYS[shape]
  phi = (phi + math.radians(rotation_deg)).astype(np.float32)
  # Distance past each edge line, (lines, y, x): rotating the frame rotates the normals.
  s = (np.cos(phi)[:, None, None] * dx[None, None, :]
       + (np.sin(phi)[:, None] * dy[None, :] - (offsets * r)[:, None])[:, :, None])
  if shape == "star":
    # A pentagram is the set of points outside at most one of its five edge half-planes.
    return np.partition(s, 3, axis=0)[3]
  if shape == "cross":
    return s.reshape(2, 4, *s.shape[1:]).max(axis=1).min(axis=0)
  return s.max(axis=0)


def _draw_object(img_chw: np.ndarray, obj: dict, d: _Draws) -> None:
  _, h, w = img_chw.shape
  cx, cy = obj["center"]
  r = obj["size"] / 2
  ext = _EXTENT[obj["shape"]] * r + 1.0
  x0, x1 = max(0, int(cx - ext)), min(w, int(math.ceil(cx + ext)) + 1)
  y0, y1 = max(0, int(cy - ext)), min(h, int(math.ceil(cy + ext)) + 1)
  dist = _signed_distance(obj["shape"], _pixel_centers(w)[x0:x1] - cx,
                          _pixel_centers(h)[y0:y1] - cy, r, obj["rotation"])
  # Coverage from the signed distance: a one-pixel ramp approximates the box-filtered edge.
  # (In-place ufuncs: np.clip's Python wrapper costs more than the arithmetic at this size.)
  alpha = np.subtract(0.5, dist, out=dist)
  np.minimum(np.maximum(alpha, 0.0, out=alpha), 1.0, out=alpha)
  bright = d.uniform(0.85, 1.0)
  color = np.asarray([min(255.0, 255.0 * c * bright + d.uniform(-8.0, 8.0)) + 0.5
                      for c in COLORS[obj["color"]]], np.float32)[:, None, None]
  region = img_chw[:, y0:y1, x0:x1]
  region += (color - region) * alpha


# ------------------------------------------------------------------------------------- language

def a_or_an(word: str) -> str:
  return ("an " if word[0] in "aeiou" else "a ") + word


def _caption(objects: list[dict], background: str) -> str:
  groups: dict[tuple[str, str], list[dict]] = {}
  for o in objects:
    groups.setdefault((o["color"], o["shape"]), []).append(o)
  parts = []
  for (color, shape), members in groups.items():
    if len(members) == 1:
      parts.append(f"{a_or_an(color)} {shape} at the {members[0]['quadrant']}")
    else:
      part = f"{NUMBER_WORDS[len(members)]} {color} {PLURALS[shape]}"
      for axis in (0, 1):  # a shared half is worth saying ("two blue squares on the left")
        halves = {m["quadrant"].split()[1 - axis] for m in members}
        if len(halves) == 1:
          part += (" on the " if axis == 0 else " at the ") + halves.pop()
          break
      parts.append(part)
  text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  text = f"{text} on {a_or_an(background)} background."
  return text[0].upper() + text[1:]


def _mcq(kind: str, question: str, correct: str, subject: str, target: dict,
         options: str | None = None) -> dict:
  """A question with the fixed options of `options` (default: its kind's)."""
  options = list(OPTIONS[options or kind])
  idx = options.index(correct)
  return {"kind": kind, "question": question, "options": options, "answer": LETTERS[idx],
          "answer_index": idx, "answer_option": correct, "subject": subject, "target": target}


def _referent(o: dict, objects: list[dict], key: str) -> str | None:
  """'the circle' / 'the red object' when unique, else with its quadrant, else None."""
  noun = o["shape"] if key == "shape" else f"{o['color']} object"
  if sum(p[key] == o[key] for p in objects) == 1:
    return f"the {noun}"
  if sum(p[key] == o[key] and p["quadrant"] == o["quadrant"] for p in objects) == 1:
    return f"the {noun} at the {o['quadrant']}"
  return None


def _attribute_question(d: _Draws, objects: list[dict], kind: str) -> dict | None:
  # A colour question names the object by shape and vice versa.
  ref_key = "shape" if kind == "color" else "color"
  cands = [(o, ref) for o in objects if (ref := _referent(o, objects, ref_key))]
  if not cands:
    return None
  o, subject = d.choice(cands)
  question = (f"What color is {subject}?" if kind == "color" else f"What shape is {subject}?")
  target = {f: o[f] for f in ("color", "shape", "quadrant")}
  return _mcq(kind, question, o[kind], subject, target)


def _count_question(d: _Draws, objects: list[dict]) -> dict:
  # Every category the scene can be asked about, by its count: picking the count first keeps
  # answers near-uniform over 0..4 (subsets of a small scene would otherwise be mostly "1").
  by_count: dict[int, list[tuple[str, str, list[dict]]]] = {}
  categories = [("object", "objects", lambda o: True)]
  categories += [(f"{c} object", f"{c} objects", lambda o, c=c: o["color"] == c)
                 for c in COLOR_NAMES]
  categories += [(s, PLURALS[s], lambda o, s=s: o["shape"] == s) for s in SHAPES]
  categories += [(f"{c} {s}", f"{c} {PLURALS[s]}",
                  lambda o, c=c, s=s: o["color"] == c and o["shape"] == s)
                 for c, s in dict.fromkeys((o["color"], o["shape"]) for o in objects)]
  for singular, plural, keep in categories:
    members = [o for o in objects if keep(o)]
    by_count.setdefault(len(members), []).append((singular, plural, members))
  # Large counts are rarely available (a count of 4 needs 4 objects), so they are preferred when
  # they are: answers end up about uniform over 0..4 and "guess a small number" does not pay.
  counts = sorted(by_count)
  n = d.weighted_choice(counts, [_COUNT_WEIGHTS[c] for c in counts])
  singular, plural, members = d.choice(by_count[n])
  target = {"count": n, "singular": singular, "plural": plural,
            "quadrants": [p["quadrant"] for p in members]}
  return _mcq("count", f"How many {plural} are there?", str(n), plural, target)


def _position_question(d: _Draws, objects: list[dict]) -> dict | None:
  cands = [o for o in objects
           if sum(p["color"] == o["color"] and p["shape"] == o["shape"] for p in objects) == 1]
  if not cands:
    return None
  o = d.choice(cands)
  subject = f"the {o['color']} {o['shape']}"
  vertical, horizontal = o["quadrant"].split()
  axis = d.choice(("quadrant", "quadrant", "horizontal", "vertical"))
  if axis == "quadrant":
    question, correct = f"Where is {subject}?", o["quadrant"]
  elif axis == "horizontal":
    question, correct = f"Is {subject} on the left or on the right?", horizontal
  else:
    question, correct = f"Is {subject} in the top half or in the bottom half?", vertical
  target = {"color": o["color"], "shape": o["shape"], "quadrant": o["quadrant"], "axis": axis}
  return _mcq("position", question, correct, subject, target, options=axis)


def _existence_question(d: _Draws, objects: list[dict]) -> dict:
  present = {(o["color"], o["shape"]) for o in objects}
  if d.random() < 0.5:
    o = d.choice(objects)
    color, shape = o["color"], o["shape"]
  else:
    # A plausible absent object shares a colour or a shape with one that is there (there is
    # always one: at most 4 of the 30 combinations are present).
    colors, outlines = {c for c, _ in present}, {s for _, s in present}
    color, shape = d.choice([(c, s) for c in COLOR_NAMES for s in SHAPES
                             if (c, s) not in present and (c in colors or s in outlines)])
  found = [o for o in objects if o["color"] == color and o["shape"] == shape]
  correct = "yes" if found else "no"
  target = {"color": color, "shape": shape, "present": bool(found),
            "quadrant": found[0]["quadrant"] if found else None}
  return _mcq("existence", f"Is there {a_or_an(color)} {shape}?", correct,
              f"{a_or_an(color)} {shape}", target)


def _questions(d: _Draws, objects: list[dict]) -> list[dict]:
  qs = [_attribute_question(d, objects, "color"), _attribute_question(d, objects, "shape"),
        _count_question(d, objects), _position_question(d, objects),
        _existence_question(d, objects)]
  return [q for q in qs if q is not None]


# ------------------------------------------------------------------------------------- the world

def _image_hw(image_size) -> tuple[int, int]:
  hw = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else tuple(image_size)
  if len(hw) != 2 or not all(isinstance(s, (int, np.integer)) and s >= MIN_IMAGE_SIDE for s in hw):
    raise ValueError(f"ShapesWorld image_size={image_size!r} is invalid: use an int or an "
                     f"(height, width) pair of ints, each >= {MIN_IMAGE_SIDE}")
  return int(hw[0]), int(hw[1])


class ShapesWorld:
  """Random-access source of shapes-world records: record i is a function of (split, i, seed).

  Record keys: image (uint8 H x W x 3, absent when rendered with render=False), caption, objects
  (dicts: shape, color, center (x, y) in pixels with y down, size (nominal diameter, px), rotation
  (degrees), quadrant), questions (dicts: kind, question, options, answer (letter), answer_index,
  answer_option, subject, target), background, split, index, id.
  """

  def __init__(self, split: str = "train", size: int | None = None, image_size=64, seed: int = 0):
    if split not in SPLITS:
      raise ValueError(f"ShapesWorld split={split!r} is unknown: allowed {', '.join(SPLITS)}")
    if size is not None and size < 1:
      raise ValueError(f"ShapesWorld size={size!r} is invalid: use a positive int or None")
    if seed < 0:
      raise ValueError(f"ShapesWorld seed={seed!r} is invalid: use an int >= 0")
    self.split, self.seed = split, int(seed)
    self.size = DEFAULT_SIZES[split] if size is None else int(size)
    self.height, self.width = _image_hw(image_size)

  def __len__(self) -> int:
    return self.size

  def __repr__(self) -> str:
    return (f"ShapesWorld(split={self.split!r}, size={self.size}, "
            f"image_size=({self.height}, {self.width}), seed={self.seed})")

  def __getitem__(self, index: int) -> dict:
    return self.record(index)

  def record(self, index: int, render: bool = True) -> dict:
    """Record `index`; render=False skips the image (texts are identical)."""
    i = int(index)
    if i < 0:
      i += self.size
    if not 0 <= i < self.size:
      raise IndexError(
          f"ShapesWorld({self.split!r}) index {index} is out of range [0, {self.size})")
    d = _Draws(record_key(self.split, i, self.seed))
    h, w = self.height, self.width
    objects = _sample_objects(d, h, w)
    background = d.choice(BACKGROUNDS)
    rec = {"caption": _caption(objects, background), "objects": objects,
           "questions": _questions(d, objects), "background": background, "split": self.split,
           "index": i, "id": f"shapes/{self.split}/{self.seed}/{i}"}
    if render:  # drawn last, so the texts do not depend on whether the image is rendered
      img_chw = _render_background(background, d, h, w)
      for o in objects:
        _draw_object(img_chw, o, d)
      # Values carry a +0.5 offset, so truncation rounds.
      np.minimum(np.maximum(img_chw, 0.0, out=img_chw), 255.99, out=img_chw)
      img_chw = img_chw.astype(np.uint8)
      image = np.empty((h, w, 3), np.uint8)
      for c in range(3):  # per-channel copies beat a transposing copy several times over
        image[:, :, c] = img_chw[c]
      rec["image"] = image
    return rec
