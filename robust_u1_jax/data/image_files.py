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
  """The image files under `root`, recursively (symlinked folders followed), each relative to it
  (POSIX), in walk order.

  Hidden files and folders are left out, as `recover` leaves them out: a notebook's
  `.ipynb_checkpoints` copies, macOS's `._photo.jpg` resource forks (not images), an interrupted
  write's temporary file. So are names of images that are no regular file (a named pipe would
  block the reader for good; a broken link is kept, for the reader to name) and a folder met a
  second time through a link (a link to a folder above it would repeat the data without end)."""
  visited = set()
  pending = [(root, "")]  # a stack: depth first, as os.walk goes
  while pending:
    folder, base = pending.pop()
    try:
      st = os.stat(folder)
      if (st.st_dev, st.st_ino) in visited:
        continue
      visited.add((st.st_dev, st.st_ino))
      with os.scandir(folder) as listing:  # by name: which path reaches a folder seen twice
        entries = sorted(listing, key=lambda entry: entry.name)
    except OSError:  # unreadable: left out, as os.walk leaves it
      continue
    below = []
    for entry in entries:
      if entry.name.startswith("."):
        continue
      relative = f"{base}/{entry.name}" if base else entry.name
      try:
        is_dir = entry.is_dir()
      except OSError:
        is_dir = False
      if is_dir:
        below.append((entry.path, relative))
      elif is_image_name(entry.name) and (entry.is_file() or not os.path.exists(entry.path)):
        yield relative
    pending.extend(reversed(below))  # the first by name on top


def holds_images(root: str) -> bool:
  """Whether any image file lies under `root` (`image_paths`); stops at the first one found."""
  return next(image_paths(root), None) is not None
