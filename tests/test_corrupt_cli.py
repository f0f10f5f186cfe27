"""`python -m robust_u1_jax.corrupt`: listing, writing corrupted images through the pipeline's
decoder, and refusing bad input (more bad inputs in test_cli_errors.py)."""

import io
import os
import re
import subprocess
import sys

from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
from PIL import Image
import pytest
import skimage.data

from robust_u1_jax import cli as cli_lib
from robust_u1_jax import corrupt as cli
from robust_u1_jax.data import corruptions
from robust_u1_jax.data import transforms


def _run_main(capsys, *args: str) -> tuple[int, str, str]:
  """main() with these flags, in process (a JAX import per subprocess is slow), with the
  program's error handling (cli.call); restores flags."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["corrupt", *args])
    rc = cli_lib.call(cli.main, ["corrupt"])
  out = capsys.readouterr()
  return rc, out.out, out.err


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("cli") / "in.png"
  Image.fromarray(skimage.data.astronaut()).resize((80, 48), Image.BILINEAR).save(path)
  return path


def test_list_prints_every_name_with_family(capsys):
  rc, out, _ = _run_main(capsys, "--list")
  assert rc == 0
  lines = out.strip().split("\n")
  pairs = [tuple(line.split("\t")) for line in lines]
  assert pairs[:-1] == corruptions.list_corruptions()
  assert pairs[-1] == ("robust_r1_pipeline", "robust_r1/pipeline")
  assert ("imagenet_c/fog", "imagenet_c/weather") in pairs
  assert ("robust_r1/lens_flare", "robust_r1/capture") in pairs
  assert len(pairs) == 19 + 16 + 1


@pytest.mark.parametrize("out, args, name", [
    ("existing", ["--type=fog", "--severity=3"], "in_fog_s3.png"),
    ("new/", ["--type=lens_flare", "--intensity=0.45"], "in_lens_flare_0.45.png"),
    ("new/", ["--type=robust_r1_pipeline"], "in_robust_r1_pipeline.png"),
    # Another seed, another draw: it replaced seed 0's file without a word.
    ("new/", ["--type=fog", "--severity=3", "--seed=2"], "in_fog_s3_seed2.png"),
    ("new/", ["--type=FOG", "--severity=3"], "in_fog_s3.png"),  # a name in any case
])
def test_a_folder_out_gets_a_name_inside_it(capsys, image_path, tmp_path, out, args, name):
  (tmp_path / "existing").mkdir()
  folder = os.path.join(tmp_path, out)  # a pathlib.Path would drop the trailing /
  rc, printed, errors = _run_main(capsys, f"--image={image_path}", *args, f"--out={folder}")
  written = os.path.join(folder, name)
  assert rc == 0 and printed.strip().splitlines()[-1] == f"wrote {written} (80x48)"
  assert Image.open(written).size == (80, 48)
  assert os.listdir(folder) == [name] and "replacing" not in errors
  # The same name again (`in.jpg` after `in.png` gets it too): said before it is replaced.
  rc, _, errors = _run_main(capsys, f"--image={image_path}", *args, f"--out={folder}")
  assert rc == 0 and f"note: replacing {written}" in errors


def test_writes_the_library_result(capsys, image_path, tmp_path):
  out_path = tmp_path / "out.png"
  rc, out, _ = _run_main(capsys, f"--image={image_path}", "--type=jpeg_compression",
                         "--severity=4", "--seed=3", f"--out={out_path}")
  assert rc == 0 and out.strip().splitlines()[-1] == f"wrote {out_path} (80x48)"
  written = np.asarray(Image.open(out_path))
  clean = np.asarray(Image.open(image_path))
  expected = corruptions.corrupt(clean, "imagenet_c/jpeg_compression", jax.random.key(3),
                                 severity=4)
  np.testing.assert_array_equal(written, expected)
  assert np.abs(written.astype(int) - clean).mean() > 1.0


def test_pipeline_with_intensity(capsys, image_path, tmp_path):
  out_path = tmp_path / "pipe.png"
  from robust_u1_jax.data.corruptions import robust_r1

  for intensity in ([], ["--intensity=0.45"]):  # drawn per stage, or given
    rc, printed, _ = _run_main(capsys, f"--image={image_path}", "--type=robust_r1_pipeline",
                               *intensity, "--seed=1", f"--out={out_path}")
    assert rc == 0
    written = np.asarray(Image.open(out_path))
    clean = np.asarray(Image.open(image_path))
    assert written.shape == clean.shape and not np.array_equal(written, clean)
    level = 0.45 if intensity else None
    expected, plan = robust_r1.apply_pipeline(clean, jax.random.key(1), level, return_plan=True)
    np.testing.assert_array_equal(written, expected)
    # What it drew, in the order applied (it said nothing of the degradations).
    assert printed.splitlines()[0] == "drew " + ", ".join(f"{stage} {step} {v:.2f}"
                                                          for stage, step, v in plan)


@pytest.mark.parametrize("args", [["--type=robust_r1_pipeline", "--seed=2"],  # draws it
                                  ["--type=dark_illumination"]])
def test_a_black_image_of_dark_illumination_at_intensity_1_is_said(capsys, image_path, tmp_path,
                                                                   args):
  # The release's 1 - I^2 at I = 1 writes a black image, which read as a failed write.
  rc, printed, err = _run_main(capsys, f"--image={image_path}", "--intensity=1.0", *args,
                               f"--out={tmp_path / 'dark.png'}")
  assert rc == 0 and np.asarray(Image.open(tmp_path / "dark.png")).max() == 0
  assert ("note: dark_illumination at intensity 1 multiplies the image by 1 - I^2 = 0, the "
          "release's formula: it is black but for what later degradations draw (the "
          "evaluation's 100 % is intensity 0.9)") in err, (printed, err)
  rc, _, err = _run_main(capsys, f"--image={image_path}", "--intensity=0.9", *args,
                         f"--out={tmp_path / 'dark.png'}")
  assert rc == 0 and "note: dark" not in err


@pytest.mark.parametrize("args, message", [
    # The flag named (it read "severity 6 for imagenet_c/fog is invalid").
    (["--type=fog", "--severity=6"],
     r"^error: --severity 6: not a level of imagenet_c/fog; allowed 1, 2, 3, 4, 5$"),
    # The flags named, not the library's keyword arguments.
    (["--type=fog", "--intensity=0.5"],
     r"needs --severity \(for imagenet_c/fog\), not --intensity"),
    (["--type=fog"], r"^error: corruption 'fog' needs --severity \(for imagenet_c/fog\)$"),
    (["--type=lens_flare", "--intensity=1.5"],
     r"^error: --intensity 1.5: not a level of \S+lens_flare; allowed a float in \[0, 1\]$"),
    (["--type=robust_r1_pipeline", "--severity=2"],
     r"robust_r1_pipeline takes --intensity in \[0, 1\] \(or none\), not --severity$"),
])
def test_bad_levels_exit_2(capsys, image_path, tmp_path, args, message):
  out_path = tmp_path / "never.png"
  rc, _, err = _run_main(capsys, f"--image={image_path}", f"--out={out_path}", *args)
  assert rc == 2
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert re.search(message, err.strip()), err
  assert not out_path.exists()


def test_unknown_name_exits_2_with_the_nearest_names(image_path, tmp_path):
  """Through the real entry point: cli.run turns the error into the exit status."""
  out_path = tmp_path / "never.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "robust_u1_jax.corrupt", f"--image={image_path}", "--type=fogg",
       "--severity=1", f"--out={out_path}"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 2
  assert proc.stderr == ("error: --type fogg: unknown corruption; did you mean fog? `--list` "
                         "prints every name\n")
  assert not out_path.exists()


def _png(image: Image.Image, **kw) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG", **kw)
  return buf.getvalue()


def test_16_bit_grey_is_decoded_like_the_pipeline(capsys, tmp_path):
  """Not washed out: the pipeline's decoder scales 16 bits to 8 (PIL's convert('RGB') clips)."""
  ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
  path = tmp_path / "grey16.png"
  path.write_bytes(_png(Image.fromarray(ramp)))
  out_path = tmp_path / "out.png"
  rc, _, err = _run_main(capsys, f"--image={path}", "--type=brightness", "--severity=1",
                         f"--out={out_path}")
  assert rc == 0, err
  decoded = transforms.decode_image(path.read_bytes())
  assert decoded.min() == 0 and decoded.max() == 255 and 100 < decoded.mean() < 155
  expected = corruptions.corrupt(decoded, "imagenet_c/brightness", jax.random.key(0), severity=1)
  np.testing.assert_array_equal(np.asarray(Image.open(out_path)), expected)


def test_transparency_and_rotation_are_said(capsys, tmp_path):
  rgba = np.zeros((40, 56, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :28, 3] = 255  # the right half transparent: white after compositing
  exif = Image.Exif()
  exif[0x0112] = 6  # stored sideways: turned 90 degrees clockwise on reading
  path = tmp_path / "rgba.png"
  path.write_bytes(_png(Image.fromarray(rgba, "RGBA"), exif=exif))
  out_path = tmp_path / "out.png"
  rc, _, err = _run_main(capsys, f"--image={path}", "--type=contrast", "--severity=1",
                         f"--out={out_path}")
  assert rc == 0, err
  assert f"note: {path}: transparent pixels composited on white" in err
  assert f"note: {path}: EXIF orientation 6 applied: turned 90 degrees clockwise" in err
  assert Image.open(out_path).size == (40, 56)


def test_too_small_images_are_refused(capsys, tmp_path):
  # `corrupt` resizes nothing: the reason is not the resize's (it said so).
  for (h, w), kind, side, setting in (
      ((1, 1), "fog", 16, "--min_side; training skips such an image"),
      ((20, 40), "robust_r1_pipeline", 32,
       "the Robust-R1 degradations' own, above --min_side 16; their kernels and warps are "
       "sized for no less")):
    path = tmp_path / f"small_{h}x{w}.png"
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)
    level = "--severity=1" if kind == "fog" else "--intensity=0.5"
    rc, _, err = _run_main(capsys, f"--image={path}", f"--type={kind}", level,
                           f"--out={tmp_path / 'never.png'}")
    assert rc == 2
    assert err == (f"error: {path}: {w} x {h} pixels: a side below the smallest usable {side} "
                   f"({setting})\n")
  assert not (tmp_path / "never.png").exists()
  # --min_side lowers the default (not the Robust-R1 degradations' own 32).
  rc, _, err = _run_main(capsys, f"--image={tmp_path / 'small_1x1.png'}", "--type=fog",
                         "--severity=1", "--min_side=1", f"--out={tmp_path / 'one.png'}")
  assert rc == 0, err
  assert cli.smallest_side("robust_r1/lens_flare", 1) == 32 and cli.smallest_side("fog", 1) == 1
