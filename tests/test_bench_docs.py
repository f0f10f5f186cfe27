"""Every `python -m robust_u1_jax.bench` command the README, the docs and the modules' docstrings
show is one the command takes: its flags parse, its benchmark uses each of them, and the configs
`aot` and `train_step` would compile validate with the overrides given (a documented `--seconds 0`
and a 4096-token override without its latent share had stopped at start-up)."""

import glob
import os
import re
import shlex

import pytest
from absl import flags
from absl.testing import flagsaver

from robust_u1_jax import bench, config_lib
from robust_u1_jax.benchmarks import aot, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = "python -m robust_u1_jax.bench"


def documented_commands() -> list[tuple[str, list[str]]]:
  """(where, arguments after the module) of every bench command in the project's text."""
  paths = [os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md")),
           *glob.glob(os.path.join(ROOT, "robust_u1_jax", "**", "*.py"), recursive=True),
           *glob.glob(os.path.join(ROOT, "configs", "*.py"))]
  found = []
  for path in sorted(paths):
    lines = open(path).read().splitlines()
    for n, line in enumerate(lines):
      start = line.find(PREFIX)
      if start < 0:
        continue
      where = f"{os.path.relpath(path, ROOT)}:{n + 1}"
      inline = line[start - 1:start] == "`"  # `python -m ...` within a sentence
      text = line[start + len(PREFIX):]
      if not re.match(r" [a-z_]+( |`|$)", text):  # a usage line, '<benchmark>'
        continue
      if inline:
        text = text.split("`")[0]
      else:
        while text.rstrip().endswith("\\") and n + 1 < len(lines):
          n += 1
          text = text.rstrip()[:-1] + " " + lines[n]
        text = text.split("#")[0]
      found.append((where, shlex.split(text)))
  return found


COMMANDS = documented_commands()


def test_the_docs_show_every_benchmark():
  shown = {args[0] for _, args in COMMANDS if args}
  assert shown >= set(bench.BENCHMARKS), set(bench.BENCHMARKS) - shown


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_is_taken(where, args, monkeypatch):
  monkeypatch.chdir(ROOT)  # the docs' config paths are the checkout's
  with flagsaver.flagsaver():
    try:
      rest = flags.FLAGS(["bench", *args])
      run, kwargs = bench.request(rest)
    finally:
      flags.FLAGS.unparse_flags()
  name = rest[1]
  if name == "aot":
    aot.load_config(kwargs.get("config") or aot.DEFAULT_CONFIG,
                    aot.parse_overrides(kwargs.get("overrides")))
  elif name == "train_step":
    _, fields = train_step.split_overrides(kwargs.get("overrides", ()))
    config_lib.load(kwargs.get("config") or train_step.DEFAULT_CONFIG, fields)
  assert callable(run), where
  assert all(re.fullmatch(r"[a-z_]+", k) for k in kwargs)
