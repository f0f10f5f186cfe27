"""Images into and out of the model: BAGEL's resize rules and the one ViT resize.

An image enters a context twice (docs/design.md#model-bagel-7b-mot): as VAE latent tokens at its
VAE size (longest side at most 1024, shortest at least 512, sides multiples of 16) and as SigLIP
patches at a ViT size computed from the VAE-size image (at most 980, at least 224, multiples of
14), the way BAGEL's `interleave_inference` resizes. A generated image re-enters the same way:
`vit_resize` is the one function that takes a VAE-size image to its ViT size, on the host (inputs,
cached recoveries) and inside a jitted step (recoveries made on the fly), so every path feeds the
ViT the same pixels.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from robust_u1_jax import files, pixels
from robust_u1_jax.checkpoints.bagel_dir import RULES_FILE, SideFileError
from robust_u1_jax.data import transforms



# Where `ImageRules.min_side` comes from, for the messages of images below it.
MIN_SIDE_SETTING = "one VAE stride or ViT patch of the model's resize rule"


@dataclasses.dataclass(frozen=True)
class ImageRules:
  """BAGEL's two resize rules; the defaults are BAGEL-7B's, the tiny world scales them down."""
  vae_max_side: int = 1024
  vae_min_side: int = 512
  vae_stride: int = 16
  vit_max_side: int = 980
  vit_min_side: int = 224
  vit_stride: int = 14

  @property
  def min_side(self) -> int:
    """The smallest image side the model takes (data.min_image_side's default): one VAE stride
    or ViT patch, whichever is larger; a smaller side is made up by the resize."""
    return transforms.default_min_side(self.vae_stride, self.vit_stride)

  @classmethod
  def from_data_config(cls, d) -> ImageRules:
    return cls(d.vae_max_side, d.vae_min_side, d.vae_stride, d.vit_max_side, d.vit_min_side,
               d.vit_patch)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any], source: str = "image rules") -> ImageRules:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"{source}: unknown fields {unknown}; allowed: {sorted(names)}")
    return cls(**{k: files.json_field(values, k, source, int) for k in values})

  @classmethod
  def for_model_dir(cls, path: str) -> ImageRules:
    """The rules a model was trained with (`image_rules.json`), else BAGEL's."""
    file = os.path.join(path, RULES_FILE)
    if not os.path.isfile(file):
      return cls()
    try:
      return cls.from_dict(files.read_json_object(file, "image rules"), source=file)
    except (TypeError, ValueError) as e:
      raise SideFileError.of(file, e) from None

  def save(self, path: str) -> None:
    with open(os.path.join(path, RULES_FILE), "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=1)

  def vae_size(self, height: int, width: int) -> tuple[int, int]:
    return transforms.bagel_size(height, width, max_side=self.vae_max_side,
                                 min_side=self.vae_min_side, stride=self.vae_stride)

  def vit_size(self, vae_height: int, vae_width: int) -> tuple[int, int]:
    """The ViT size of an image already at its VAE size."""
    return transforms.bagel_size(vae_height, vae_width, max_side=self.vit_max_side,
                                 min_side=self.vit_min_side, stride=self.vit_stride)

  def at_vae_size(self, image: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3 -> the image at its VAE size (BAGEL's resize rule), uint8."""
    return transforms.resize_image(image, self.vae_size(*image.shape[:2]))

  def prepare(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 H x W x 3 -> (VAE-size image, ViT-size image), both uint8."""
    vae = self.at_vae_size(image)
    return vae, np.asarray(vit_resize(vae, self.vit_size(*vae.shape[:2])))


def check_image(image, where: str, min_side: int = 0) -> np.ndarray:
  """`image` as the model takes it, a uint8 H x W x 3 (RGB) array with no side below `min_side`
  (`ImageRules.min_side`, which `recover` and `answer` hold files to); else a ValueError naming
  `where` and the conversion (a library caller's most common mistakes: a float image, a gray or
  RGBA one, a batch where one image belongs)."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    hint = ("a batch where one image belongs?" if image.ndim == 4 else
            "convert a gray or RGBA image with PIL's .convert('RGB')")
    raise ValueError(f"{where}: takes uint8 H x W x 3 (RGB) images, got shape {image.shape} "
                     f"({hint})")
  if image.dtype != np.uint8:
    raise ValueError(f"{where}: takes uint8 H x W x 3 (RGB) images, got {image.dtype} (a float "
                     "image in [0, 1]: robust_u1_jax.pixels.to_uint8(image))")
  if problem := transforms.size_problem(image, min_side, MIN_SIDE_SETTING):
    raise ValueError(f"{where}: an image of {problem}")
  return image


def quantize(images: jax.Array) -> jax.Array:
  """Float images in [0, 1] -> uint8, as a PNG on disk holds them."""
  return pixels.to_uint8(jnp.asarray(images))


def vit_resize(images: np.ndarray | jax.Array, size_hw: tuple[int, int]) -> jax.Array:
  """uint8 (..., H, W, 3) -> uint8 (..., h, w, 3): antialiased bicubic (Keys a = -0.5, as PIL's
  BICUBIC), rounded back to 8 bits. Same result in and out of jit."""
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise TypeError(f"vit_resize takes uint8 images, got {images.dtype}: quantize() them first")
  if tuple(images.shape[-3:-1]) == tuple(size_hw):
    return images
  shape = images.shape[:-3] + tuple(size_hw) + images.shape[-1:]
  resized = jax.image.resize(images.astype(jnp.float32), shape, "bicubic", antialias=True)
  return jnp.round(jnp.clip(resized, 0.0, 255.0)).astype(jnp.uint8)


def to_model_range(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] or float [0, 1] images -> float32 [-1, 1] (the VAE's and ViT's input range)."""
  return pixels.to_float(images, model_range=True)
