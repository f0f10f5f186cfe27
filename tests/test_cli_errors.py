"""Every entry module answers a bad input with one `error:` line naming the file, field or flag,
exit status 2 and no traceback (robust_u1_jax/cli.py), before any model is built or compiled.

The table runs each bad input against its entry module in a subprocess, as a user would. Each
case fails in the command's checks, so a case costs an import of the module (a few seconds), never
a compile. The helpers of cli.py are tested in process below.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

from absl import app
import numpy as np
from PIL import Image
import pytest

from robust_u1_jax import cli, config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT = os.path.join(ROOT, "configs", "sft.py") + ":tiny"
REASON = os.path.join(ROOT, "configs", "reason.py") + ":tiny"
EVAL = os.path.join(ROOT, "configs", "eval.py") + ":tiny"
ENTRY_MODULES = ("train", "corrupt", "convert", "recover", "answer", "evaluate", "bench",
                 "data.preview")


def _unwritable(root) -> str | None:
  """A folder nobody may create files in: a read-only one, or /sys for root (whom permission bits
  do not stop); None when neither works here."""
  folder = root / "read_only"
  folder.mkdir(exist_ok=True)
  folder.chmod(0o555)
  for candidate in (str(folder), "/sys"):
    try:
      with open(os.path.join(candidate, ".probe"), "w"):
        pass
      os.remove(os.path.join(candidate, ".probe"))
    except OSError:
      return candidate
  return None


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("bad_inputs")
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(root / "good.png")
  whole = (root / "good.png").read_bytes()
  (root / "truncated.png").write_bytes(whole[:len(whole) // 2])
  (root / "notes.txt").write_text("not an image\n")
  (root / "notes.parquet").write_text("not a parquet file\n")
  Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(root / "tiny.png")
  (root / "a_file").write_text("a file where a folder belongs\n")
  # A stage's workdir, for its model/: it looks like an Orbax model checkpoint, and the cases
  # using it stop before it would be read.
  (root / "workdir" / "model" / "params").mkdir(parents=True)
  (root / "workdir" / "model" / "bagel_config.json").write_text("{}\n")
  (root / "unfinished" / "checkpoints" / "12").mkdir(parents=True)  # stopped before its model
  (root / "existing").mkdir()
  # Another evaluation's report, and a stopped one's kept units (their stamps not this run's).
  (root / "reported").mkdir()
  (root / "reported" / "report.md").write_text("# an earlier evaluation\n")
  (root / "reported" / "report.json").write_text('{"settings": {"stamp": "another"}}\n')
  # An evaluation's report from before reports were stamped.
  (root / "unstamped").mkdir()
  (root / "unstamped" / "report.md").write_text("# an earlier evaluation\n")
  (root / "unstamped" / "report.json").write_text('{"settings": {"model": "m"}}\n')
  (root / "stopped" / "partial").mkdir(parents=True)
  (root / "stopped" / "partial" / "fingerprint.json").write_text('{"stamp": "another"}\n')
  (root / "stopped" / "partial" / "fog_s3.npz").write_bytes(b"a kept unit")
  return {"root": str(root), "good": str(root / "good.png"),
          "truncated": str(root / "truncated.png"), "notes": str(root / "notes.txt"),
          "tiny": str(root / "tiny.png"), "file": str(root / "a_file"),
          "missing": str(root / "missing"), "workdir": str(root / "workdir"),
          "existing": str(root / "existing"), "ro": _unwritable(root)}


CORRUPT = ("--type=fog", "--severity=3")
CASES = {
    # corrupt: the input image, the corruption, --out
    "corrupt/missing image": ("corrupt", ["--image={missing}.png", *CORRUPT, "--out={root}/o.png"],
                              ["{missing}.png", "No such file"]),
    "corrupt/truncated image": ("corrupt", ["--image={truncated}", *CORRUPT, "--out={root}/o.png"],
                                ["{truncated}", "cannot decode"]),
    "corrupt/not an image": ("corrupt", ["--image={notes}", *CORRUPT, "--out={root}/o.png"],
                             ["{notes}", "not an image"]),
    "corrupt/1x1 image": ("corrupt", ["--image={tiny}", *CORRUPT, "--out={root}/o.png"],
                          ["{tiny}", "1 x 1 pixels", "smallest usable 16"]),
    "corrupt/--out a read-only folder": ("corrupt", ["--image={good}", *CORRUPT, "--out={ro}"],
                                         ["--out {ro}/good_fog_s3.png", "cannot"]),
    # Written over its input, the image was lost (a folder --out was refused; a file was not).
    "corrupt/--out the input": ("corrupt", ["--image={good}", *CORRUPT, "--out={good}"],
                                ["--out {good}: the input itself"]),
    "recover/--out the input": ("recover", ["--model={workdir}", "--image={good}",
                                            "--out={root}/./good.png"],  # another spelling
                                ["--out {root}/./good.png: the input itself"]),
    "corrupt/--out extension": ("corrupt", ["--image={good}", *CORRUPT, "--out={root}/o.xyz"],
                                ["--out {root}/o.xyz", "unknown image extension '.xyz'"]),
    "corrupt/--out read-only": ("corrupt", ["--image={good}", *CORRUPT, "--out={ro}/o.png"],
                                ["--out {ro}/o.png", "cannot"]),
    "corrupt/unknown corruption": ("corrupt", ["--image={good}", "--type=fogg", "--severity=1",
                                               "--out={root}/o.png"],
                                   ["--type fogg", "did you mean fog"]),
    "corrupt/severity 9": ("corrupt", ["--image={good}", "--type=fog", "--severity=9",
                                       "--out={root}/o.png"], ["severity 9", "1, 2, 3, 4, 5"]),
    "corrupt/flag type": ("corrupt", ["--image={good}", "--type=fog", "--severity=high",
                                      "--out={root}/o.png"], ["--severity=high"]),
    "corrupt/missing flag": ("corrupt", ["--image={good}", "--out={root}/o.png"],
                             ["missing --type"]),
    "corrupt/a flag turned off the GNU way": ("corrupt", ["--image={good}", *CORRUPT,
                                                          "--no-list"],
                                              ["unknown flag --no-list", "with --nolist"]),
    "corrupt/a misspelt flag": ("corrupt", ["--image={good}", *CORRUPT, "--severty=2"],
                                ["unknown flag --severty; did you mean --severity?"]),
    # train: the config file, its fields and values, the paths it names, the workdir
    "train/no config file": ("train", ["--config=configs/nope.py:tiny", "--workdir={root}/w"],
                             ["--config configs/nope.py:tiny", "no such config file",
                              "sft.py"]),
    "train/unknown variant": ("train", [f"--config={SFT[:-5]}:huge", "--workdir={root}/w"],
                              # the file named once, by the flag's value
                              [f"{SFT[:-5]}:huge: unknown variant 'huge'", "tiny, bagel_7b"]),
    "train/unknown field": ("train", [f"--config={SFT}", "--config.foo=1", "--workdir={root}/w"],
                            ["--config.foo", "no field foo", "total_steps"]),
    "train/misspelt field": ("train", [f"--config={SFT}", "--config.data.batchsize=2",
                                       "--workdir={root}/w"],
                             ["--config.data.batchsize", "did you mean data.batch_size"]),
    "train/wrong type": ("train", [f"--config={SFT}", "--config.data.batch_size=many",
                                   "--workdir={root}/w"],
                         ["--config.data.batch_size=many: data.batch_size takes an integer "
                          "(the config has 8)\n"]),
    # A section given a value: its fields are named, not its whole repr over dozens of lines.
    "train/section as a value": ("train", [f"--config={SFT}", "--config.data=3",
                                           "--workdir={root}/w"],
                                 ["--config.data=3", "a section", "e.g. --config.data.batch_size"]),
    "train/total_steps=-5": ("train", [f"--config={SFT}", "--config.total_steps=-5",
                                       "--workdir={root}/w"], ["total_steps", "-5", "positive"]),
    "train/severity 9": ("train", [f"--config={SFT}", "--config.data.severity=9",
                                   "--workdir={root}/w"], ["data.severity", "1..5"]),
    "train/unknown corruption": ("train", [f"--config={SFT}", "--config.data.corruption=rain",
                                           "--workdir={root}/w"], ["data.corruption", "'rain'"]),
    "train/workdir a file": ("train", [f"--config={SFT}", "--workdir={file}"],
                             ["--workdir {file}", "a file, not a folder"]),
    "train/workdir read-only": ("train", [f"--config={SFT}", "--workdir={ro}/w"],
                                ["--workdir {ro}/w", "cannot"]),
    "train/init_from missing": ("train", [f"--config={SFT}", "--config.init_from={missing}",
                                          "--workdir={root}/w"], ["init_from", "{missing}"]),
    # --config.data.path alone: eval_data is a copy made when the config was built.
    "train/7B RL eval_data": ("train", [f"--config={ROOT}/configs/rl.py:bagel_7b",
                                        "--config.init_from={workdir}",
                                        "--config.data.path={root}/pairs.jsonl",
                                        "--workdir={root}/w"],
                              ["eval_data.path = ''", "give --config.eval_data.path"]),
    "train/init_from no model": ("train", [f"--config={SFT}", "--config.init_from={existing}",
                                           "--workdir={root}/w"],
                                 ["config field init_from = '{existing}' is neither 'random' nor "
                                  "the workdir", "{existing} is neither a BAGEL model"]),
    "train/data folder missing": ("train", [f"--config={SFT}", "--config.data.source=folder",
                                            "--config.data.path={missing}",
                                            "--workdir={root}/w"],
                                  ["data.path", "{missing}", "no such folder"]),
    "train/no --workdir": ("train", [f"--config={SFT}"], ["--workdir"]),
    # recover: the cache mode's config and cache folder, the user mode's model, image and --out
    "recover/cache dir a file": ("recover", [f"--config={REASON}", "--config.init_from=random",
                                             "--cache_dir={file}"],
                                 ["--cache_dir {file}", "a file, not a folder"]),
    "recover/cache dir read-only": ("recover", [f"--config={REASON}", "--config.init_from=random",
                                                "--cache_dir={ro}/cache"],
                                    ["--cache_dir {ro}/cache", "cannot"]),
    "recover/init_from missing": ("recover", [f"--config={REASON}",
                                              "--config.init_from={missing}",
                                              "--cache_dir={root}/cache"],
                                  ["init_from", "{missing}"]),
    "recover/model missing": ("recover", ["--model={missing}", "--image={good}"],
                              ["--model {missing}", "no such model directory"]),
    "recover/image missing": ("recover", ["--model={workdir}", "--image={missing}.png"],
                              ["{missing}.png", "No such file"]),
    "recover/1x1 image": ("recover", ["--model={workdir}", "--image={tiny}"],
                          ["{tiny}", "1 x 1 pixels"]),
    "recover/--sde few steps": ("recover", ["--model={workdir}", "--image={good}", "--sde",
                                            "--steps=3"], ["--sde --steps 3", "--steps >= 5"]),
    # A huge count was an out-of-memory blamed on the inputs, or a traceback.
    "recover/--steps huge": ("recover", ["--model={workdir}", "--image={good}",
                                         "--steps=1000000000000"],
                             ["--steps 1000000000000: at most 10000 (the release samples 50)"]),
    "recover/--out extension": ("recover", ["--model={workdir}", "--image={good}",
                                            "--out={root}/r.xyz"], ["--out {root}/r.xyz"]),
    # answer
    "answer/not an image": ("answer", ["--model={workdir}", "--image={notes}", "--question=q"],
                            ["{notes}", "not an image"]),
    # 27 crashed on the 27th letter, after the model loaded.
    "answer/27 options": ("answer", ["--model={workdir}", "--image={good}", "--question=q",
                                     *[f"--options=o{i}" for i in range(27)]],
                          ["--options: 27 options; at most 26"]),
    # Lettered anew, the second would have read 'B. A. dog'.
    "answer/one letter twice": ("answer", ["--model={workdir}", "--image={good}", "--question=q",
                                           "--options=A. cat", "--options=a) dog"],
                                ["--options: 'A. cat' and 'a) dog' carry the same letter A"]),
    # Some lettered, some not: 'cyan', 'A. red' were asked as 'A. cyan', 'B. A. red'.
    "answer/some options lettered": ("answer", ["--model={workdir}", "--image={good}",
                                                "--question=q", "--options=cyan",
                                                "--options=A. red"],
                                     ["--options: 'A. red' carries a letter and 'cyan' none"]),
    "answer/--out a file": ("answer", ["--model={workdir}", "--image={good}", "--question=q",
                                       "--out={file}"], ["--out {file}", "a file, not a folder"]),
    # It made a folder of that name.
    "answer/--out an image name": ("answer", ["--model={workdir}", "--image={good}",
                                              "--question=q", "--out={root}/answer.png"],
                                   ["--out {root}/answer.png: an image file's name, but it is "
                                    "the folder of the step images and exchange.json; give a "
                                    "folder, e.g. {root}/answer"]),
    # convert
    "convert/workdir as --src": ("convert", ["--to=hf", "--src={workdir}", "--dst={root}/hf"],
                                 ["--src {workdir}", "{workdir}/model"]),
    "convert/--src missing": ("convert", ["--from=hf", "--src={missing}", "--dst={root}/o"],
                              ["--src {missing}", "no such folder"]),
    # It printed the missing tokenizer's note, then the line.
    "convert/--src no model": ("convert", ["--from=hf", "--src={existing}", "--dst={root}/o"],
                               ["--src {existing} is neither a BAGEL model directory"]),
    "convert/--src a checkpoint": ("convert", ["--to=hf", "--src={root}/unfinished/checkpoints",
                                               "--dst={root}/o"],
                                   ["a stage's training checkpoint: the stage's model is "
                                    "{root}/unfinished/model once its run has finished"]),
    "convert/--dst exists": ("convert", ["--to=hf", "--src={workdir}/model",
                                         "--dst={existing}"],
                             ["--dst {existing}", "already exists", "--overwrite"]),
    # evaluate
    "evaluate/unfinished workdir": ("evaluate", [f"--config={EVAL}", "--model={root}/unfinished"],
                                    ["{root}/unfinished is a stage's workdir without its model/",
                                     "stopped at step 12"]),
    # The demo's workdir, a folder of stages' workdirs, was told only what a model holds.
    # A file as init_from is no model; listing the workdirs a folder holds must not fail on it.
    "train/init_from a file": ("train", [f"--config={SFT}", "--workdir={root}/w",
                                         "--config.init_from={file}"],
                               ["init_from", "{file}"]),
    "recover/folder of workdirs": ("recover", ["--model={root}", "--image={good}"],
                                   ["{root} is neither a BAGEL model directory",
                                    "it holds stages' workdirs (workdir): give one, e.g. "
                                    "{root}/workdir"]),
    # The demo's eval/ beside its stages was told only what a model holds.
    "recover/an evaluation's folder": ("recover", ["--model={root}/unstamped", "--image={good}"],
                                       ["{root}/unstamped is an evaluation's output "
                                        "(report.json), not a model; the model it evaluated is "
                                        "m"]),
    "recover/unfinished workdir": ("recover", ["--model={root}/unfinished", "--image={good}"],
                                   ["{root}/unfinished is a stage's workdir without its model/"]),
    # A later stage started from an earlier one that was stopped (a chain that ignores its 130).
    "train/init_from unfinished": ("train", [f"--config={SFT}", "--workdir={root}/w",
                                             "--config.init_from={root}/unfinished"],
                                   ["init_from = '{root}/unfinished': {root}/unfinished is a "
                                    "stage's workdir without its model/ yet: its run stopped at "
                                    "step 12, before its last step; run its training command"]),
    # Said at start: the report would otherwise come out without its reward curves.
    "evaluate/rl_workdir not RL's": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                                  "--config.rl_workdir={workdir}"],
                                     ["rl_workdir {workdir}: no RL rewards logged"]),
    "evaluate/model missing": ("evaluate", [f"--config={EVAL}", "--model={missing}"],
                               ["--model {missing}", "no such model directory"]),
    "evaluate/clip missing": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                           "--config.clip_checkpoint={missing}.safetensors"],
                              ["clip_checkpoint", "{missing}.safetensors"]),
    # The README's command on the demo's models wrote its report over the demo's.
    "evaluate/another evaluation's report": (
        "evaluate", [f"--config={EVAL}", "--model={workdir}", "--out={root}/reported"],
        ["--out {root}/reported: holds the report of another evaluation", "--overwrite"]),
    "evaluate/an unstamped report": (
        "evaluate", [f"--config={EVAL}", "--model={workdir}", "--out={root}/unstamped"],
        ["--out {root}/unstamped: holds the report of another evaluation", "--overwrite"]),
    "evaluate/a stopped evaluation's units": (
        "evaluate", [f"--config={EVAL}", "--model={workdir}", "--out={root}/stopped"],
        ["--out {root}/stopped: holds the units another, stopped evaluation kept"]),
    # A model to compare with was found only once the main model had loaded (minutes for 7B),
    # its report folder made.
    "evaluate/compare not a model": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                                  "--config.compare.sft={root}/unfinished",
                                                  "--out={root}/compared"],
                                     ["config field compare.sft: {root}/unfinished is a stage's "
                                      "workdir without its model/"]),
    # Past that check with --overwrite, to the model's own error.
    "evaluate/--overwrite": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                          "--out={root}/reported", "--overwrite"],
                             ["{workdir}/model: missing tokenizer.json"]),
    "evaluate/--out a file": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                           "--out={file}"], ["--out {file}", "a file"]),
    # The README's benchmark flag is a field of the config (its table missing here)
    "evaluate/benchmark missing": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                                "--config.benchmarks.rbench={missing}.tsv"],
                                   ["benchmarks.rbench", "{missing}.tsv", "no such file"]),
    # A file of no table's extension was read as a TSV: "has a header but no rows".
    "evaluate/benchmark extension": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                                  "--config.benchmarks.rbench={notes}"],
                                     ["benchmarks.rbench", "a .txt file; give a VQA .tsv, .csv "
                                      "or .parquet table, a folder of .parquet shards or a "
                                      "pattern of them (data/test-*.parquet)"]),
    "evaluate/benchmark folder": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                               "--config.benchmarks.mmstar={existing}"],
                                  ["benchmarks.mmstar", "a folder without .parquet files"]),
    "evaluate/benchmark not parquet": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                                    "--config.benchmarks.mmstar={root}/notes."
                                                    "parquet"],
                                       ["{root}/notes.parquet", "not a readable parquet file"]),
    "evaluate/corruption name": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                              "--config.imagenet_c_types=('gaussian_nois',)"],
                                 ["imagenet_c_types", "gaussian_nois", "gaussian_noise"]),
    "evaluate/severities": ("evaluate", [f"--config={EVAL}", "--model={workdir}",
                                         "--config.severities=(9,)"], ["severities", "1..5"]),
    # bench
    "bench/unknown benchmark": ("bench", ["nope"], ["got nope", "choose one of data"]),
    "bench/aot topology": ("bench", ["aot", "--topology=v9x-3"], ["--topology 'v9x-3'"]),
    "bench/aot memory": ("bench", ["aot", "--hbm_gib=-1"], ["--hbm_gib", "-1"]),
    "bench/unknown variant": ("bench", ["data", f"--config={SFT[:-len(':tiny')]}:nosuch"],
                              ["unknown variant 'nosuch'", "tiny"]),
    "bench/recover topology": ("bench", ["recover", "--topology=cpu:abc"],
                               ["--topology 'cpu:abc'", "cpu:N"]),
    "bench/threads": ("bench", ["data", "--threads=-3"], ["--threads", "-3"]),
    # Refused before parts a to d, minutes of CPU work (test_bench_recover_checks_its_topology_...)
    "bench/recover TPU topology": ("bench", ["recover", "--topology=v9x-3"],
                                   ["recover: --topology 'v9x-3'"]),
    "bench/aot override type": ("bench", ["aot", "--override=data.token_budget=abc"],
                                ["data.token_budget='abc'", "takes an integer"]),
    "bench/aot cpu:0": ("bench", ["aot", "--topology=cpu:0"], ["--topology 'cpu:0'", ">= 1"]),
    # bench sets config fields with --override: the flag train takes points there.
    "bench/a config field as train gives it": (
        "bench", ["aot", "--config.data.batch_size=4"],
        ["unknown flag --config.data.batch_size; a config field here is --override "
         "data.batch_size"]),
    "bench/aot mesh": ("bench", ["aot", f"--config={SFT}", "--topology=cpu:8",
                                 "--override=mesh.tensor=3"],
                       ["not divisible by the fixed axes", "set --override mesh.<axis>"]),
    "bench/aot no topology": ("bench", ["aot", "--topology="], ["--topology ''"]),
    "bench/no seconds": ("bench", ["data", "--seconds=0"], ["--seconds"]),
    "bench/a flag it does not use": ("bench", ["data", "--topology=v5p-8"],
                                     ["--topology: not used by `bench data`"]),
    # aot compiles (no timed measurement); malloc's length is its step count.
    "bench/aot seconds": ("bench", ["aot", "--seconds=5"], ["--seconds: not used by `bench aot`"]),
    "bench/aot long": ("bench", ["aot", "--long"], ["--long: not used by `bench aot`"]),
    "bench/malloc threads": ("bench", ["malloc", "--threads=2"],
                             ["--threads: not used by `bench malloc`"]),
    # The 7B recovery's options shape part e, which runs with --topology only.
    "bench/recover options without topology": ("bench", ["recover", "--override=steps=3"],
                                               ["--override steps", "give --topology too"]),
    "bench/recover missing model": ("bench", ["recover", "--config={missing}"],
                                    ["{missing}: no such model directory or config file"]),
    "bench/aot missing config": ("bench", ["aot", "--config=configs/nosuch.py:tiny"],
                                 ["no such config file configs/nosuch.py", "sft.py"]),
    # Said before the RL config is validated (it lacks the init_from an RL run needs).
    "bench/train_step of RL": ("bench", ["train_step", "--config=" + SFT.replace("sft", "rl")],
                               ["train_step: times the SFT step", "is stage 'rl'"]),
    # data.preview
    "preview/data folder missing": ("data.preview", [f"--config={SFT}",
                                                     "--config.data.source=folder",
                                                     "--config.data.path={missing}",
                                                     "--out={root}/p.png"],
                                    ["data.path", "{missing}"]),
    "preview/eval config": ("data.preview", [f"--config={EVAL}", "--out={root}/p.png"],
                            ["--config: stage 'eval' has no data pipeline"]),
    "preview/--out a folder": ("data.preview", [f"--config={SFT}", "--out={root}"],
                               ["--out {root}", "a folder"]),
    "preview/unknown field": ("data.preview", [f"--config={SFT}", "--config.data.sevrity=2",
                                               "--out={root}/p.png"],
                              ["--config.data.sevrity", "did you mean data.severity"]),
}


def _run(module: str, args: list[str], **env) -> subprocess.CompletedProcess:
  """`python -m robust_u1_jax.<module> args` in a new interpreter."""
  return subprocess.run([sys.executable, "-m", f"robust_u1_jax.{module}", *args], cwd=ROOT,
                        env={**_clean_env(), **env}, capture_output=True, text=True, timeout=300,
                        check=False)


def _clean_env() -> dict[str, str]:
  """This environment without what importing cli here set: the command must set it itself."""
  return {**{k: v for k, v in os.environ.items() if k not in cli.QUIET_ENV},
          "JAX_PLATFORMS": "cpu"}


# The forked runner. A command's checks take a fraction of a second, its interpreter's start (jax
# alone: about 1.5 s of CPU) much longer. So one helper process per test process imports the heavy
# third-party libraries, nothing of the project and no jax backend, and forks a child per command:
# the child runs the entry module as __main__, exactly as `python -m` does from there on.
_ZYGOTE = r"""
import io, json, os, runpy, signal, sys, tempfile, traceback
for name in ("jax", "jax.numpy", "flax.nnx", "numpy", "PIL.Image", "scipy.ndimage",
             "ml_collections.config_flags", "absl.app", "absl.flags", "absl.logging"):
  __import__(name)
requests, replies = sys.stdin, os.fdopen(os.dup(1), "w")
for line in requests:
  request = json.loads(line)
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:
      code = 1
      try:
        signal.alarm(240)  # a hung command fails its case, not the test run
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
        os.chdir(request["cwd"])
        os.environ.update(request["env"])
        module = "robust_u1_jax." + request["module"]
        sys.argv = [module.replace(".", "/") + ".py", *request["args"]]
        try:
          runpy.run_module(module, run_name="__main__", alter_sys=True)
          code = 0
        except SystemExit as e:  # as the interpreter treats it
          if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
          code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
          traceback.print_exc()
      finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    replies.write(json.dumps({"rc": os.waitstatus_to_exitcode(status),
                              "out": out.read().decode(errors="replace"),
                              "err": err.read().decode(errors="replace")}) + "\n")
    replies.flush()
"""


@pytest.fixture(scope="module")
def zygote():
  proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=_clean_env())
  yield proc
  proc.stdin.close()
  proc.wait(timeout=60)


def _run_forked(zygote, module: str, args: list[str], **env) -> subprocess.CompletedProcess:
  """`python -m robust_u1_jax.<module> args`, run by the forked runner."""
  zygote.stdin.write(json.dumps({"module": module, "args": args, "env": env, "cwd": ROOT}) + "\n")
  zygote.stdin.flush()
  reply = json.loads(zygote.stdout.readline())
  return subprocess.CompletedProcess([module, *args], reply["rc"], reply["out"], reply["err"])


def test_bench_recover_checks_its_topology_before_it_benchmarks(zygote):
  proc = _run_forked(zygote, "bench", ["recover", "--topology=v9x-3"])
  assert proc.returncode == 2 and "recover benchmark on" not in proc.stdout, proc.stdout


def test_a_run_refused_while_its_stage_is_built_leaves_no_workdir(zygote, tmp_path, random_bagel):
  """A LoRA target matching nothing is found once the model is built: one line, exit status 2,
  and no empty workdir (nor its missing parents) left behind."""
  from robust_u1_jax.checkpoints import orbax_io
  from robust_u1_jax.data import tokenizer as tokenizer_lib
  from robust_u1_jax.models import bagel

  vocab = max(len(tokenizer_lib.load_tokenizer()), 64)
  init = orbax_io.save_orbax(random_bagel(bagel.BagelConfig.tiny(vocab_size=vocab)),
                             str(tmp_path / "init"))
  workdir = tmp_path / "runs" / "lora"
  proc = _run_forked(zygote, "train", [f"--config={SFT}", f"--workdir={workdir}",
                                       f"--config.init_from={init}", "--config.lora.rank=4",
                                       "--config.lora.targets=nomatch"])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert "lora.targets = 'nomatch' selects no kernel" in errors[0]
  assert "Traceback" not in proc.stderr and sorted(os.listdir(tmp_path)) == ["init"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line(case, paths, zygote):
  module, args, expected = CASES[case]
  if any("{ro}" in a for a in args) and paths["ro"] is None:
    pytest.skip("no unwritable folder on this machine")
  proc = _run_forked(zygote, module, [a.format(**paths) for a in args])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stdout == "", proc.stdout[-3000:]  # checked before any work says it has begun
  for text in expected:  # an expected text ending in a newline ends the line
    assert text.format(**paths) in errors[0] + "\n", errors[0]


def test_a_bad_benchmark_table_stops_evaluate_before_it_writes_anything(paths, zygote,
                                                                       tmp_path):
  import base64
  import io

  from PIL import Image

  png = io.BytesIO()
  Image.new("RGB", (48, 64), (200, 30, 30)).save(png, format="PNG")
  tsv = tmp_path / "bench.tsv"
  rows = [base64.b64encode(image).decode() for image in (png.getvalue(), b"GIF89a" + bytes(100))]
  tsv.write_text("index\timage\tquestion\tA\tB\tanswer\n" + "".join(
      f"{i}\t{image}\tRed?\tyes\tno\tA\n" for i, image in enumerate(rows)))
  out = tmp_path / "report"
  proc = _run_forked(zygote, "evaluate", [f"--config={EVAL}", f"--model={paths['workdir']}",
                                          f"--config.benchmarks.rbench={tsv}", f"--out={out}"])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
  assert f"benchmark {tsv}: 1 of 2 rows read" in errors[0] and "max_skip_ratio" in errors[0]
  assert "row 1 (line 3): image: not an image" in errors[0]
  assert proc.stderr.rstrip().endswith(errors[0])  # the error is the last line, and one
  assert not out.exists()  # nor an empty report folder


@pytest.mark.parametrize("module", ENTRY_MODULES)
def test_help_exits_zero(module, zygote):
  proc = _run_forked(zygote, module, ["--help"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--" in proc.stdout and not proc.stderr.strip()


def test_the_forked_runner_is_the_command(paths, zygote):
  """One case through a new interpreter: the same status and line as through the forked runner."""
  module, args, _ = CASES["train/unknown field"]
  args = [a.format(**paths) for a in args]
  real, forked = _run(module, args), _run_forked(zygote, module, args)
  assert (real.returncode, real.stderr) == (forked.returncode, forked.stderr) == (
      2, forked.stderr)
  assert forked.stderr.startswith("error: --config.foo")


def test_traceback_on_request(paths, zygote):
  args = [f"--config={SFT}", "--config.total_steps=-5", f"--workdir={paths['root']}/w"]
  for extra, env in (([], {cli.TRACEBACK_ENV: "1"}), (["--verbosity=1"], {})):
    proc = _run_forked(zygote, "train", args + extra, **env)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config field total_steps")
  # An unknown field is refused while the flags are parsed, before a --verbosity after it is
  # read: the traceback was left out.
  for extra in (["--verbosity=1"], ["--verbosity", "1"], ["-v=1"]):
    proc = _run_forked(zygote, "train", [f"--config={SFT}", "--config.data.batchsize=4",
                                         f"--workdir={paths['root']}/w", *extra])
    assert proc.returncode == 2 and "Traceback" in proc.stderr, (extra, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --config.data.batchsize")
  proc = _run_forked(zygote, "train", [f"--config={SFT}", "--config.data.batchsize=4",
                                       f"--workdir={paths['root']}/w", "--verbosity=0"])
  assert proc.returncode == 2 and "Traceback" not in proc.stderr


def test_an_evaluation_whose_report_is_current_has_nothing_to_do(paths, zygote):
  # The report of this very evaluation: the same config (but --out), model files and code.
  from robust_u1_jax.eval import partial
  from robust_u1_jax.eval import run as eval_run

  c = config_lib.load(EVAL, {"model": paths["workdir"]})
  out = os.path.join(paths["root"], "current")
  os.makedirs(out)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("# this evaluation\n")
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump({"settings": {"stamp": partial.stamp(eval_run.fingerprint(c))}}, f)
  args = [f"--config={EVAL}", f"--model={paths['workdir']}", f"--out={out}"]
  proc = _run_forked(zygote, "evaluate", args)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      f"nothing to evaluate: the report in {out} is of these models, files, settings and code; "
      "--overwrite evaluates again", f"report: {out}/report.md"]
  # --overwrite evaluates again: here it gets as far as the stub model's own error.
  proc = _run_forked(zygote, "evaluate", [*args, "--overwrite"])
  assert proc.returncode == 2 and "missing tokenizer.json" in proc.stderr


def test_a_good_run_is_quiet_and_says_where_its_output_is(paths):
  out = os.path.join(paths["root"], "new_folder", "fog.png")
  # A compile cache of its own: the tests' shared one, written without a lock, may be read
  # mid-write by another test's process, and JAX says so on stderr.
  proc = _run("corrupt", [f"--image={paths['good']}", *CORRUPT, f"--out={out}"],
              JAX_COMPILATION_CACHE_DIR=os.path.join(paths["root"], "jit_cache"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr == ""  # no start-up INFO lines or advisories
  assert proc.stdout.strip().splitlines()[-1] == f"wrote {out} (64x64)"
  assert os.path.isfile(out)  # the missing folder was created


# ---------------------------------------------------------------------------------- in process

def test_quiet_environment_is_set_on_import():
  for name, value in cli.QUIET_ENV.items():
    assert os.environ.get(name) is not None, name
    if name != "TF_CPP_MIN_LOG_LEVEL":  # jax sets its own default first in this process
      assert os.environ[name] == value


def test_commands_keep_compiled_programs_in_the_cache_folder(tmp_path):
  """An entry module's compiled programs land in $ROBUST_U1_CACHE/jit (so the next command
  skips those compiles); a JAX_COMPILATION_CACHE_DIR of the user's own wins."""
  program = ("from robust_u1_jax import cli; import jax, jax.numpy as jnp; "
             "print(jax.config.jax_compilation_cache_dir); "
             "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()")
  env = {k: v for k, v in _clean_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(ROBUST_U1_CACHE=str(tmp_path / "cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = lambda extra: subprocess.run([sys.executable, "-c", program], cwd=ROOT,
                                     env={**env, **extra}, capture_output=True, text=True,
                                     timeout=120, check=True)
  assert run({}).stdout.strip() == str(tmp_path / "cache" / "jit")
  assert os.listdir(tmp_path / "cache" / "jit")  # the jitted program was written there
  mine = str(tmp_path / "mine")
  assert run({"JAX_COMPILATION_CACHE_DIR": mine}).stdout.strip() == mine


def test_every_bad_input_type_exists():
  import importlib

  for qualified in cli.BAD_INPUT_TYPES:
    module, _, name = qualified.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, Exception), qualified
    assert cli.is_bad_input(cls("x")), qualified


def test_bad_input_or_bug():
  from robust_u1_jax import config_lib
  from robust_u1_jax.data import transforms

  assert cli.is_bad_input(config_lib.ConfigError("x"))
  assert cli.is_bad_input(transforms.BadImageError("x"))
  assert cli.is_bad_input(FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"))
  assert cli.is_bad_input(OSError(errno.EROFS, "Read-only file system", "/x"))
  # A run that diverged: its settings' doing, told in a line (it printed a traceback).
  from robust_u1_jax.training import checkpoint
  assert cli.is_bad_input(checkpoint.NonFiniteLoss("non-finite loss at step 1"))
  assert not cli.is_bad_input(ValueError("a bug"))
  assert not cli.is_bad_input(KeyError("a bug"))
  assert not cli.is_bad_input(OSError(errno.EIO, "Input/output error"))


def test_messages_name_the_path_and_the_fix():
  text = cli.message(OSError(errno.EROFS, "Read-only file system", "/mnt/out.png"))
  assert text == "/mnt/out.png: Read-only file system (a read-only file system; give a writable " \
      "location)"
  assert cli.message(FileNotFoundError("config file not found: c.py")) == \
      "config file not found: c.py"


def test_a_config_path_given_from_another_folder_names_the_checkout_s(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  text = config_lib.missing_config_file("configs/sft.py")
  assert text == (f"no such config file configs/sft.py in {tmp_path} (a config path is read from "
                  f"the current folder); the checkout's is {config_lib.CHECKOUT}/configs/sft.py")
  assert os.path.isfile(os.path.join(config_lib.CHECKOUT, "configs", "sft.py"))
  # The library's loader says so too (the README's Python recipe; it said "config file not found").
  with pytest.raises(FileNotFoundError) as e:
    config_lib.load("configs/sft.py:tiny")
  assert str(e.value) == text
  # A folder of config files beside the given path: those are named, as before.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mine.py").write_text("")
  assert config_lib.missing_config_file("configs/sft.py").endswith(
      "config files in configs: mine.py")


def test_call_reports_bad_input_and_raises_bugs(capsys):
  def bad(argv):
    raise cli.PathError("--out /x: a folder")

  assert cli.call(bad, ["prog"]) == 2
  assert capsys.readouterr().err == "error: --out /x: a folder\n"

  def usage(argv):
    raise app.UsageError("missing --image\nmore detail")

  assert cli.call(usage, ["prog"]) == 2
  assert capsys.readouterr().err == ("error: missing --image (--help lists the flags)\n"
                                     "  more detail\n")

  def exits(argv):
    raise SystemExit("aot: --topology 'v9': not understood")

  assert cli.call(exits, ["prog"]) == 2
  assert capsys.readouterr().err == "error: aot: --topology 'v9': not understood\n"

  def bug(argv):
    raise ValueError("a bug keeps its traceback")

  with pytest.raises(ValueError, match="a bug"):
    cli.call(bug, ["prog"])
  assert cli.call(lambda argv: None, ["prog"]) == 0

  def interrupted(argv):
    raise KeyboardInterrupt

  assert cli.call(interrupted, ["prog"]) == 130
  assert capsys.readouterr().err == "interrupted\n"

  # A device out of memory (a 26,000-character question to `answer` asked 25 GiB of the tiny
  # model): the inputs' size, in a line, not a traceback through the model.
  def too_large(argv):
    import jax
    import jax.numpy as jnp

    jax.jit(lambda: jnp.ones((2**42,), jnp.uint8))().block_until_ready()

  assert cli.call(too_large, ["prog"]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: out of memory on ") and "allocating 4096.0 GiB (XLA: " in err
  assert err.count("\n") == 1 and "give smaller ones" in err


def test_output_dir_and_file(tmp_path, monkeypatch):
  new = tmp_path / "a" / "b"
  assert cli.output_dir(str(new), "--workdir") == str(new) and new.is_dir()
  assert os.listdir(new) == []  # the write check leaves nothing behind
  (tmp_path / "f").write_text("x")
  with pytest.raises(cli.PathError, match=r"--workdir .*/f: a file, not a folder"):
    cli.output_dir(str(tmp_path / "f"), "--workdir")
  with pytest.raises(cli.PathError, match="cannot create the folder"):
    cli.output_dir(str(tmp_path / "f" / "sub"), "--workdir")
  out = tmp_path / "c" / "x.png"
  assert cli.output_file(str(out), "--out", image=True) == str(out) and out.parent.is_dir()
  with pytest.raises(cli.PathError, match="a folder; give a file name"):
    cli.output_file(str(tmp_path), "--out", image=True)
  with pytest.raises(cli.PathError, match="no file extension"):
    cli.output_file(str(tmp_path / "noext"), "--out", image=True)
  later = tmp_path / "later" / "deeper"  # checked now, created once there is something to write
  assert cli.output_dir(str(later), "--out", create=False) == str(later)
  assert cli.output_file(str(later / "x.png"), "--out", create=False) and not later.parent.exists()
  with pytest.raises(cli.PathError, match=r"--out .*/f/sub: .*/f is a file, not a folder"):
    cli.output_dir(str(tmp_path / "f" / "sub"), "--out", create=False)

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system")

  monkeypatch.setattr(cli.tempfile, "mkstemp", read_only)
  with pytest.raises(cli.PathError, match=r"--workdir .*: cannot write there \(Read-only file "
                     r"system\); give a writable folder"):
    cli.output_dir(str(tmp_path), "--workdir")
  assert cli.output_dir("gs://bucket/run", "--workdir") == "gs://bucket/run"  # not checked here


def test_a_dropped_ctrl_c_is_sent_again(monkeypatch):
  import signal
  import threading
  import types

  sent, passed = [], []
  monkeypatch.setattr(cli.os, "kill", lambda pid, sig: sent.append((pid, sig)))
  hook = cli.redeliver_interrupts(passed.append, delay_s=0.0)
  before = set(threading.enumerate())
  hook(types.SimpleNamespace(exc_type=KeyboardInterrupt))
  for thread in set(threading.enumerate()) - before:
    thread.join()
  assert sent == [(cli.os.getpid(), signal.SIGINT)] and not passed
  other = types.SimpleNamespace(exc_type=ValueError)
  hook(other)
  assert passed == [other] and len(sent) == 1


COMPILE_THEN_CTRL_C = """
import atexit, os, signal, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever runs the test
from robust_u1_jax import cli
import jax
import jax.numpy as jnp

def main(argv):
  atexit.register(lambda: print("the program's exit handler ran", flush=True))
  def f(x):
    for i in range(600):
      x = jnp.tanh(x @ x + i)
    return x
  lowered = jax.jit(f).lower(jnp.ones((32, 32)))
  threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
  t0 = time.perf_counter()
  lowered.compile()
  print(f"compiled in {time.perf_counter() - t0:.1f} s, before the Ctrl-C")

cli.run(main)
"""


def test_ctrl_c_during_a_compile_ends_with_status_130_not_a_crash(tmp_path):
  # XLA goes on compiling on a thread of its own after the wait for it is interrupted; the
  # interpreter's normal exit freed JAX's client under it: a segmentation fault (139) after
  # `interrupted`, every time (jax 0.10.2, CPU).
  env = {**os.environ, "JAX_ENABLE_COMPILATION_CACHE": "false", "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, "-c", COMPILE_THEN_CTRL_C], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
  assert "before the Ctrl-C" not in run.stdout, "the compile ended before the Ctrl-C: lengthen it"
  assert (run.returncode, run.stderr) == (130, "interrupted\n"), run.stderr[-2000:]
  assert run.stdout == "the program's exit handler ran\n"  # the exit handlers but JAX's run


def test_ctrl_c_after_the_work_is_done_keeps_its_status(tmp_path):
  # `convert` interrupted just after `wrote ...` exited 130 without a word, its output whole: the
  # interrupt killed the process in the interpreter's teardown. `corrupt` is quicker to start;
  # its piped stdout is flushed as it exits, so the line comes with the teardown under way.
  Image.fromarray(np.full((64, 64, 3), 100, np.uint8)).save(tmp_path / "in.png")
  proc = subprocess.Popen([sys.executable, "-m", "robust_u1_jax.corrupt",
                           f"--image={tmp_path / 'in.png'}", "--type=fog", "--severity=3",
                           f"--out={tmp_path / 'out.png'}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  for line in proc.stdout:
    if line.startswith("wrote "):
      time.sleep(0.1)
      proc.send_signal(signal.SIGINT)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, (proc.returncode, err[-2000:])


def test_log_lines_are_plain_and_above_the_progress_bar(capsys):
  """A warning (a bad record, logged from a data loader's thread) reads `warning: ...` on a line
  of its own, not absl's prefixed line in the middle of the progress bar's."""
  import logging as std_logging

  from absl import logging as absl_logging
  import tqdm

  root = std_logging.getLogger()
  saved = list(root.handlers)
  try:
    root.addHandler(absl_logging.get_absl_handler())  # as absl's app.run leaves it
    cli.plain_log_lines()
    cli.plain_log_lines()  # once is enough: no line twice
    bar = tqdm.tqdm(total=3, file=sys.stderr, ascii=True)
    bar.update(1)
    absl_logging.warning("folder data: bad record %s (index %d)", "a.png", 3)
    # Orbax's, at every clean stop on every process: it read as a problem.
    std_logging.getLogger("absl").warning("[process=0][thread=save_finalize] Reached preemption "
                                          "sync point, step=%d", 15)
    bar.update(1)
    bar.close()
  finally:
    root.handlers[:] = saved
  err = capsys.readouterr().err
  assert err.count("bad record") == 1
  assert "\rwarning: folder data: bad record a.png (index 3)\n" in err
  assert "test_cli_errors.py" not in err  # absl's file:line prefix
  assert "preemption" not in err
