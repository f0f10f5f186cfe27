"""`python -m robust_u1_jax.corrupt`: listing, writing corrupted images, and refusing bad input."""

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

from robust_u1_jax import corrupt as cli
from robust_u1_jax.data import corruptions


def _run_main(capsys, *args: str) -> tuple[int, str, str]:
  """main() with these flags, in process (a JAX import per subprocess is slow); restores flags."""
  with flagsaver.flagsaver():
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["corrupt", *args])
    rc = cli.main(["corrupt"])
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


def test_writes_the_library_result(capsys, image_path, tmp_path):
  out_path = tmp_path / "out.png"
  rc, out, _ = _run_main(capsys, f"--image={image_path}", "--type=jpeg_compression",
                         "--severity=4", "--seed=3", f"--out={out_path}")
  assert rc == 0 and "wrote" in out
  written = np.asarray(Image.open(out_path))
  clean = np.asarray(Image.open(image_path))
  expected = corruptions.corrupt(clean, "imagenet_c/jpeg_compression", jax.random.key(3),
                                 severity=4)
  np.testing.assert_array_equal(written, expected)
  assert np.abs(written.astype(int) - clean).mean() > 1.0


def test_pipeline_with_intensity(capsys, image_path, tmp_path):
  out_path = tmp_path / "pipe.png"
  rc, _, _ = _run_main(capsys, f"--image={image_path}", "--type=robust_r1_pipeline",
                       "--intensity=0.45", "--seed=1", f"--out={out_path}")
  assert rc == 0
  written = np.asarray(Image.open(out_path))
  clean = np.asarray(Image.open(image_path))
  assert written.shape == clean.shape and not np.array_equal(written, clean)
  expected = corruptions.corrupt(clean, "robust_r1_pipeline", jax.random.key(1), intensity=0.45)
  np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize("args, message", [
    (["--type=fog", "--severity=6"], "allowed 1, 2, 3, 4, 5"),
    (["--type=fog", "--intensity=0.5"], "needs severity"),
    (["--type=lens_flare", "--intensity=1.5"], r"allowed a float in \[0, 1\]"),
    (["--type=robust_r1_pipeline", "--severity=2"], "takes an intensity"),
])
def test_bad_levels_exit_nonzero(capsys, image_path, tmp_path, args, message):
  out_path = tmp_path / "never.png"
  rc, _, err = _run_main(capsys, f"--image={image_path}", f"--out={out_path}", *args)
  assert rc == 1
  assert re.search(message, err), err
  assert not out_path.exists()


def test_unknown_name_exits_nonzero_listing_names(image_path, tmp_path):
  """Through the real entry point: app.run turns main's return value into the exit status."""
  out_path = tmp_path / "never.png"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "robust_u1_jax.corrupt", f"--image={image_path}", "--type=fogg",
       "--severity=1", f"--out={out_path}"],
      capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 1
  assert "unknown corruption 'fogg'" in proc.stderr
  assert "imagenet_c/fog" in proc.stderr and "robust_r1_pipeline" in proc.stderr
  assert not out_path.exists()
