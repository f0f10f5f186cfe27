"""Benchmarks from the command line.

  python -m robust_u1_jax.bench data                 # a few seconds per measurement
  python -m robust_u1_jax.bench data --long          # 10x longer measurements
  python -m robust_u1_jax.bench data --config configs/sft.py:tiny --threads 2
  python -m robust_u1_jax.bench corrupt              # JAX corruptions vs host references
  python -m robust_u1_jax.bench model                # tiny LLM step vs PyTorch; cached denoising
  python -m robust_u1_jax.bench experts              # routed experts vs both on every token
  python -m robust_u1_jax.bench aot --config configs/sft.py:bagel_7b --topology v5p-64
  python -m robust_u1_jax.bench recover --topology v5p-8
  python -m robust_u1_jax.bench train_step --config configs/sft.py:gpu_1p5b   # one H200
  python -m robust_u1_jax.bench malloc               # XLA:CPU steps: glibc's malloc vs kept memory

Subcommands are listed in BENCHMARKS: each names a module of robust_u1_jax.benchmarks whose
`run(**flags)` prints its tables. It takes, by keyword, the flags it uses (seconds, config,
threads, topology, hbm_gib, overrides) and gets those given on the command line; a flag it does not
take is refused, not silently dropped.
"""

from robust_u1_jax import cli  # first: its quiet environment is set before jax loads

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from absl import app
from absl import flags

# name -> (module, one-line description).
BENCHMARKS = {
    "data": ("robust_u1_jax.benchmarks.data",
             "Grain pipeline samples/s, corrupted vs clean; Robust-R1 degradations per image"),
    "corrupt": ("robust_u1_jax.benchmarks.corrupt",
                "each ImageNet-C corruption on 32 x 224^2 images: JAX vs NumPy/SciPy/PIL"),
    "model": ("robust_u1_jax.benchmarks.model",
              "tiny LLM forward+backward vs PyTorch; cached denoising step at context L and 2L"),
    "experts": ("robust_u1_jax.benchmarks.experts",
                "MoT forward+backward on mixed packed rows: each token's expert vs both experts"),
    "aot": ("robust_u1_jax.benchmarks.aot",
            "compile a stage's train step ahead of time for a TPU topology: memory, FLOPs, fits?"),
    "recover": ("robust_u1_jax.benchmarks.recover",
                "recovery: cached vs uncached step, context 2k->4k, batched CFG, compile; "
                "7B AOT with --topology"),
    "train_step": ("robust_u1_jax.benchmarks.train_step",
                   "the SFT step on one device (step time, tokens/s, model-FLOPs MFU, memory) "
                   "and a 50-step recovery"),
    "malloc": ("robust_u1_jax.benchmarks.malloc",
               "the demo's base step on CPU: glibc's malloc vs malloc keeping freed memory"),
}

_SECONDS = flags.DEFINE_float("seconds", 3.0, "Wall time of each measurement.",
                              lower_bound=1e-3)
_LONG = flags.DEFINE_bool("long", False, "Measure 10x longer (steadier numbers).")
_CONFIG = flags.DEFINE_string("config", "", "Config file[:variant] (default: the benchmark's).")
_THREADS = flags.DEFINE_integer("threads", None, "Grain reader threads (default: automatic).",
                                lower_bound=0)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "aot (default cpu:8), recover (default: no 7B compile): TPU slice (v5p-64, "
    "v6e-256), libtpu topology (v5p:2x4x4) or cpu:N.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "aot: per-device memory limit in GiB (default: "
                              "the chip's HBM).", lower_bound=1e-3)
_OVERRIDE = flags.DEFINE_multi_string("override", [], "aot, train_step: config override "
                                      "field.path=value; recover, train_step, malloc: the "
                                      "benchmark's own options, e.g. steps=N (repeatable).")


def usage() -> str:
  lines = [f"  {name:10s} {description}" for name, (_, description) in BENCHMARKS.items()]
  return "usage: python -m robust_u1_jax.bench <benchmark> [flags]\nbenchmarks:\n" + "\n".join(
      lines)


NOT_FIT = 1  # `aot`'s exit status when the step does not fit the devices' memory


def request(argv) -> tuple[Callable[..., Any], dict[str, Any]]:
  """The benchmark's `run` and the keyword arguments the parsed flags give it; UsageError for an
  unknown benchmark or a flag it does not take."""
  if len(argv) != 2 or argv[1] not in BENCHMARKS:
    given = " ".join(argv[1:]) or "nothing"
    raise app.UsageError(f"got {given}; choose one of {', '.join(BENCHMARKS)}\n{usage()}")
  module = importlib.import_module(BENCHMARKS[argv[1]][0])
  accepted = inspect.signature(module.run).parameters
  kwargs = {}
  for name, flag in (("seconds", _SECONDS), ("seconds", _LONG), ("config", _CONFIG),
                     ("threads", _THREADS), ("topology", _TOPOLOGY), ("hbm_gib", _HBM_GIB),
                     ("overrides", _OVERRIDE)):
    if name not in accepted:
      if flag.present:  # a flag this benchmark would silently not use
        raise app.UsageError(f"--{flag.name}: not used by `bench {argv[1]}`")
    elif name == "seconds":
      kwargs[name] = _SECONDS.value * (10 if _LONG.value else 1)
    elif flag.present:  # else the benchmark's own default
      kwargs[name] = flag.value
  return module.run, kwargs


def main(argv) -> int:
  run, kwargs = request(argv)
  result = run(**kwargs)
  return NOT_FIT if isinstance(result, dict) and result.get("fits") is False else 0


if __name__ == "__main__":
  cli.run(main)  # a bad config or topology: one `error:` line, exit status 2
