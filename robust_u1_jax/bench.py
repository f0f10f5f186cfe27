"""Benchmarks from the command line.

  python -m robust_u1_jax.bench data                 # a few seconds per measurement
  python -m robust_u1_jax.bench data --long          # 10x longer measurements
  python -m robust_u1_jax.bench data --config configs/sft.py:tiny --threads 2

Subcommands are listed in BENCHMARKS: each names a module of robust_u1_jax.benchmarks whose
`run(seconds=..., config=..., threads=...)` prints its tables.
"""

import importlib

from absl import app
from absl import flags

# name -> (module, one-line description).
BENCHMARKS = {
    "data": ("robust_u1_jax.benchmarks.data",
             "Grain pipeline samples/s; JAX corruptions vs PIL/scipy/numpy"),
    "model": ("robust_u1_jax.benchmarks.model",
              "tiny LLM forward+backward vs PyTorch; cached denoising step at context L and 2L"),
}

_SECONDS = flags.DEFINE_float("seconds", 3.0, "Wall time of each measurement.")
_LONG = flags.DEFINE_bool("long", False, "Measure 10x longer (steadier numbers).")
_CONFIG = flags.DEFINE_string("config", "", "Config file[:variant] (default: the benchmark's).")
_THREADS = flags.DEFINE_integer("threads", None, "Grain reader threads (default: automatic).")


def usage() -> str:
  lines = [f"  {name:8s} {description}" for name, (_, description) in BENCHMARKS.items()]
  return "usage: python -m robust_u1_jax.bench <benchmark> [flags]\nbenchmarks:\n" + "\n".join(
      lines)


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    given = " ".join(argv[1:]) or "nothing"
    raise app.UsageError(f"got {given}; choose one of {', '.join(BENCHMARKS)}\n{usage()}")
  module = importlib.import_module(BENCHMARKS[argv[1]][0])
  seconds = _SECONDS.value * (10 if _LONG.value else 1)
  module.run(seconds=seconds, config=_CONFIG.value, threads=_THREADS.value)


if __name__ == "__main__":
  app.run(main)
