"""Where the project keeps what it builds once per machine and reuses: `$ROBUST_U1_CACHE`, else
`~/.cache/robust_u1_jax`. Imports nothing heavy, so `cli` sets it up before any compile."""

import os
import pathlib

ENV = "ROBUST_U1_CACHE"


def root() -> pathlib.Path:
  """$ROBUST_U1_CACHE, else ~/.cache/robust_u1_jax."""
  env = os.environ.get(ENV)
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "robust_u1_jax"


def compiled_programs() -> str:
  """JAX's persistent compilation cache for the entry modules: a second `recover` of one model
  skips its compiles (14 s, then 8 to 9 s on a 2-core CPU with the demo's model, 2026-12-03)."""
  return str(root() / "jit")
