"""Tests of the per-record transforms: decoding every PIL mode, BAGEL resize rules, corruption on
the fly (seed determinism, epochs), and tokenisation."""

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from robust_u1_jax import config_defaults
from robust_u1_jax.data import bad_records
from robust_u1_jax.data import tokenizer as tokenizer_lib
from robust_u1_jax.data import transforms


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def _rgb(h=12, w=10, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ decode

@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF", "BMP"])
def test_decode_rgb_lossless(fmt):
  a = _rgb()
  kw = {"lossless": True} if fmt == "WEBP" else {}
  out = transforms.decode_image(_encode(Image.fromarray(a), fmt, **kw))
  assert out.dtype == np.uint8 and out.shape == (12, 10, 3) and out.flags.c_contiguous
  np.testing.assert_array_equal(out, a)


def test_decode_jpeg_close():
  a = np.full((16, 16, 3), (200, 40, 90), np.uint8)
  out = transforms.decode_image(_encode(Image.fromarray(a), "JPEG", quality=95))
  assert out.shape == (16, 16, 3)
  assert np.abs(out.astype(int) - a).max() <= 6


def test_decode_grey_and_bilevel():
  g = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
  out = transforms.decode_image(_encode(Image.fromarray(g, "L"), "PNG"))
  np.testing.assert_array_equal(out, np.repeat(g[:, :, None], 3, axis=2))
  bits = (np.indices((8, 8)).sum(0) % 2).astype(bool)
  out = transforms.decode_image(_encode(Image.fromarray(bits).convert("1"), "PNG"))
  np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))
  assert (out == out[:, :, :1]).all()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_decode_rgba_composites_on_white(fmt):
  a = np.zeros((4, 3, 4), np.uint8)
  a[0] = (10, 20, 30, 255)  # opaque: the colour
  a[1] = (10, 20, 30, 0)  # transparent: white
  a[2] = (0, 0, 0, 128)  # half black over white: mid grey
  a[3] = (200, 100, 0, 255)
  kw = {"lossless": True} if fmt == "WEBP" else {}
  out = transforms.decode_image(_encode(Image.fromarray(a, "RGBA"), fmt, **kw)).astype(int)
  np.testing.assert_array_equal(out[0], [[10, 20, 30]] * 3)
  np.testing.assert_array_equal(out[1], [[255, 255, 255]] * 3)
  assert np.all(np.abs(out[2] - 127) <= 1)
  np.testing.assert_array_equal(out[3], [[200, 100, 0]] * 3)


def test_decode_la_and_palette_transparency():
  la = np.zeros((2, 2, 2), np.uint8)
  la[0] = (50, 255)
  la[1] = (50, 0)
  out = transforms.decode_image(_encode(Image.fromarray(la, "LA"), "PNG"))
  np.testing.assert_array_equal(out[0], [[50, 50, 50]] * 2)
  np.testing.assert_array_equal(out[1], [[255, 255, 255]] * 2)

  p = Image.new("P", (3, 2))
  p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
  p.putdata([0, 1, 0, 1, 0, 1])
  plain = transforms.decode_image(_encode(p, "PNG"))
  np.testing.assert_array_equal(plain[0], [[255, 0, 0], [0, 0, 255], [255, 0, 0]])
  out = transforms.decode_image(_encode(p, "PNG", transparency=1))  # index 1 transparent
  np.testing.assert_array_equal(out[0], [[255, 0, 0], [255, 255, 255], [255, 0, 0]])


def test_decode_cmyk():
  cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow: red
  out = transforms.decode_image(_encode(cmyk, "JPEG", quality=100))
  assert out.shape == (4, 5, 3)
  assert out[..., 0].min() > 230 and out[..., 1:].max() < 25


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_decode_16_bit_grey_scaled_not_clipped(fmt):
  values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], np.uint16)
  img = Image.fromarray(values)
  assert img.mode == "I;16"
  out = transforms.decode_image(_encode(img, fmt))
  expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
  np.testing.assert_array_equal(out[:, :, 0], expected)
  assert out[0, 3, 0] == 255 and out[0, 2, 0] == 128  # clipping would give 255 for both


def _png_16_bit_rgb(a: np.ndarray) -> bytes:
  """A 48-bit RGB PNG written by hand (PIL cannot write one)."""
  h, w, _ = a.shape
  raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_decode_16_bit_rgb():
  a = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
  a[0, 0] = (0, 32896, 65535)
  out = transforms.decode_image(_png_16_bit_rgb(a))
  assert out.shape == (5, 7, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], [0, 128, 255])
  assert np.abs(out - a.astype(float) * 255 / 65535).max() <= 1.0  # the high byte of each


def test_decode_notes_say_what_changed():
  rgba = np.full((3, 4, 4), 255, np.uint8)
  notes = []
  transforms.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), notes)
  assert notes == []  # an alpha channel, opaque everywhere: nothing was composited
  rgba[1, 2, 3] = 0
  transforms.decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), notes)
  assert notes == ["transparent pixels composited on white"]
  notes = []
  frames = [Image.fromarray(_rgb(4, 6)), Image.fromarray(255 - _rgb(4, 6))]
  gif = io.BytesIO()
  frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
  transforms.decode_image(gif.getvalue(), notes)
  assert notes == ["its first frame read, of 2"]
  exif = Image.Exif()
  exif[0x0112] = 8
  notes = []
  out = transforms.decode_image(_encode(Image.fromarray(_rgb(4, 6)), "PNG", exif=exif), notes)
  assert out.shape == (6, 4, 3)
  assert notes == ["EXIF orientation 8 applied: turned 90 degrees counter-clockwise"]
  notes = []
  transforms.decode_image(_encode(Image.fromarray(_rgb()), "PNG"), notes)
  cmyk = Image.new("CMYK", (5, 4), (0, 255, 255, 0))
  transforms.decode_image(_encode(cmyk, "JPEG"), notes)
  assert notes == []  # plain RGB and CMYK: nothing to say


def test_read_image_names_the_file(tmp_path):
  good = tmp_path / "good.png"
  Image.fromarray(_rgb(20, 30)).save(good)
  assert transforms.read_image(str(good), min_side=16).shape == (20, 30, 3)
  (tmp_path / "cut.png").write_bytes(good.read_bytes()[:60])
  (tmp_path / "text.png").write_text("hello")
  (tmp_path / "empty.png").write_bytes(b"")
  cases = {"missing.png": "No such file or directory", "cut.png": "cannot decode image",
           "text.png": "not an image", "empty.png": "empty file",
           "good.png": "30 x 20 pixels: a side below the smallest usable 21"}
  for name, reason in cases.items():
    with pytest.raises(transforms.BadImageError, match=f"^{tmp_path / name}: {reason}"):
      transforms.read_image(str(tmp_path / name), min_side=21)


def test_decode_32_bit_int_and_float_modes():
  i32 = Image.fromarray(np.array([[0, 65535]], np.int32), "I")
  np.testing.assert_array_equal(transforms.pil_to_rgb(i32)[0, :, 0], [0, 255])
  f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
  np.testing.assert_array_equal(transforms.pil_to_rgb(f)[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("orientation,expected", [(3, lambda a: a[::-1, ::-1]),
                                                  (6, lambda a: np.rot90(a, k=-1)),
                                                  (8, lambda a: np.rot90(a, k=1))])
def test_decode_honours_exif_orientation(orientation, expected):
  a = _rgb(4, 6, seed=orientation)
  exif = Image.Exif()
  exif[0x0112] = orientation
  out = transforms.decode_image(_encode(Image.fromarray(a), "PNG", exif=exif))
  np.testing.assert_array_equal(out, expected(a))


def test_decode_transform_fields_and_passthrough():
  a = _rgb()
  rec = {"image_bytes": _encode(Image.fromarray(a), "PNG"), "target_image_bytes":
         _encode(Image.fromarray(a[::-1]), "PNG"), "path": "x.png", "index": 4, "prompt": "p"}
  out = transforms.DecodeImages().map(rec)
  assert "image_bytes" not in out and "target_image_bytes" not in out
  np.testing.assert_array_equal(out["image"], a)
  np.testing.assert_array_equal(out["target_image"], a[::-1])
  assert out["prompt"] == "p" and out["index"] == 4
  shapes_rec = {"image": a, "index": 0}
  assert transforms.DecodeImages().map(shapes_rec)["image"] is a
  marker = bad_records.skip_record("x", "p", 1)
  assert transforms.DecodeImages().map(marker) is marker


# ------------------------------------------------------------------------------------------ resize

RULES = [dict(max_side=1024, min_side=512, stride=16), dict(max_side=980, min_side=224, stride=14),
         dict(max_side=64, min_side=32, stride=16), dict(max_side=64, min_side=32, stride=8)]


@pytest.mark.parametrize("rule", RULES)
def test_bagel_size_properties(rule):
  rng = np.random.default_rng(0)
  sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (400, 2))]
  sizes += [(1, 1), (1, 3000), (3000, 1), (64, 64), (rule["max_side"], rule["min_side"])]
  for h, w in sizes:
    nh, nw = transforms.bagel_size(h, w, **rule)
    assert nh % rule["stride"] == 0 and nw % rule["stride"] == 0, (h, w, nh, nw)
    assert max(nh, nw) <= rule["max_side"], (h, w, nh, nw)
    if max(h, w) / min(h, w) <= rule["max_side"] / rule["min_side"]:
      # Both bounds can hold: the short side reaches the minimum.
      assert min(nh, nw) >= rule["min_side"], (h, w, nh, nw)
      # And the aspect ratio is kept up to stride rounding.
      assert abs(nh / nw - h / w) <= (h / w) * 2 * rule["stride"] / min(nh, nw) + 1e-9
    else:
      assert max(nh, nw) == rule["max_side"] and min(nh, nw) >= rule["stride"]


def test_bagel_size_known_values():
  vae = dict(max_side=1024, min_side=512, stride=16)
  vit = dict(max_side=980, min_side=224, stride=14)
  assert transforms.bagel_size(1024, 800, **vae) == (1024, 800)
  assert transforms.bagel_size(1024, 800, **vit) == (980, 770)
  assert transforms.bagel_size(480, 640, **vae) == (512, 688)  # upscaled to the minimum
  assert transforms.bagel_size(2000, 3000, **vae) == (688, 1024)
  # Extreme aspect: the minimum first (512 x 5120), then BAGEL's pixel cap, then the maximum.
  assert transforms.bagel_size(100, 1000, **vae) == (96, 1024)
  assert transforms.bagel_size(64, 64, max_side=64, min_side=32, stride=16) == (64, 64)
  assert transforms.bagel_size(20, 30, max_side=64, min_side=32, stride=16) == (32, 48)
  with pytest.raises(ValueError, match="min_side"):
    transforms.bagel_size(10, 10, max_side=32, min_side=64, stride=16)


def test_bagel_resize_pixels_and_config():
  flat = np.full((50, 70, 3), (30, 160, 90), np.uint8)
  out, size = transforms.bagel_resize(flat, max_side=64, min_side=32, stride=16)
  assert size == (48, 64) and out.shape == (48, 64, 3) and out.dtype == np.uint8
  assert (out == flat[0, 0]).all()  # bicubic keeps a flat image flat
  same = _rgb(64, 32)
  assert transforms.bagel_resize(same, max_side=64, min_side=32, stride=16)[0] is same

  d = config_defaults.get_data_config()
  d.vae_max_side, d.vae_min_side, d.vae_stride = 64, 32, 16
  d.vit_max_side, d.vit_min_side, d.vit_patch = 64, 32, 8
  rec = {"image": _rgb(100, 60), "index": 0}
  vae = transforms.ResizeImages.from_config(d, "vae")
  vit = transforms.ResizeImages.from_config(d, "vit", out_suffix="_vit")
  out = vae.map(vit.map(rec))  # the ViT copy from the original, then the VAE size in place
  assert out["image"].shape == (64, 32, 3) and out["image_vit"].shape == (64, 40, 3)
  with pytest.raises(ValueError, match="'vae', 'vit'"):
    transforms.resize_rule(d, "clip")


@pytest.mark.parametrize("variant", ["bagel", "crop_square", "small_rules"])
def test_pipeline_sizes_are_the_sizes_the_transforms_give(variant):
  """config_inputs reads an image's model sizes from its header by `pipeline_sizes`: they must be
  the shapes that ResizeImages and StageFields give its pixels."""
  from robust_u1_jax.data import stage_fields

  d = config_defaults.get_data_config()
  if variant == "crop_square":
    d.crop_square = True
  if variant == "small_rules":
    d.vae_max_side, d.vae_min_side, d.vae_stride = 64, 32, 16
    d.vit_max_side, d.vit_min_side, d.vit_patch = 48, 24, 8
    d.min_image_side = 20
  resize = transforms.ResizeImages.from_config(d, "vae", keys=("clean", "corrupted"))
  fields = stage_fields.StageFields("sft", seed=0, instruction="recover",
                                    vit_rule=transforms.resize_rule(d, "vit"))
  for h, w in [(19, 300), (21, 21), (300, 40), (333, 500), (1200, 700), (90, 1600)]:
    image = np.zeros((h, w, 3), np.uint8)
    out = resize.map({"clean": image, "corrupted": image, "index": 0})
    sizes = transforms.pipeline_sizes(h, w, d)
    if bad_records.is_skip(out):
      assert sizes is None, (h, w)
      continue
    out = fields.map(out)
    assert sizes == (out["clean"].shape[:2], out["corrupted_vit"].shape[:2]), (h, w)


def test_images_below_the_smallest_side_are_counted_bad_records():
  d = config_defaults.get_data_config()  # BAGEL's rules: one VAE stride (16) > one ViT patch (14)
  assert transforms.min_image_side(d) == 16 == transforms.default_min_side(16, 14)
  d.min_image_side = 24
  assert transforms.min_image_side(d) == 24
  d.min_image_side = 0
  d.vae_max_side, d.vae_min_side, d.vae_stride = 64, 32, 16
  resize = transforms.ResizeImages.from_config(d, "vae", keys=("image", "target_image"))
  records = [{"image": _rgb(1, 1), "path": "dot.png", "index": 0},
             {"image": _rgb(64, 15), "path": "thin.png", "index": 1},
             {"image": _rgb(16, 64), "path": "strip.png", "index": 2},
             {"image": _rgb(40, 40), "target_image": _rgb(8, 8), "path": "pair.jsonl",
              "target_image_path": "clean_8.png", "index": 3}]
  out = [resize.map(r) for r in records]
  assert [bad_records.is_skip(r) for r in out] == [True, True, False, True]
  assert out[0][bad_records.SKIP] == ("image: 1 x 1 pixels: a side below the smallest usable 16 "
                                      "(data.min_image_side; the resize would make up nearly "
                                      "every pixel)")
  assert out[3]["path"] == "clean_8.png" and out[3][bad_records.SKIP].startswith("target_image")
  assert out[2]["image"].shape[:2] == transforms.bagel_size(16, 64, max_side=64, min_side=32,
                                                            stride=16)  # 16 pixels is enough
  tracker = bad_records.SkipTracker(0.9, min_seen=10)
  kept = [r for r in out if tracker.filter(r)]
  assert len(kept) == 1 and tracker.metrics()["skipped"] == 3
  assert [p for p, *_ in tracker.worst()] == ["clean_8.png", "dot.png", "thin.png"]


def test_a_pipeline_counts_and_replaces_a_tiny_image(tmp_path):
  from robust_u1_jax.data import pipeline

  for i in range(3):
    Image.fromarray(_rgb(48, 64, seed=i)).save(tmp_path / f"good_{i}.png")
  Image.fromarray(_rgb(1, 1)).save(tmp_path / "dot.png")
  d = config_defaults.get_data_config()
  d.update(source="folder", path=str(tmp_path), corruption="none", batch_size=1, num_epochs=1,
           shuffle=False, max_skip_ratio=0.5, vae_max_side=64, vae_min_side=32, vae_stride=16,
           vit_max_side=64, vit_min_side=32, vit_patch=8)
  p = pipeline.make_pipeline(d, seed=0)
  batches = list(p)
  assert len(batches) == 4  # dot.png (index 0) replaced by a good image
  assert p.metrics() == {"skipped": 1, "seen": 4, "skip_ratio": 0.25}
  assert [int(b["index"][0]) for b in batches][1:] == [1, 2, 3]
  assert int(batches[0]["index"][0]) in (1, 2, 3)


# -------------------------------------------------------------------------------------- corruption

def test_record_rng_is_a_function_of_the_triple():
  import jax

  def words(*t):
    rng, key = transforms.record_rng(*t)
    return rng.integers(1 << 30, size=4).tolist(), jax.random.key_data(key).tolist()

  assert words(1, 2, 3) == words(1, 2, 3)
  assert len({str(words(*t)) for t in [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3)]}) == 4


def test_corruption_on_the_fly_deterministic_per_seed_index_epoch():
  clean = _rgb(32, 32, seed=5)
  corrupt = transforms.CorruptOnTheFly("imagenet_c/gaussian_noise", 0, -1.0, seed=7)
  rec = {"image": clean, "index": 11, "caption": "c"}

  def run(r):
    return corrupt.map(r)

  a, b = run({**rec, "epoch": 2}), run({**rec, "epoch": 2})
  np.testing.assert_array_equal(a["corrupted"], b["corrupted"])
  assert a["corruption"] == "imagenet_c/gaussian_noise" and a["corruption_levels"] == \
      b["corruption_levels"]
  assert a["clean"] is clean and "image" not in a and a["caption"] == "c"
  assert a["corrupted"].dtype == np.uint8 and a["corrupted"].shape == clean.shape
  assert not np.array_equal(a["corrupted"], clean)
  other_epoch = run({**rec, "epoch": 3})
  other_index = run({**rec, "index": 12, "epoch": 2})
  other_seed = transforms.CorruptOnTheFly("imagenet_c/gaussian_noise", 0, -1.0, seed=8).map(
      {**rec, "epoch": 2})
  for other in (other_epoch, other_index, other_seed):
    assert not np.array_equal(other["corrupted"], a["corrupted"])
  # Without an 'epoch' field the record is in epoch 0; a pickled copy (Grain worker) agrees.
  copy = pickle.loads(pickle.dumps(corrupt))
  np.testing.assert_array_equal(copy.map(rec)["corrupted"], run({**rec, "epoch": 0})["corrupted"])


def test_severity_and_intensity_draws():
  drawn = transforms.corruption_spec("imagenet_c/gaussian_noise", 0, -1.0)
  levels = {transforms.draw_corruption(drawn, 0, i, 0)[1]["severity"] for i in range(60)}
  assert levels == {1, 2, 3, 4, 5}
  fixed = transforms.corruption_spec("imagenet_c/gaussian_noise", 3, -1.0)
  assert {transforms.draw_corruption(fixed, 0, i, 0)[1]["severity"] for i in range(20)} == {3}
  r1 = transforms.corruption_spec("lens_blur", 3, -1.0)
  values = [transforms.draw_corruption(r1, 0, i, 0)[1]["intensity"] for i in range(50)]
  assert all(0 <= v <= 1 for v in values) and len(set(values)) == 50
  r1_fixed = transforms.corruption_spec("lens_blur", 3, 0.45)
  assert transforms.draw_corruption(r1_fixed, 0, 5, 0)[1] == {"intensity": 0.45}


def test_imagenet_c_mode_draws_all_19_types():
  spec = transforms.corruption_spec("imagenet_c", 0, -1.0)
  assert len(transforms.IMAGENET_C_NAMES) == 19
  names = [transforms.draw_corruption(spec, 3, i, 0)[0] for i in range(400)]
  assert set(names) == {f"imagenet_c/{n}" for n in transforms.IMAGENET_C_NAMES}
  assert names == [transforms.draw_corruption(spec, 3, i, 0)[0] for i in range(400)]
  assert names != [transforms.draw_corruption(spec, 3, i, 1)[0] for i in range(400)]


def test_corruption_name_resolution():
  assert transforms.corruption_spec("gaussian_noise", 2, -1.0).name == "imagenet_c/gaussian_noise"
  assert transforms.corruption_spec("gaussian_noise", 2, 0.3).name == "robust_r1/gaussian_noise"
  assert transforms.corruption_spec("fog", 0, 0.3).name == "imagenet_c/fog"
  assert transforms.corruption_spec("robust_r1/lens_blur", 0, -1).level == "intensity"
  with pytest.raises(ValueError, match="valid names"):
    transforms.corruption_spec("sparkles", 3, -1.0)
  with pytest.raises(ValueError, match="severity"):
    transforms.corruption_spec("imagenet_c", 9, -1.0)


def test_no_corruption_and_given_pairs():
  clean = _rgb(16, 16)
  out = transforms.CorruptOnTheFly("none").map({"image": clean, "index": 0})
  assert out["corrupted"] is clean and out["clean"] is clean and out["corruption"] == "none"
  pair = {"image": clean, "target_image": clean[::-1], "index": 1, "prompt": "p"}
  out = transforms.CorruptOnTheFly("none").map(pair)
  assert out["corrupted"] is clean and out["corruption"] == "dataset"
  np.testing.assert_array_equal(out["clean"], clean[::-1])
  with pytest.raises(ValueError, match="data.corruption='none'"):
    transforms.CorruptOnTheFly("imagenet_c/fog", 3).map(pair)
  marker = bad_records.skip_record("bad", "f", 2)
  assert transforms.CorruptOnTheFly("imagenet_c/fog", 3).map(marker) is marker


def test_robust_r1_pipeline_on_the_fly():
  clean = _rgb(32, 32, seed=9)
  corrupt = transforms.CorruptOnTheFly.from_config(config_defaults.get_data_config(), seed=3)
  assert corrupt.spec.mode == "pipeline" and corrupt.spec.intensity < 0
  a = corrupt.map({"image": clean, "index": 4, "epoch": 0})
  b = corrupt.map({"image": clean, "index": 4, "epoch": 0})
  np.testing.assert_array_equal(a["corrupted"], b["corrupted"])
  assert a["corruption"] == "robust_r1_pipeline" and len(a["corruption_steps"]) == 4
  assert all(s.startswith("robust_r1/") for s in a["corruption_steps"])
  assert all(0.0 <= v <= 1.0 for v in a["corruption_levels"])


def test_pipeline_intensity_drawn_per_record_serves_all_four_stages():
  clean = _rgb(32, 32, seed=9)
  data = config_defaults.get_data_config()
  data.intensity_draw = "record"
  corrupt = transforms.CorruptOnTheFly.from_config(data, seed=3)
  levels = [corrupt.map({"image": clean, "index": i, "epoch": 0})["corruption_levels"]
            for i in range(40)]
  assert all(len(set(v)) == 1 for v in levels)  # one intensity, every stage
  drawn = [v[0] for v in levels]
  assert len(set(drawn)) == 40 and min(drawn) < 0.25 and max(drawn) > 0.75
  # Per stage (the default), the four stages' intensities differ.
  per_stage = transforms.CorruptOnTheFly.from_config(config_defaults.get_data_config(), seed=3)
  assert len(set(per_stage.map({"image": clean, "index": 0})["corruption_levels"])) == 4
  with pytest.raises(ValueError, match="intensity_draw 'image' is invalid"):
    transforms.corruption_spec("robust_r1_pipeline", 0, -1.0, "image")


def test_a_clean_fraction_leaves_records_clean_and_the_others_as_they_were():
  clean = _rgb(32, 32, seed=9)
  data = config_defaults.get_data_config()
  data.intensity_draw = "record"
  plain = transforms.CorruptOnTheFly.from_config(data, seed=3)
  data.clean_fraction = 0.25
  some_clean = transforms.CorruptOnTheFly.from_config(data, seed=3)
  left_clean = 0
  for i in range(80):
    got = some_clean.map({"image": clean, "index": i, "epoch": 0})
    if got["corruption"] == "none":
      left_clean += 1
      np.testing.assert_array_equal(got["corrupted"], clean)
      assert got["corruption_steps"] == [] and got["corruption_levels"] == []
    else:  # the corruption's own draws are those without a clean fraction
      want = plain.map({"image": clean, "index": i, "epoch": 0})
      np.testing.assert_array_equal(got["corrupted"], want["corrupted"])
      assert got["corruption_levels"] == want["corruption_levels"]
  assert 10 <= left_clean <= 30  # a quarter of 80, drawn
  # Drawn per epoch too: a record clean in one epoch is not clean in all.
  assert len({some_clean.map({"image": clean, "index": 0, "epoch": e})["corruption"]
              for e in range(12)}) == 2
  with pytest.raises(ValueError, match="clean_fraction 1.0 is invalid"):
    transforms.corruption_spec("robust_r1_pipeline", 0, -1.0, "record", 1.0)


def test_add_epoch():
  add = transforms.AddEpoch(10)
  assert add.map_with_index(0, {"index": 0})["epoch"] == 0
  assert add.map_with_index(25, {"index": 5})["epoch"] == 2
  with pytest.raises(ValueError):
    transforms.AddEpoch(0)


# ---------------------------------------------------------------------------------- tokenisation

def test_tokenize_text_frames_with_im_start_end():
  tok = tokenizer_lib.load_tokenizer()
  ids = tokenizer_lib.special_token_ids(tok)
  out = transforms.tokenize_text(tok, "Please restore this corrupted image to its clean version.")
  assert out.dtype == np.int32 and out.ndim == 1
  assert out[0] == ids["im_start"] and out[-1] == ids["im_end"]
  assert tok.decode(out[1:-1].tolist()) == (
      "Please restore this corrupted image to its clean version.")
