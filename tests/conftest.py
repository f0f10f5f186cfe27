"""Test-wide setup: 8 fake CPU devices so sharding tests run on any machine; compiled programs
shared through a persistent cache and released when a process holds too many (below).

Markers (pytest.ini): `torch_ref` for comparisons with PyTorch reference implementations, `slow`
for tests of tens of seconds or more; the README's command runs them all.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Everything must work offline: no hub lookups from transformers/diffusers in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Compiled programs are shared between test processes and runs: the tiny model's steps compile
# once per machine instead of once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "robust_u1_jax_jit_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# XLA:CPU's concurrency-optimised scheduler lets one program's independent all-reduces start in a
# different order on each fake device; with 8 devices on 2 cores they then wait on each other
# until the rendezvous times out and aborts the process (about half the runs of
# test_sft_trains_on_packed_images_of_many_sizes; none of 6 with it off). Subprocesses inherit it,
# but the two-process runs drop it (tests/test_multihost_processes.py says why).
os.environ["XLA_FLAGS"] = " ".join(filter(None, (
    os.environ.get("XLA_FLAGS", ""), "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    # Most of a test's time is XLA:CPU compiling the tiny model's programs, and they run on
    # inputs too small for LLVM's optimisations to pay for themselves: level 0 took the suite
    # from 53 to 27-39 minutes on a 2-core AMD machine, every test still passing. Every
    # subprocess keeps it, the two-process runs included.
    "--xla_backend_optimization_level=0")))

# After the environment above (importing jax reads it); importing starts no backend.
import chex

# chex sets the XLA flag for fake CPU devices; a device count already in XLA_FLAGS is kept. It is
# an environment variable, so the commands tests run in subprocesses see the same devices.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  chex.set_n_cpu_devices(8)


# -- shared helpers: a tiny random BAGEL and comparisons of its parameters -------------------------
# Test modules get these through the fixtures below, never by importing one another.

# The project's modules are imported inside the helpers, so that importing conftest starts no
# backend and loads no model code.
import numpy as np
import pytest

from robust_u1_jax import host_malloc

# Before jax starts its threads: XLA:CPU's temporaries stay in the process between runs. It also
# goes into the environment, so pytest-xdist's workers and every command a test runs start with it.
host_malloc.configure()

# Linux caps a process at vm.max_map_count memory mappings (65,530 by default). XLA:CPU maps each
# compiled kernel's code, data and constants separately, three mappings a kernel, and JAX keeps
# every program it compiled for the life of the process: test_inference.py alone left 27,000
# mappings in its process. A pytest-xdist worker that ran half the suite reached the cap, the
# next program could not be mapped, and the worker died of a segmentation fault in the error's
# unwinding (the intermittent "worker crashed" of test_remat_keeps_values_and_gradients, seen in
# CI). So when a module ends with its process past a quarter of the cap, JAX's caches are cleared
# (clearing them after every module made the suite recompile for minutes); if the process is still
# past half of it, something holds its programs, and the module fails by name instead of a later
# one crashing.
MAX_MAPPINGS_FILE = "/proc/sys/vm/max_map_count"
RELEASE_SHARE, FAIL_SHARE = 0.25, 0.5


def _mappings() -> tuple[int, int] | None:
  """(this process's memory mappings, the kernel's cap), where Linux says."""
  try:
    with open("/proc/self/maps", "rb") as f:
      count = sum(1 for _ in f)
    with open(MAX_MAPPINGS_FILE) as f:
      return count, int(f.read())
  except (OSError, ValueError):
    return None


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs(request):
  yield
  mappings = _mappings()
  if mappings is None or mappings[0] <= RELEASE_SHARE * mappings[1]:
    return
  import gc

  import jax

  jax.clear_caches()
  gc.collect()  # the programs reference cycles still held
  count, cap = _mappings()
  if count > FAIL_SHARE * cap:
    pytest.fail(f"after {request.module.__name__}, with JAX's caches cleared, its process still "
                f"holds {count} memory mappings, over {FAIL_SHARE:.0%} of the cap of {cap} "
                f"({MAX_MAPPINGS_FILE}): compiled programs held past their module's end (a "
                "global, a cache) would crash a later module", pytrace=False)


def _random_bagel(config, seed: int = 0):
  """A Bagel with every parameter random (norm scales near 1, llm2vae nonzero), built without
  running the initialisers (numpy draws are much faster than compiling them on CPU)."""
  import jax.numpy as jnp
  from flax import nnx

  from robust_u1_jax.checkpoints import loader
  from robust_u1_jax.models import bagel

  model = nnx.eval_shape(lambda: bagel.Bagel(config, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for path, variable in loader.param_variables(model).items():
    shape, dtype = variable.shape, variable.dtype
    # Stacked layers (leading layer axis): each layer drawn as an unstacked parameter would be.
    one = shape[1:] if loader.is_stacked(variable) else shape
    if path.endswith("scale"):
      x = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(one) == 1 or path.endswith("embedding"):
      x = (0.1 if len(one) == 1 else 1.0) * rng.standard_normal(shape)
    else:
      x = rng.standard_normal(shape) / np.sqrt(np.prod(one[:-1]))
    variable.set_value(jnp.asarray(x.astype(np.float32), dtype))
  return model


def _bagel_params(model) -> dict[str, np.ndarray]:
  """{state path: host array} of every parameter."""
  import jax

  from robust_u1_jax.checkpoints import loader

  return {p: np.asarray(jax.device_get(v.get_value()))
          for p, v in loader.param_variables(model).items()}


def _assert_same_params(a, b):
  pa, pb = _bagel_params(a), _bagel_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype, k
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  from robust_u1_jax.checkpoints import tensor_files

  files = tensor_files.open_tensor_files(path)
  return {k: files.load(k) for k in files.keys()}


@pytest.fixture(scope="session")
def random_bagel():
  """random_bagel(config, seed=0) -> a Bagel with random parameters (see `_random_bagel`)."""
  return _random_bagel


@pytest.fixture(scope="session")
def bagel_params():
  """bagel_params(model) -> {state path: numpy array} of every parameter."""
  return _bagel_params


@pytest.fixture(scope="session")
def assert_same_params():
  """assert_same_params(a, b): same parameter paths, dtypes and bits."""
  return _assert_same_params


@pytest.fixture(scope="session")
def read_tensors():
  """read_tensors(path) -> {key: numpy array} of a tensor file."""
  return _read_tensors
