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


def image_paths(root: str):
  """The image files under `root`, recursively, each relative to it (POSIX), in walk order.

  Hidden files and folders are left out, as `recover` leaves them out: a notebook's
  `.ipynb_checkpoints` copies, macOS's `._photo.jpg` resource forks (not images), an interrupted
  write's temporary file."""
  for folder, dirs, names in os.walk(root, followlinks=True):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    base = os.path.relpath(folder, root)
    for name in names:
      if not name.startswith(".") and is_image_name(name):
        yield name if base == "." else os.path.join(base, name).replace(os.sep, "/")


def holds_images(root: str) -> bool:
  """Whether any image file lies under `root` (`image_paths`); stops at the first one found."""
  return next(image_paths(root), None) is not None
