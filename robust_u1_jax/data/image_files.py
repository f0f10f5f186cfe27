"""Which files are images, by name: what an image folder holds for training
(`sources.ImageFolderSource`), for `recover`, and for the config's start-up check of a folder.
No JAX and no project imports, so the config checks can use it before anything loads."""

import os

# The formats `transforms.decode_image` reads, by file name (a GIF: its first frame).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
  return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def looked_for() -> str:
  return f"{', '.join('*' + e for e in IMAGE_EXTENSIONS)} (any case)"


def holds_images(root: str) -> bool:
  """Whether any image file lies under `root`, recursively; stops at the first one found."""
  for _, _, names in os.walk(root, followlinks=True):
    if any(is_image_name(n) for n in names):
      return True
  return False
