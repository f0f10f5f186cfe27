"""host_malloc: which processes keep freed memory, and that they do."""

import os
import subprocess
import sys

import pytest

from robust_u1_jax import host_malloc

# Allocates a 64 MiB buffer in a thread of its own, as XLA:CPU's threads allocate a program's
# temporaries, frees it, and prints whether it came from the brk heap (below the program break)
# and whether freeing it lowered the break (gave the pages back to the kernel).
_WHERE = """
import ctypes, threading
from robust_u1_jax import host_malloc
kept = host_malloc.configure()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
libc.sbrk.argtypes = [ctypes.c_long]
out = []
def allocate():
  p = libc.malloc(64 * 2**20)
  ctypes.memset(p, 1, 64 * 2**20)
  top = libc.sbrk(0)
  libc.free(p)
  out.extend([p < top, libc.sbrk(0) < top])
t = threading.Thread(target=allocate)
t.start()
t.join()
print(kept, *out)
"""


def _run(code: str, **env_overrides) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.ENV)}
  env.update(env_overrides)
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        timeout=120)


@pytest.mark.parametrize("platforms, on_cpu", [("cpu", True), ("tpu", False), ("cuda", False),
                                               ("cpu,tpu", False), (" cpu ", True)])
def test_jax_platforms_decides(monkeypatch, platforms, on_cpu):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert host_malloc.runs_on_cpu() is on_cpu


def test_without_jax_platforms_a_device_file_decides(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  accel = tmp_path / "accel0"
  monkeypatch.setattr(host_malloc, "ACCELERATOR_FILES", (str(tmp_path / "accel*"),))
  assert host_malloc.runs_on_cpu()
  accel.write_text("")
  assert not host_malloc.runs_on_cpu()


@pytest.mark.skipif(not host_malloc._glibc(), reason="glibc's malloc only")
def test_kept_memory_comes_from_the_heap_and_stays_and_reaches_child_processes():
  kept = _run(_WHERE, ROBUST_U1_MALLOC="keep")
  default = _run(_WHERE, ROBUST_U1_MALLOC="glibc")
  assert kept.returncode == 0 and default.returncode == 0, kept.stderr + default.stderr
  # configured, in the heap, the break kept
  assert kept.stdout.split() == ["True", "True", "False"]
  # glibc's defaults: a block this large is its own mapping, unmapped when freed
  assert default.stdout.split() == ["False", "False", "False"]
  child = "import os; print(os.environ.get('GLIBC_TUNABLES'))"
  code = ("import subprocess, sys\nfrom robust_u1_jax import host_malloc\n"
          f"host_malloc.configure()\nsubprocess.run([sys.executable, '-c', {child!r}])")
  assert _run(code, ROBUST_U1_MALLOC="keep").stdout.strip() == host_malloc.TUNABLES


def test_your_own_malloc_tunables_win():
  out = _run("from robust_u1_jax import host_malloc; print(host_malloc.configure())",
             ROBUST_U1_MALLOC="keep", GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert out.stdout.strip() == "False"


def test_a_bad_choice_is_one_error_line():
  out = _run("from robust_u1_jax import cli", ROBUST_U1_MALLOC="yes")
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: ROBUST_U1_MALLOC='yes': choose one of auto, keep, glibc"]


@pytest.mark.slow
@pytest.mark.skipif(not host_malloc._glibc(), reason="glibc's malloc only")
def test_bench_malloc_times_both_sides_in_processes_of_their_own():
  out = subprocess.run([sys.executable, "-m", "robust_u1_jax.bench", "malloc", "--override",
                        "rounds=1", "--override", "steps=3"], capture_output=True, text=True,
                       timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()
          if line.split()[:1] in (["glibc"], ["keep"])}
  assert set(rows) == {"glibc", "keep"}
  (g_ms, g_faults, _), (k_ms, k_faults, _) = (map(float, rows[s]) for s in ("glibc", "keep"))
  assert g_ms > 0 and k_ms > 0
  # The kept side reuses the memory its warm-up steps faulted in.
  assert k_faults < g_faults
  assert "x; page faults" in out.stdout


def test_bench_malloc_refuses_a_config_and_unknown_options():
  from robust_u1_jax.benchmarks import malloc

  with pytest.raises(SystemExit, match="options are rounds, steps"):
    malloc.run(overrides=["steps=3", "batch=2"])
  with pytest.raises(SystemExit, match="an integer >= 1"):
    malloc.run(overrides=["rounds=two"])
