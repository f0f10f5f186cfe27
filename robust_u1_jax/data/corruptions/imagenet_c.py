"""The ImageNet-C family: the 19 corruptions, their groups, and which ones draw randomness.

Implementations live in `imagenet_c_noise_blur`, `imagenet_c_weather` and `imagenet_c_digital`;
each is `fn(x_hwc_float01, key, severity, *, reference_size=224) -> x_hwc_float01`, pure JAX
(jit + vmap), with severity 1..5 a Python int or a traced int32 scalar. None needs host-side
code: the reference's OpenCV/PIL/scikit-image steps (disk filter, zoom, JPEG, box resize, Canny
and distance transform, HSV) are all reimplemented in JAX, and frost's photographs are replaced
by a procedural texture.
"""

from collections.abc import Callable
import dataclasses

from robust_u1_jax.data.corruptions import imagenet_c_digital as _digital
from robust_u1_jax.data.corruptions import imagenet_c_noise_blur as _noise_blur
from robust_u1_jax.data.corruptions import imagenet_c_weather as _weather

SEVERITIES = _noise_blur.SEVERITIES


@dataclasses.dataclass(frozen=True)
class ImageNetCCorruption:
  name: str
  group: str  # noise | blur | weather | digital
  fn: Callable
  stochastic: bool  # whether the output depends on the key


_DETERMINISTIC = {"defocus_blur", "zoom_blur", "gaussian_blur", "brightness", "contrast",
                  "pixelate", "jpeg_compression", "saturate"}

CORRUPTIONS: dict[str, ImageNetCCorruption] = {
    name: ImageNetCCorruption(name, group, fn, name not in _DETERMINISTIC)
    for group, table in (("noise", _noise_blur.NOISE), ("blur", _noise_blur.BLUR),
                         ("weather", _weather.WEATHER), ("digital", _digital.DIGITAL))
    for name, fn in table.items()
}

# The 15 benchmark corruptions of Hendrycks & Dietterich; the other 4 are their held-out set.
BENCHMARK_15 = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
                "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
                "elastic_transform", "pixelate", "jpeg_compression")
HELD_OUT_4 = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
