"""Per-record transforms: decode, BAGEL resize rules, corruption on the fly, tokenisation.

Each transform is a pure function of one record (a dict) and a Grain `Map` (or `MapWithIndex`), so
the pipeline can run it in worker processes. Every transform passes a skip marker
(`bad_records.is_skip`) through untouched, and turns a bad input into a marker instead of raising.

Decoding (`decode_image`, and `read_image` for a file): PIL, any mode to RGB uint8 H x W x 3, EXIF
orientation applied first. It is the one decoder of every entry point (pipelines, `corrupt`,
`recover`, `answer`). Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is
composited on white, as BAGEL's `pil_img2rgb` does; 16-bit grey (I;16*, and I, read as 16-bit data)
is scaled to 8 bits with rounding (v * 255 / 65535), not clipped; 16-bit RGB keeps its high byte
(PIL's reading); F (float) images are read as [0, 1] when their maximum is at most 1, else as
[0, 255]. Everything else uses PIL's own conversion (1, L, P, CMYK, YCbCr, ...). A `notes` list
collects what a user should be told (transparency composited, an EXIF rotation applied).

Smallest side (`default_min_side`, data.min_image_side): an image with a side below it is a bad
record (a skip marker, counted by bad_records.SkipTracker), and `read_image` refuses it: the resize
rule would blow it up to hundreds of pixels of interpolation (a 1 x 1 image becomes a flat square).

Resizing (`bagel_size`, `bagel_resize`) follows BAGEL's `MaxLongEdgeMinShortEdgeResize`: scale so
the long side is at most `max_side` (never upscaling for that), then so the short side is at least
`min_side` (the minimum wins over the maximum here), round each side to a multiple of `stride`
(at least one stride), cap the pixel count at `max_pixels`, and finally scale the long side back to
at most `max_side`. So the maximum wins in the end: an image too elongated to satisfy both gets a
long side of `max_side` and a short side below `min_side`. Pixels are resampled with PIL bicubic
(which antialiases when downscaling), as BAGEL's torchvision resize does on PIL images.

Corruption on the fly (`CorruptOnTheFly`): the key of record `index` in `epoch` is derived from
(run seed, index, epoch) through a numpy SeedSequence, so the same triple always gives the same
corrupted image, and each epoch a new one. The pipeline puts the epoch into the record ('epoch',
e.g. with `AddEpoch` after repeat; 0 when absent).
"""

from collections.abc import Sequence
import dataclasses
import io
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image, ImageOps

from robust_u1_jax import config_lib
from robust_u1_jax.data import corruptions
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.data.bad_records import is_skip, skip_record
from robust_u1_jax.data.corruptions import imagenet_c

# BAGEL ImageTransform's default pixel cap (14 * 14 * 9 * 1024); it only binds for images whose
# long side would exceed max_side after the min-side rule.
BAGEL_MAX_PIXELS = 14 * 14 * 9 * 1024
# The default (encoded bytes -> decoded image -> file path for messages) fields of DecodeImages.
DECODE_FIELDS = (("image_bytes", "image", "path"),
                 ("target_image_bytes", "target_image", "target_image_path"))
IMAGENET_C_NAMES = tuple(imagenet_c.CORRUPTIONS)
# Mixed into the corruption seed so that other uses of the run seed draw independent numbers.
_CORRUPTION_STREAM = 0x5EED_C0DE
_CLEAN_STREAM = 0x5EED_C1EA  # its own stream: a clean fraction leaves the other draws as they were
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
EXIF_ORIENTATION = 0x0112
EXIF_TURNS = {2: "mirrored", 3: "turned 180 degrees", 4: "flipped", 5: "transposed",
              6: "turned 90 degrees clockwise", 7: "transversed", 8: "turned 90 degrees "
              "counter-clockwise"}


class BadImageError(ValueError):
  """Bytes that are not a decodable image (empty, truncated, unknown format, unsupported mode)."""


# ------------------------------------------------------------------------------------------ decode

def pil_to_rgb(img: Image.Image, notes: list[str] | None = None) -> np.ndarray:
  """A PIL image of any mode as uint8 H x W x 3 (see the module docstring for the rules).

  `notes`, when given, gets a line for each change a user should hear of (transparency, rotation,
  the frames of an animation left out).
  """
  notes = [] if notes is None else notes
  frames = getattr(img, "n_frames", 1)
  if frames > 1:  # PIL opens an animated GIF, PNG or WEBP at its first frame
    notes.append(f"its first frame read, of {frames}")
  try:
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    img = ImageOps.exif_transpose(img)
  except Exception:  # pylint: disable=broad-except
    orientation = 1  # a malformed EXIF block: keep the pixels as stored rather than lose the image
  if orientation in EXIF_TURNS:
    notes.append(f"EXIF orientation {orientation} applied: {EXIF_TURNS[orientation]}")
  mode = img.mode
  if mode in _SIXTEEN_BIT_MODES:
    grey = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)
  if mode == "F":
    grey = np.nan_to_num(np.asarray(img, np.float32))
    scale = 255.0 if grey.size and grey.max() <= 1.0 else 1.0
    grey8 = np.clip(np.rint(grey * scale), 0, 255).astype(np.uint8)
    return np.repeat(grey8[:, :, None], 3, axis=2)
  if mode in _ALPHA_MODES or "transparency" in img.info:
    rgba = img.convert("RGBA")
    if rgba.getchannel("A").getextrema()[0] < 255:  # an alpha channel of 255 everywhere is none
      notes.append("transparent pixels composited on white")
    white = Image.new("RGB", rgba.size, (255, 255, 255))
    white.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    img = white
  elif mode != "RGB":
    img = img.convert("RGB")
  return np.ascontiguousarray(np.asarray(img, np.uint8))


def decode_image(data: bytes, notes: list[str] | None = None) -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, WEBP, ... as PIL reads) -> uint8 H x W x 3.

  Raises BadImageError saying why the bytes are not a usable image. `notes`: see `pil_to_rgb`.
  """
  if data is None or len(data) == 0:
    raise BadImageError("empty file (0 bytes)")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      rgb = pil_to_rgb(img, notes)
  except Image.UnidentifiedImageError:
    raise BadImageError(f"not an image: PIL cannot identify the format of {len(data)} bytes "
                        f"starting {bytes(data[:8])!r}") from None
  # PIL's plugins report corrupt data as OSError, SyntaxError, ValueError, struct.error, EOFError,
  # DecompressionBombError...; any of them means this record is unusable, not that the run is.
  except Exception as e:  # pylint: disable=broad-except
    raise BadImageError(f"cannot decode image ({type(e).__name__}: {e})") from None
  if rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
    raise BadImageError(f"decoded image has unusable shape {rgb.shape}")
  return rgb


def default_min_side(vae_stride: int, vit_patch: int) -> int:
  """The smallest image side accepted by default: one VAE stride or one ViT patch, whichever is
  larger (16 pixels for BAGEL). A smaller side holds less than one latent cell or patch, so
  nearly every pixel the model would see is made up by the resize."""
  return max(int(vae_stride), int(vit_patch))


def min_image_side(data_config) -> int:
  """data.min_image_side, or `default_min_side` of the data config's resize rules when 0."""
  side = data_config.get("min_image_side", 0)
  return int(side) if side else default_min_side(data_config.vae_stride, data_config.vit_patch)


RESIZE_MAKES_IT_UP = "the resize would make up nearly every pixel"


def size_problem(image: np.ndarray, min_side: int, setting: str = "data.min_image_side",
                 why: str = RESIZE_MAKES_IT_UP) -> str | None:
  """Why an image is too small to use ('W x H pixels ...'), or None; `setting` names where
  `min_side` comes from, `why` what a smaller side would do."""
  h, w = image.shape[:2]
  if min(h, w) >= min_side:
    return None
  return f"{w} x {h} pixels: a side below the smallest usable {min_side} ({setting}; {why})"


def read_image(path: str, *, min_side: int = 0, notes: list[str] | None = None,
               setting: str = "data.min_image_side", why: str = RESIZE_MAKES_IT_UP
               ) -> np.ndarray:
  """The file `path` decoded by `decode_image`; BadImageError starting with the path for a file
  that cannot be read, is no image, or has a side below `min_side` pixels (`setting`: where that
  comes from, `why`: what a smaller side would do, for the message)."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise BadImageError(f"{path}: {e.strerror or e}") from None
  try:
    image = decode_image(data, notes)
  except BadImageError as e:
    raise BadImageError(f"{path}: {e}") from None
  problem = size_problem(image, min_side, setting, why)
  if problem:
    raise BadImageError(f"{path}: {problem}")
  return image


class DecodeImages(grain.transforms.Map):
  """Decodes encoded-bytes fields into uint8 images; a bad one turns the record into a marker.

  `fields`: (bytes key, image key, path key) triples; absent bytes keys are ignored, and a record
  that already holds a decoded image (shapes world) passes through.
  """

  def __init__(self, fields: Sequence[tuple[str, str, str]] = DECODE_FIELDS):
    self.fields = tuple(tuple(f) for f in fields)

  def map(self, element):
    if is_skip(element):
      return element
    out = dict(element)
    for src, dst, path_key in self.fields:
      if src not in out:
        continue
      data = out.pop(src)
      try:
        out[dst] = decode_image(data)
      except BadImageError as e:
        path = element.get(path_key) or element.get("path")
        return skip_record(f"{dst}: {e}", path, element.get("index"), element.get("epoch"))
    return out


# ------------------------------------------------------------------------------------------ resize

def _make_divisible(value: float, stride: int) -> int:
  return max(stride, int(round(value / stride) * stride))


def _apply_scale(height: int, width: int, scale: float, stride: int) -> tuple[int, int]:
  return (_make_divisible(round(height * scale), stride),
          _make_divisible(round(width * scale), stride))


def bagel_size(height: int, width: int, *, max_side: int, min_side: int, stride: int,
               max_pixels: int = BAGEL_MAX_PIXELS) -> tuple[int, int]:
  """The (height, width) BAGEL resizes an image of this size to (rules in the module docstring)."""
  if height < 1 or width < 1:
    raise ValueError(f"image size {(height, width)} is empty")
  if not 0 < min_side <= max_side or stride < 1:
    raise ValueError(f"resize rule max_side={max_side}, min_side={min_side}, stride={stride} is "
                     "invalid: need 0 < min_side <= max_side and stride >= 1")
  scale = min(max_side / max(height, width), 1.0)
  scale = max(scale, min_side / min(height, width))
  h, w = _apply_scale(height, width, scale, stride)
  # BAGEL divides by the pixel ratio here (not its square root); kept for identical sizes.
  if h * w > max_pixels:
    h, w = _apply_scale(h, w, max_pixels / (h * w), stride)
  if max(h, w) > max_side:
    h, w = _apply_scale(h, w, max_side / max(h, w), stride)
  return h, w


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
  """uint8 H x W x 3 resampled to `size_hw` with PIL bicubic (a no-op at the same size)."""
  h, w = size_hw
  if image.shape[:2] == (h, w):
    return image
  resized = Image.fromarray(np.ascontiguousarray(image)).resize((w, h), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.uint8)


def bagel_resize(image: np.ndarray, *, max_side: int, min_side: int, stride: int,
                 max_pixels: int = BAGEL_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
  """Resizes uint8 H x W x 3 by BAGEL's rule; returns (resized image, (height, width))."""
  size = bagel_size(image.shape[0], image.shape[1], max_side=max_side, min_side=min_side,
                    stride=stride, max_pixels=max_pixels)
  return resize_image(image, size), size


def resize_rule(data_config, kind: str) -> dict[str, int]:
  """{max_side, min_side, stride} of the 'vae' or 'vit' image transform from a data config."""
  if kind == "vae":
    return {"max_side": data_config.vae_max_side, "min_side": data_config.vae_min_side,
            "stride": data_config.vae_stride}
  if kind == "vit":
    return {"max_side": data_config.vit_max_side, "min_side": data_config.vit_min_side,
            "stride": data_config.vit_patch}
  raise ValueError(f"resize kind {kind!r} is unknown: allowed 'vae', 'vit'")


def pipeline_sizes(height: int, width: int, data_config
                   ) -> tuple[tuple[int, int], tuple[int, int]] | None:
  """(VAE, ViT) (height, width) a training pipeline gives an image of this size: what
  `ResizeImages` (crop_square, then the VAE rule) and `StageFields` (the ViT rule, applied to the
  VAE-size image) do to its pixels; None for an image they skip as too small."""
  if min(height, width) < min_image_side(data_config):
    return None
  if data_config.get("crop_square", False):
    height = width = min(height, width)
  vae = bagel_size(height, width, **resize_rule(data_config, "vae"))
  return vae, bagel_size(*vae, **resize_rule(data_config, "vit"))


def center_square(image: np.ndarray) -> np.ndarray:
  """The largest centred square of an H x W x C image."""
  h, w = image.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  return image[top:top + side, left:left + side]


class ResizeImages(grain.transforms.Map):
  """Resizes image fields by a BAGEL rule; writes `key + out_suffix` (in place when empty).

  With `crop_square`, each image is first cut to its centred square (data.crop_square). A record
  with an image whose side is below `min_image_side` pixels becomes a skip marker (a bad record).
  """

  def __init__(self, *, max_side: int, min_side: int, stride: int,
               keys: Sequence[str] = ("image",), out_suffix: str = "",
               max_pixels: int = BAGEL_MAX_PIXELS, crop_square: bool = False,
               min_image_side: int = 0):
    bagel_size(max_side, max_side, max_side=max_side, min_side=min_side, stride=stride)  # checks
    self.rule = {"max_side": max_side, "min_side": min_side, "stride": stride,
                 "max_pixels": max_pixels}
    self.keys, self.out_suffix = tuple(keys), out_suffix
    self.crop_square = bool(crop_square)
    self.min_image_side = int(min_image_side)

  @classmethod
  def from_config(cls, data_config, kind: str, keys: Sequence[str] = ("image",),
                  out_suffix: str = "") -> "ResizeImages":
    return cls(**resize_rule(data_config, kind), keys=keys, out_suffix=out_suffix,
               crop_square=data_config.get("crop_square", False),
               min_image_side=min_image_side(data_config))

  def map(self, element):
    if is_skip(element):
      return element
    out = dict(element)
    for key in self.keys:
      if key in out:
        problem = size_problem(out[key], self.min_image_side)
        if problem:
          path = element.get(f"{key}_path") or element.get("path")
          return skip_record(f"{key}: {problem}", path, element.get("index"),
                             element.get("epoch"))
        image = center_square(out[key]) if self.crop_square else out[key]
        out[key + self.out_suffix], _ = bagel_resize(image, **self.rule)
    return out


# -------------------------------------------------------------------------------------- corruption

def record_rng(seed: int, index: int, epoch: int) -> tuple[np.random.Generator, jax.Array]:
  """(numpy generator, JAX key) of one record in one epoch: a pure function of the triple."""
  if min(seed, index, epoch) < 0:
    raise ValueError(f"seed={seed}, index={index}, epoch={epoch}: all must be >= 0")
  seq = np.random.SeedSequence([int(seed), int(index), int(epoch), _CORRUPTION_STREAM])
  words = seq.generate_state(2, np.uint32)
  # Made on the host CPU, where data-side corruption runs (corruptions.data_device): a key on an
  # accelerator would be one more round trip per record.
  with jax.default_device(jax.local_devices(backend="cpu")[0]):  # this process's CPU
    key = jax.random.wrap_key_data(words, impl="threefry2x32")
  return np.random.default_rng(seq.spawn(1)[0]), key


@dataclasses.dataclass(frozen=True)
class CorruptionSpec:
  """A configured corruption: what is drawn per record and what is fixed.

  mode: 'none', 'imagenet_c' (one of the 19 per record), 'pipeline' (Robust-R1 four stages) or
  'single' (one named corruption). level: 'severity' or 'intensity' (for 'single').
  """
  mode: str
  name: str = ""  # qualified name for 'single'
  level: str = ""
  severity: int = 0  # 0: drawn uniformly from 1..5 per record
  intensity: float = -1.0  # < 0: drawn uniformly from [0, 1] per record (pipeline: see below)
  # The pipeline's drawn intensity: 'stage' (one per stage) or 'record' (one for all stages).
  intensity_draw: str = "stage"
  clean_fraction: float = 0.0  # of the records, drawn per record, left as they are


def corruption_spec(corruption: str, severity: int = 0, intensity: float = -1.0,
                    intensity_draw: str = "stage", clean_fraction: float = 0.0
                    ) -> CorruptionSpec:
  """Resolves data.corruption / severity / intensity / clean_fraction; raises ValueError listing
  valid names.

  A short name that exists in both families (gaussian_noise, motion_blur, jpeg_compression)
  means Robust-R1 when intensity >= 0, else ImageNet-C.
  """
  if not 0.0 <= clean_fraction < 1.0:
    raise ValueError(f"clean_fraction {clean_fraction!r} is invalid: a fraction in [0, 1)")
  if corruption == "none":
    return CorruptionSpec("none")
  spec = _corruption_spec(corruption, severity, intensity, intensity_draw)
  return dataclasses.replace(spec, clean_fraction=float(clean_fraction))


def _corruption_spec(corruption: str, severity: int, intensity: float,
                     intensity_draw: str) -> CorruptionSpec:
  if corruption == "imagenet_c":
    corruptions.resolve(IMAGENET_C_NAMES[0], severity=severity or 1)  # validates the severity
    return CorruptionSpec("imagenet_c", level="severity", severity=int(severity))
  if corruption == corruptions.PIPELINE:
    if intensity >= 0:
      corruptions.resolve(corruption, intensity=intensity)
    if intensity_draw not in config_lib.INTENSITY_DRAWS:
      raise ValueError(f"intensity_draw {intensity_draw!r} is invalid: allowed "
                       f"{', '.join(config_lib.INTENSITY_DRAWS)}")
    return CorruptionSpec("pipeline", name=corruption, level="intensity",
                          intensity=float(intensity), intensity_draw=intensity_draw)
  registry = corruptions.registry()
  if corruption in registry:
    level = registry[corruption].level
  else:
    levels = {c.level for q, c in registry.items() if q.split("/", 1)[1] == corruption}
    if not levels:
      corruptions.resolve(corruption, severity=1)  # raises with the list of valid names
    if len(levels) > 1:
      level = "intensity" if intensity >= 0 else "severity"
    else:
      level = levels.pop()
  probe = {"severity": severity or 1} if level == "severity" else {
      "intensity": intensity if intensity >= 0 else 0.5}
  qualified, _ = corruptions.resolve(corruption, **probe)
  return CorruptionSpec("single", name=qualified, level=level, severity=int(severity),
                        intensity=float(intensity))


def drawn_clean(spec: CorruptionSpec, seed: int, index: int, epoch: int) -> bool:
  """Whether the record is left clean this epoch (spec.clean_fraction of them, drawn apart from
  the corruption's own draws, which stay what they are without a clean fraction)."""
  if spec.clean_fraction <= 0.0:  # a 'none' spec has none: corruption_spec
    return False
  seq = np.random.SeedSequence([int(seed), int(index), int(epoch), _CLEAN_STREAM])
  return bool(np.random.default_rng(seq).uniform() < spec.clean_fraction)


def draw_corruption(spec: CorruptionSpec, seed: int, index: int,
                    epoch: int) -> tuple[str, dict[str, Any], jax.Array]:
  """(corruption name, {'severity' or 'intensity': level}, JAX key) of one record in one epoch.

  For the pipeline with an intensity drawn per stage the level is {'intensity': None}: the
  pipeline then draws one intensity per stage from the key.
  """
  rng, key = record_rng(seed, index, epoch)
  if spec.mode == "pipeline":
    if spec.intensity >= 0:
      return spec.name, {"intensity": spec.intensity}, key
    drawn = float(rng.uniform(0.0, 1.0)) if spec.intensity_draw == "record" else None
    return spec.name, {"intensity": drawn}, key
  if spec.mode == "imagenet_c":
    name = f"imagenet_c/{IMAGENET_C_NAMES[int(rng.integers(len(IMAGENET_C_NAMES)))]}"
  else:
    name = spec.name
  if spec.mode == "imagenet_c" or spec.level == "severity":
    return name, {"severity": spec.severity or int(rng.integers(1, 6))}, key
  intensity = spec.intensity if spec.intensity >= 0 else float(rng.uniform(0.0, 1.0))
  return name, {"intensity": intensity}, key


def corrupt_image(image: np.ndarray, spec: CorruptionSpec, seed: int, index: int,
                  epoch: int) -> tuple[np.ndarray, dict[str, Any]]:
  """Corrupts one image deterministically in (seed, index, epoch).

  Returns (corrupted image, info) with info {'corruption': name, 'corruption_steps': qualified
  names applied, 'corruption_levels': their severity or intensity}.
  """
  if spec.mode == "none" or drawn_clean(spec, seed, index, epoch):
    return image, {"corruption": "none", "corruption_steps": [], "corruption_levels": []}
  name, level, key = draw_corruption(spec, seed, index, epoch)
  if spec.mode == "pipeline":
    from robust_u1_jax.data.corruptions import robust_r1  # deferred: heavy, pipeline only

    # The module's own entry point (not the registry's `corrupt`) returns the plan it applied.
    out, plan = robust_r1.apply_pipeline(image, key, level["intensity"], return_plan=True)
    return np.asarray(out), {"corruption": name,
                             "corruption_steps": [f"robust_r1/{step}" for _, step, _ in plan],
                             "corruption_levels": [float(v) for _, _, v in plan]}
  out = corruptions.corrupt(image, name, key, **level)
  return out, {"corruption": name, "corruption_steps": [name],
               "corruption_levels": [float(next(iter(level.values())))]}


def corruption_size_problem(image: np.ndarray, spec: CorruptionSpec) -> str | None:
  """Why `spec` cannot corrupt `image`, or None: the Robust-R1 degradations need sides of 32
  pixels, which a long, narrow image can lack once the resize rule has shrunk it."""
  from robust_u1_jax.data.corruptions import robust_r1_common

  robust_r1 = spec.mode == "pipeline" or spec.name.startswith("robust_r1/")
  h, w = np.shape(image)[:2]
  if not robust_r1 or min(h, w) >= robust_r1_common.MIN_SIDE:
    return None
  return (f"{w} x {h} pixels after the resize rule: a side below the Robust-R1 degradations' "
          f"smallest {robust_r1_common.MIN_SIDE} (data.crop_square=True crops every image square "
          "first; a larger data.vae_max_side keeps more of a long image)")


class CorruptOnTheFly(grain.transforms.Map):
  """Adds 'clean', 'corrupted', 'corruption', 'corruption_steps', 'corruption_levels'.

  The record's 'image' becomes 'clean'. A record that already holds a pair ('target_image', as
  from Robust-R1 JSONL) is passed on as given: clean = target_image, corrupted = image, corruption
  'dataset'; such data needs data.corruption='none' (anything else is refused, not ignored).
  """

  def __init__(self, corruption: str, severity: int = 0, intensity: float = -1.0, *,
               seed: int = 0, intensity_draw: str = "stage", clean_fraction: float = 0.0):
    self.spec = corruption_spec(corruption, severity, intensity, intensity_draw, clean_fraction)
    self.seed = int(seed)

  @classmethod
  def from_config(cls, data_config, seed: int) -> "CorruptOnTheFly":
    return cls(data_config.corruption, data_config.severity, data_config.intensity, seed=seed,
               intensity_draw=data_config.intensity_draw,
               # A config saved before the field existed left every record corrupted.
               clean_fraction=data_config.get("clean_fraction", 0.0))

  def map(self, element):
    if is_skip(element):
      return element
    out = dict(element)
    if "target_image" in out:
      if self.spec.mode != "none":
        raise config_lib.ConfigError(
            f"record {out.get('path', '')!r} already holds a corrupted/clean pair "
            f"('image', 'target_image'), but data.corruption={self.spec.name or self.spec.mode!r}: "
            "set data.corruption='none' for paired data")
      out["clean"], out["corrupted"] = out.pop("target_image"), out.pop("image")
      out.update(corruption="dataset", corruption_steps=[], corruption_levels=[])
      return out
    if "image" not in out:
      raise KeyError(f"CorruptOnTheFly needs a decoded 'image' in the record; it has "
                     f"{sorted(out)} (run DecodeImages first)")
    problem = corruption_size_problem(out["image"], self.spec)
    if problem:  # a bad record, counted like any other (bad_records)
      return skip_record(problem, out.get("path"), out.get("index"), out.get("epoch"))
    clean = out.pop("image")
    corrupted, info = corrupt_image(clean, self.spec, self.seed, int(out["index"]),
                                    int(out.get("epoch", 0)))
    out.update(clean=clean, corrupted=corrupted, **info)
    return out


class AddEpoch(grain.transforms.MapWithIndex):
  """Sets record['epoch'] = position // num_records, for `CorruptOnTheFly`'s seed.

  Apply after `repeat` (the position then runs over all epochs) and before corruption and the
  process slice; `num_records` is the length of the dataset being repeated.
  """

  def __init__(self, num_records: int):
    if num_records < 1:
      raise ValueError(f"num_records={num_records} is invalid: use a positive integer")
    self.num_records = int(num_records)

  def map_with_index(self, index: int, element):
    # Markers too: a bad record is replaced by a record of its own epoch (ReplaceBadRecords).
    return {**element, "epoch": int(index) // self.num_records}


# ---------------------------------------------------------------------------------- tokenisation

def tokenize_text(tok, text: str) -> np.ndarray:
  """int32 ids of `<|im_start|>text<|im_end|>` (BAGEL's text block) with a HF tokenizer."""
  return np.asarray(tokenizer_lib.encode_text_block(tok, text), np.int32)
