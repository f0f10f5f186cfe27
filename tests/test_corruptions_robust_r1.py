"""Tests of the Robust-R1 degradations and the four-stage weighted pipeline."""

import io

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from skimage import color, data, transform
from skimage.metrics import structural_similarity

from robust_u1_jax.data.corruptions import robust_r1 as rr
from robust_u1_jax.data.corruptions import robust_r1_capture
from robust_u1_jax.data.corruptions import robust_r1_transmission

NAMES = list(rr.DEGRADATIONS)
LEVELS = tuple(rr.EVAL_INTENSITIES.values())  # 0.23, 0.45, 0.9


def _astronaut(h, w) -> np.ndarray:
  img = transform.resize(data.astronaut(), (h, w), anti_aliasing=True)
  return np.clip(img, 0.0, 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def square():
  return _astronaut(64, 64)


@pytest.fixture(scope="module")
def wide_uint8():
  return np.round(_astronaut(48, 80) * 255).astype(np.uint8)


def _ssim(a, b):
  return structural_similarity(np.asarray(a), np.asarray(b), channel_axis=-1, data_range=1.0)


def test_table_stages_weights_and_eval_levels():
  assert rr.STAGES == ("capture", "transmission", "environment", "post_processing")
  assert len(rr.DEGRADATIONS) == 16
  by_stage = {s: [n for n, d in rr.DEGRADATIONS.items() if d.stage == s] for s in rr.STAGES}
  assert by_stage == {
      "capture": ["lens_blur", "lens_flare", "motion_blur", "dirty_lens", "hsv_saturation"],
      "transmission": ["jpeg_compression", "block_exchange", "mean_shift", "scan_lines"],
      "environment": ["dark_illumination", "atmospheric_turbulence", "gaussian_noise",
                      "color_diffusion"],
      "post_processing": ["sharpness_change", "graffiti", "watermark_damage"],
  }
  assert all(d.weight > 0 and d.name == n for n, d in rr.DEGRADATIONS.items())
  assert rr.EVAL_INTENSITIES == {25: 0.23, 50: 0.45, 100: 0.9}


def test_stage_weights_are_the_release_values():
  # The Robust-R1 release's draw weights (add_degradation/generate_degradation.py, as the module
  # docstring records them), written out here: uniform within each stage. Checking the draw
  # frequencies against the module's own table cannot see a changed weight.
  release = {
      "lens_blur": 20, "lens_flare": 20, "motion_blur": 20, "dirty_lens": 20, "hsv_saturation": 20,
      "jpeg_compression": 25, "block_exchange": 25, "mean_shift": 25, "scan_lines": 25,
      "dark_illumination": 25, "atmospheric_turbulence": 25, "gaussian_noise": 25,
      "color_diffusion": 25,
      "sharpness_change": 33, "graffiti": 33, "watermark_damage": 34,
  }
  assert {n: d.weight for n, d in rr.DEGRADATIONS.items()} == release


@pytest.mark.parametrize("side,reference_size,intensity", [(64, 64, 0.9), (64, 64, 0.45),
                                                           (128, 256, 0.9)])
def test_motion_blur_spreads_a_point_over_the_documented_length(side, reference_size, intensity):
  # The documented kernel: n uniform taps on a line of length 30 I s px (s = side / reference
  # size), n = max(2, ceil(30 s)) + 1. A single bright pixel on black spreads into that kernel; its
  # spread (second moment about its centre) is the taps' L^2 (n + 1) / (12 (n - 1)) whatever the
  # random angle, plus at most 0.5 px^2 from the bilinear taps. A wrong length moves it by far more.
  s = side / reference_size
  length = 30.0 * s * intensity
  n = max(2, int(np.ceil(30.0 * s))) + 1
  expected = length ** 2 * (n + 1) / (12 * (n - 1))
  x = np.zeros((side, side, 1), np.float32)
  x[side // 2, side // 2] = 1.0
  for seed in (0, 1, 2):
    y = np.asarray(robust_r1_capture.motion_blur(x, jax.random.key(seed), intensity,
                                                 reference_size=reference_size))[..., 0]
    assert y.sum() == pytest.approx(1.0, abs=1e-4)  # the kernel stays inside the image
    yy, xx = np.mgrid[:side, :side]
    cy, cx = (y * yy).sum(), (y * xx).sum()
    spread = (y * ((yy - cy) ** 2 + (xx - cx) ** 2)).sum()
    assert expected - 1e-3 <= spread <= expected + 0.5, (seed, spread, expected)


@pytest.mark.parametrize("name", NAMES)
def test_degradation_square_float(name, square):
  """64 x 64 float: identity-ish at 0, differs above, range kept, deterministic, SSIM falls."""
  for seed in (0, 1):
    key = jax.random.key(seed)
    outs = {i: np.asarray(rr.degrade(square, name, key, i)) for i in (0.0,) + LEVELS}
    for i, out in outs.items():
      assert out.shape == square.shape and out.dtype == np.float32
      assert out.min() >= 0.0 and out.max() <= 1.0
    # JPEG at I = 0 is quality 100 with 4:2:0 chroma: close to, not exactly, the input.
    tol = 0.2 if name == "jpeg_compression" else 1e-5
    assert np.abs(outs[0.0] - square).max() <= tol
    assert _ssim(outs[0.0], square) > 0.98
    for i in LEVELS:
      assert np.abs(outs[i] - square).max() > 1e-3, (name, i)
    np.testing.assert_array_equal(outs[0.45], np.asarray(rr.degrade(square, name, key, 0.45)))
    ssims = [_ssim(outs[i], square) for i in LEVELS]
    assert ssims[0] > ssims[1] > ssims[2], (name, seed, ssims)


@pytest.mark.parametrize("name", NAMES)
def test_degradation_wide_uint8(name, wide_uint8):
  """48 x 80 uint8 in and out; float input of the same image gives the same result rounded."""
  key = jax.random.key(7)
  out = np.asarray(rr.degrade(wide_uint8, name, key, 0.45))
  assert out.shape == wide_uint8.shape and out.dtype == np.uint8
  assert np.abs(out.astype(int) - wide_uint8).max() > 0
  np.testing.assert_array_equal(out, np.asarray(rr.degrade(wide_uint8, name, key, 0.45)))
  # The same float image (converted as the uint8 path converts it; mean_shift's colour window
  # is a hard threshold, so a one-ulp difference in the input could move a pixel's mode).
  as_float = jnp.asarray(wide_uint8).astype(jnp.float32) / 255.0
  out_f = np.asarray(rr.degrade(as_float, name, key, 0.45))
  np.testing.assert_array_equal(np.round(out_f * 255.0), out)


def test_key_dependence(square):
  stochastic = ("lens_flare", "motion_blur", "dirty_lens", "block_exchange",
                "atmospheric_turbulence", "gaussian_noise", "graffiti", "watermark_damage")
  for name in stochastic:
    a = np.asarray(rr.degrade(square, name, jax.random.key(0), 0.9))
    b = np.asarray(rr.degrade(square, name, jax.random.key(1), 0.9))
    assert np.abs(a - b).max() > 1e-3, name


def test_vmap_batch_with_per_image_intensity(square):
  """A JAX degradation vmapped over images, keys and traced intensities equals one-by-one."""
  batch = np.stack([square, square[::-1], square[:, ::-1]])
  keys = jax.random.split(jax.random.key(3), 3)
  levels = jnp.array(LEVELS)
  for name in ("block_exchange", "scan_lines", "mean_shift"):
    fn = rr.DEGRADATIONS[name].fn
    batched = np.asarray(jax.jit(jax.vmap(fn))(batch, keys, levels))
    for b in range(3):
      single = np.asarray(rr.degrade(batch[b], name, keys[b], float(levels[b])))
      np.testing.assert_allclose(batched[b], single, atol=1e-5, err_msg=name)


# ------------------------------------------------------------------ host references / parity

def test_dark_illumination_exact(square, wide_uint8):
  for i in LEVELS:
    out = np.asarray(rr.degrade(square, "dark_illumination", jax.random.key(0), i))
    np.testing.assert_allclose(out, square * (1 - i * i), atol=1e-6)
  out8 = np.asarray(rr.degrade(wide_uint8, "dark_illumination", jax.random.key(0), 0.9))
  ref8 = np.round(wide_uint8 / 255.0 * (1 - 0.81) * 255.0)
  assert np.abs(out8.astype(int) - ref8).max() <= 1


def test_gaussian_noise_statistics_match_host_reference():
  grey = np.full((64, 64, 3), 0.5, np.float32)  # sigma up to 0.26: no clipping at I = 0.45
  rng = np.random.default_rng(0)
  for i in (0.23, 0.45):
    noise = np.asarray(rr.degrade(grey, "gaussian_noise", jax.random.key(5), i)) - grey
    host = np.clip(grey + rng.normal(0.0, 75.0 * i / 255.0, grey.shape), 0, 1) - grey
    sigma = 75.0 * i / 255.0
    assert abs(noise.std() - sigma) < 0.03 * sigma
    assert abs(noise.std() - host.std()) < 0.05 * sigma
    assert abs(noise.mean()) < 0.05 * sigma


def test_hsv_saturation_matches_skimage(square):
  for i in LEVELS:
    hsv = color.rgb2hsv(square)
    hsv[..., 1] *= 1.0 - i
    ref = color.hsv2rgb(hsv)
    out = np.asarray(rr.degrade(square, "hsv_saturation", jax.random.key(0), i))
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_jpeg_compression_matches_pil(wide_uint8):
  for i in LEVELS:
    quality = max(5, int(100 - 95 * i))
    assert int(robust_r1_transmission.jpeg_quality(i)) == quality
    buf = io.BytesIO()
    Image.fromarray(wide_uint8).save(buf, "JPEG", quality=quality)
    ref = np.asarray(Image.open(buf).convert("RGB")).astype(np.float64)
    out = np.asarray(rr.degrade(wide_uint8, "jpeg_compression", jax.random.key(0), i))
    mse = np.mean((out.astype(np.float64) - ref) ** 2)
    psnr = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
    assert psnr > 35.0, (i, quality, psnr)


# ------------------------------------------------------------------------------- pipeline

def test_sample_plan_draws_by_weight():
  keys = jax.random.split(jax.random.key(11), 4000)
  idx, intens = jax.device_get(jax.vmap(rr.plan_arrays)(keys))
  assert idx.shape == (4000, 4) and intens.shape == (4000, 4)
  assert intens.min() >= 0.0 and intens.max() <= 1.0
  assert abs(intens.mean() - 0.5) < 0.02  # uniform: sd of the mean is 0.0023
  for s, stage in enumerate(rr.STAGES):
    members = [d for d in rr.DEGRADATIONS.values() if d.stage == stage]
    p = np.array([d.weight for d in members]) / sum(d.weight for d in members)
    freq = np.bincount(idx[:, s], minlength=len(members)) / len(keys)
    tol = 4.5 * np.sqrt(p * (1 - p) / len(keys))
    assert np.all(np.abs(freq - p) < tol), (stage, freq, p)
  # A fixed intensity is used for every stage.
  _, fixed = jax.device_get(rr.plan_arrays(keys[0], 0.45))
  np.testing.assert_allclose(fixed, 0.45)


def test_sample_plan_names_one_per_stage():
  plan = rr.sample_plan(jax.random.key(2))
  assert [p[0] for p in plan] == list(rr.STAGES)
  for stage, name, value in plan:
    assert rr.DEGRADATIONS[name].stage == stage and 0.0 <= value <= 1.0
  assert plan == rr.sample_plan(jax.random.key(2))
  assert [v for _, _, v in rr.sample_plan(jax.random.key(2), 0.9)] == pytest.approx([0.9] * 4)


def test_apply_pipeline_is_its_plan_and_deterministic(square):
  key = jax.random.key(4)
  out, plan = rr.apply_pipeline(square, key, return_plan=True)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(rr.apply_pipeline(square, key)))
  assert [p[0] for p in plan] == list(rr.STAGES)
  # Exactly the four planned degradations, in stage order, with the pipeline's stage keys.
  x = square
  for k_apply, (_, name, value) in zip(rr.stage_keys(key), plan):
    x = rr.degrade(x, name, k_apply, value)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
  other = rr.apply_pipeline(square, jax.random.key(5))
  assert np.abs(np.asarray(other) - np.asarray(out)).max() > 1e-3
  out8 = rr.apply_pipeline(np.round(square * 255).astype(np.uint8), key, 0.45)
  assert out8.dtype == jnp.uint8 and out8.shape == square.shape


def _cheap_table():
  names = ("hsv_saturation", "lens_blur", "scan_lines", "dark_illumination", "gaussian_noise",
           "sharpness_change")
  return {n: rr.DEGRADATIONS[n] for n in names}


def test_jax_pipeline_matches_host_pipeline_under_vmap(square):
  """apply_pipeline under jit + vmap is `pipeline` (lax.switch per stage); eager it runs the
  drawn plan step by step. Both agree per key."""
  table = _cheap_table()
  keys = jax.random.split(jax.random.key(8), 4)
  batch = np.stack([square] * 4)
  fn = jax.jit(jax.vmap(lambda x, k: rr.apply_pipeline(x, k, table=table)))
  batched = np.asarray(fn(batch, keys))
  plans = {tuple(n for _, n, _ in rr.sample_plan(k, table=table)) for k in keys}
  assert len(plans) > 1  # the batch really takes different branches
  for b in range(4):
    ref = np.asarray(rr.apply_pipeline(square, keys[b], table=table))
    np.testing.assert_allclose(batched[b], ref, atol=1e-5)


def test_pipeline_mixes_host_side_degradations(square):
  def host_invert(x, key, intensity, *, reference_size=None):
    del key, reference_size
    assert isinstance(x, np.ndarray) and isinstance(intensity, float)
    return 1.0 - intensity * x

  table = {n: d for n, d in _cheap_table().items() if d.stage != "post_processing"}
  table["host_invert"] = rr.Degradation("host_invert", "post_processing", 1.0, host_invert, True)
  key = jax.random.key(9)
  out, plan = rr.apply_pipeline(square, key, 0.5, return_plan=True, table=table)
  assert plan[-1][1] == "host_invert"
  before = rr.apply_pipeline(square, key, 0.5, table={**table, "host_invert": rr.Degradation(
      "host_invert", "post_processing", 1.0, lambda x, k, i, **_: x, True)})
  np.testing.assert_allclose(np.asarray(out), 1.0 - 0.5 * np.asarray(before), atol=1e-6)
  with pytest.raises(ValueError, match="host_invert"):
    rr.pipeline(square, key, table=table)


def test_bad_inputs_name_the_problem(square):
  with pytest.raises(ValueError, match="allowed.*lens_blur"):
    rr.degrade(square, "lens_blurr", jax.random.key(0), 0.5)
  with pytest.raises(ValueError, match="intensity must be a scalar in \\[0, 1\\], got 1.5"):
    rr.degrade(square, "lens_blur", jax.random.key(0), 1.5)
  with pytest.raises(ValueError, match="H x W x 3"):
    rr.degrade(square[..., :2], "lens_blur", jax.random.key(0), 0.5)
  with pytest.raises(ValueError, match="H, W >= 32"):
    rr.apply_pipeline(square[:16], jax.random.key(0))
  with pytest.raises(ValueError, match="got -0.1"):
    rr.sample_plan(jax.random.key(0), -0.1)
