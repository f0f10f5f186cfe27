"""Where data-side corruption runs.

A numpy image (a record of the data path) is corrupted on this process's host CPU, whatever the
default backend: a TPU host must not send every record to the chip and back. Its programs run
outside any mesh the caller has set (`jax.set_mesh`, as a trainer, the recovery cache or an
engine does): jit checks its arguments against the mesh in context, and refuses an image on one
host device when that mesh spans the accelerators, or several CPU devices. A record's corruption
can run inside such a context: a bad record's replacement is made in whatever thread draws the
batch (`bad_records.ReplaceBadRecords`). A jax array is corrupted where it lives, mesh and all.
"""

import contextlib

import jax
import numpy as np


def data_device() -> jax.Device:
  """The host CPU device data-side corruption runs on."""
  # This process's own: in a multi-process run jax.devices() lists every process's devices.
  return jax.local_devices(backend="cpu")[0]


def of(images) -> jax.Device | None:
  """The device `images` are corrupted on: numpy on the host CPU; None (in place) for jax."""
  return data_device() if isinstance(images, np.ndarray) else None


@contextlib.contextmanager
def running_on(device: jax.Device | None):
  """Runs the programs (and makes the keys) of its body on `device`, outside the caller's mesh;
  None leaves both as they are."""
  if device is None:
    yield
    return
  with jax.set_mesh(None), jax.default_device(device):
    yield
