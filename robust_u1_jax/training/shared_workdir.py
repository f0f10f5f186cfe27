"""With several processes, a run's workdir is one folder that all of them read and write.

Orbax writes a checkpoint from every process into one folder, and each process decides from that
folder whether its stage is finished and which step to resume from. A workdir on each host's own
disk (`--workdir /tmp/run` on a pod) lets them see different folders: process 0 alone would find
a finished stage and return while the others wait for it in their first collective, or the first
save would fail hours into the run. `check` finds that at start-up, in one error line on every
process, before anything is built.
"""

from __future__ import annotations

import contextlib
import os

import jax
import numpy as np

from robust_u1_jax import config_lib
from robust_u1_jax.data import multihost

MARKER = ".processes_share_this_folder"


def check(workdir: str) -> None:
  """Raises ConfigError on every process when process 0 cannot write a file into `workdir` or any
  process cannot read it. Leaves the folder as it found it (one it had to create is removed)."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils

  # A number drawn by process 0 for this run: a marker that a run before left on a host's own
  # disk does not pass for this one.
  token = str(multihost.process_values(int(np.random.default_rng().integers(1, 2**31 - 1)))[0])
  # The token in the name too: a network filesystem's cache of an earlier run's file (gcsfuse
  # keeps an object's type for a minute) cannot stand in for this one.
  marker = os.path.join(workdir, f"{MARKER}.{token}")
  created, unwritable = [], None  # the folders process 0 made, deepest first; why it could not
  if jax.process_index() == 0:
    path = folder = os.path.abspath(workdir)  # 'a/../b' makes no 'a'
    while not os.path.exists(folder):
      created.append(folder)
      folder = os.path.dirname(folder)
    try:
      os.makedirs(path, exist_ok=True)
      with open(marker, "w") as f:
        f.write(token)
    except OSError as e:  # told on every process below: raised here, the others would wait
      unwritable = e.strerror or str(e)
  multihost_utils.sync_global_devices("shared_workdir: marker written")
  try:
    with open(marker) as f:
      seen = f.read() == token
  except OSError:
    seen = False
  seen_by = multihost.process_values(int(seen))  # after every read: process 0 may clean up
  if jax.process_index() == 0:
    with contextlib.suppress(OSError):
      os.remove(marker)
    for folder in created:
      with contextlib.suppress(OSError):
        os.rmdir(folder)
  multihost_utils.sync_global_devices("shared_workdir: marker removed")
  where = f"--workdir {workdir}" + ("" if os.path.isabs(workdir) else
                                     f" ({os.path.abspath(workdir)} here)")
  if not seen_by[0]:
    raise config_lib.ConfigError(
        f"{where}: process 0 cannot write there ({unwritable or 'see its log'})")
  blind = [str(i) for i, ok in enumerate(seen_by) if not ok]
  if blind:
    raise config_lib.ConfigError(
        f"{where}: process(es) {', '.join(blind)} of {len(seen_by)} cannot see the file process "
        "0 wrote there; with several processes the workdir must be one folder that every host "
        "shares (NFS, or a bucket mounted with gcsfuse), at one path (a relative one resolves "
        "from each process's folder), not each host's own disk")
