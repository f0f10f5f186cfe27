"""Multi-host training proven on one machine.

Two processes on localhost, 4 fake CPU devices each, join through `jax.distributed` (gloo
collectives) from the environment `launch/local.sh --processes 2` sets, train a tiny config with
per-process data slices, evaluate (SFT), checkpoint, and restore the checkpoint through the
trainer's Checkpointer (tests/multihost_worker.py). The same run as one process with 8 fake
devices is the reference: the losses, the other logged metrics, the evaluation's and every
restored array (parameters, EMA, Adam moments, step, key) agree. Not bit for bit: the
gradients' sum over the 8 devices is added in another order by gloo across processes than inside
one process, so they agree to float32 rounding (measured: losses within 1e-7; parameters within
3e-9 but for a few entries of about 3e-7, see ARRAY_ATOL). Reading other rows, or drawing other
noise or dropout, would move the losses by about 1e-2 and the parameters by about lr = 1e-4.

A SIGTERM to one process of the pair stops both after one step, saved together (as a preemption
notice that reaches one host of a pod first).
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from robust_u1_jax.training import shared_workdir

pytestmark = pytest.mark.slow  # minutes: three processes compile the tiny model's steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
# Both groups compile cold on 2 shared cores (process 1 never reads the persistent cache).
TIMEOUT_S = 1500
# A pair that should end with an error: longer only when one process waits for its ended peer.
ERROR_TIMEOUT_S = 600

COMMON = {
    "log_every": 1, "tensorboard": False, "eval_every": 0,
    # A multi-process run of unpacked batches needs one text width on every process.
    "data.text_pad_to": 32,
    # One cheap corruption instead of the Robust-R1 pipeline, whose program only adds compile
    # time here: corruption is keyed by record either way (test_pipeline).
    "data.corruption": "gaussian_noise",
}
# The evaluation at the last step too: every process reads the recoveries it scores.
SFT = {**COMMON, "total_steps": 3, "checkpoint_every": 3, "eval_every": 3}
RL = {**COMMON, "total_steps": 1, "checkpoint_every": 1, "init_from": "random",
      # 8 images, one per device of the 8-way FSDP mesh; small groups and few sampler steps.
      "data.batch_size": 8, "rl.group_size": 2, "rl.num_steps": 4, "rl.window_size": 1,
      # No guidance branches: fewer contexts to compile, the same multi-process paths.
      "guidance.text_scale": 1.0, "guidance.image_scale": 1.0,
      # Adam's first step is about lr * sign(g): with the base eps (1e-15) a gradient entry that
      # is rounding noise moves its parameter by the full lr, in the direction the summation
      # order picks. The SFT config's 1e-8 leaves such entries still.
      "optimizer.eps": 1e-8}


# Adam divides by sqrt(v) + eps: a gradient entry near zero turns its rounding difference d into
# about lr * d / eps, 1e-4 * 1e-11 / 1e-8 = 1e-7 here (measured up to 2.6e-7).
ARRAY_ATOL = 1e-6


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int, process_id: int | None = None, num_processes: int = 1, port: int = 0):
  env = dict(os.environ)
  # Without conftest's scheduler flag: with it the two processes' Gloo collectives mismatched
  # (a 512-byte message where 256 were expected, an abort) in 3 of 3 runs, none without it.
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+|"
                 r"--xla_cpu_enable_concurrency_optimized_scheduler=\w+", "",
                 env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "ROBUST_U1_DISTRIBUTED"):
    env.pop(key, None)
  if num_processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id))
  return env


def _start(tmp_path, config: str, overrides: dict, runs: dict, work: str = "work") -> list:
  """Starts the runs' workers ({name: [(devices, process_id, process_count)]}) side by side, each
  run in its folder's `work` ('{process}' in it: the worker's process index); returns
  [(log path, log file, Popen)], in the runs' order."""
  args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
  config = os.path.join(ROOT, "configs", config)
  port = _free_port()
  procs = []
  for name, members in runs.items():
    for devices, process_id, count in members:
      log = open(tmp_path / f"{name}_{process_id or 0}.log", "w")
      command = [sys.executable, WORKER, config, str(tmp_path / name / work),
                 str(tmp_path / name), *args]
      procs.append((log.name, log, subprocess.Popen(
          command, cwd=ROOT, env=_env(devices, process_id, count, port), stdout=log,
          stderr=subprocess.STDOUT)))
  return procs


def _kill_and_close(procs: list) -> None:
  """Kills the workers still running (a lone peer would wait for the others) and closes logs."""
  for _, log, proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    log.close()


def _wait(procs: list, timeout_s: float) -> None:
  """Waits for every worker to exit 0; fails with the first failed one's log otherwise."""
  deadline = time.time() + timeout_s
  failed = []
  try:
    for path, log, proc in procs:
      try:
        code = proc.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        code = "timeout"
      if code != 0:
        failed.append((path, code))
        break  # a lone peer of a failed process would wait for it: stop them all
  finally:
    _kill_and_close(procs)
  if failed:
    path, code = failed[0]
    with open(path) as f:
      tail = f.read()[-6000:]
    pytest.fail(f"{os.path.basename(path)} ended with {code}:\n{tail}")


def _result(tmp_path, name: str) -> dict:
  with open(tmp_path / f"{name}.json") as f:
    meta = json.load(f)
  with np.load(tmp_path / f"{name}.npz") as arrays:
    return {"meta": meta, "arrays": dict(arrays)}


def _run(tmp_path, config: str, overrides: dict):
  """Starts the reference (1 process x 8 devices) and the pair (2 x 4) side by side; returns
  (reference, pair), each {"meta": worker JSON, "arrays": restored arrays}."""
  runs = {"one": [(8, None, 1)], "two": [(4, 0, 2), (4, 1, 2)]}
  _wait(_start(tmp_path, config, overrides, runs), TIMEOUT_S)
  return _result(tmp_path, "one"), _result(tmp_path, "two")


def _assert_same_run(one, two, total_steps, *, metric_rtol, metric_atol, array_atol):
  assert (one["meta"]["process_count"], two["meta"]["process_count"]) == (1, 2)
  assert one["meta"]["device_count"] == two["meta"]["device_count"] == 8
  for run in (one, two):
    assert run["meta"]["restored_step"] == total_steps
    assert run["meta"]["data_state"], "the data position was not restored"
  rows_one, rows_two = one["meta"]["history"], two["meta"]["history"]
  assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two] == list(
      range(1, total_steps + 1))
  for a, b in zip(rows_one, rows_two):
    for key in a:
      if key.endswith("_per_s") or key.startswith("tflops"):  # wall-clock rates
        continue
      np.testing.assert_allclose(b[key], a[key], rtol=metric_rtol, atol=metric_atol,
                                 err_msg=f"step {a['step']}: {key}")
  assert one["arrays"].keys() == two["arrays"].keys()
  assert any(k.startswith("params.") for k in one["arrays"])
  for key, expected in one["arrays"].items():
    got = two["arrays"][key]
    assert got.dtype == expected.dtype and got.shape == expected.shape, key
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=array_atol, err_msg=key)


def test_sft_on_two_processes_equals_one_process(tmp_path):
  one, two = _run(tmp_path, "sft.py:tiny", SFT)
  _assert_same_run(one, two, SFT["total_steps"], metric_rtol=1e-5, metric_atol=1e-6,
                   array_atol=ARRAY_ATOL)
  assert not any(name.startswith(shared_workdir.MARKER)  # checked, then removed
                 for name in os.listdir(tmp_path / "two" / "work"))
  (eval_one,), (eval_two,) = one["meta"]["evaluations"], two["meta"]["evaluations"]
  assert eval_one["step"] == eval_two["step"] == SFT["total_steps"]
  for key in ("eval_ssim", "eval_ssim_corrupted"):
    np.testing.assert_allclose(eval_two[key], eval_one[key], rtol=1e-5, err_msg=key)


def test_rl_on_two_processes_equals_one_process(tmp_path):
  one, two = _run(tmp_path, "rl.py:tiny", RL)
  # Group-normalised advantages divide reward differences by the group's spread (about 1e-2):
  # the rewards' rounding (1e-7) becomes 1e-5 in the advantages and what follows from them
  # (measured: advantage_std and grad_norm 1.5e-5 apart). The policy loss and the advantages'
  # mean are sums that cancel to about 1e-7: their rounding is absolute.
  _assert_same_run(one, two, RL["total_steps"], metric_rtol=1e-4, metric_atol=1e-6,
                   array_atol=ARRAY_ATOL)


def test_a_signal_to_one_process_stops_every_process_at_one_step(tmp_path):
  # As when a scheduler preempts one host of a pod first: process 1 alone gets SIGTERM. Stopping
  # alone, it would wait in the collective checkpoint save while process 0 steps on (a hang).
  overrides = {**COMMON, "total_steps": 100_000, "checkpoint_every": 100_000,
               "eval_every": 0}
  procs = _start(tmp_path, "sft.py:tiny", overrides, {"two": [(4, 0, 2), (4, 1, 2)]})
  metrics = tmp_path / "two" / "work" / "metrics.jsonl"
  deadline = time.time() + TIMEOUT_S
  while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
    if time.time() > deadline or any(proc.poll() is not None for _, _, proc in procs):
      _wait(procs, 0)  # fails with the log of the one that ended
      pytest.fail("the pair neither logged 3 steps nor ended")
    time.sleep(0.5)
  signalled_after = len(metrics.read_text().splitlines())
  procs[1][2].send_signal(signal.SIGTERM)
  _wait(procs, 600)
  stops = []
  for path, _, _ in procs:
    with open(path) as f:
      stops += re.findall(r"stopped at step (\d+)", f.read())
  assert len(stops) == 2 and stops[0] == stops[1], stops
  two = _result(tmp_path, "two")["meta"]
  stop = int(stops[0])
  assert stop >= signalled_after
  assert two["restored_step"] == stop and two["data_state"]
  assert [r["step"] for r in two["history"]] == list(range(1, stop + 1))

  # Resumed, and signalled again before its first step (while it restores and compiles): the
  # pair stops after that first step, not at total_steps.
  procs = _start(tmp_path, "sft.py:tiny", overrides, {"two": [(4, 0, 2), (4, 1, 2)]})
  log_1 = procs[1][0]
  deadline = time.time() + TIMEOUT_S
  while f"resuming from step {stop}" not in open(log_1).read():
    if time.time() > deadline or any(proc.poll() is not None for _, _, proc in procs):
      _wait(procs, 0)
      pytest.fail("the pair neither resumed nor ended")
    time.sleep(0.2)
  procs[1][2].send_signal(signal.SIGTERM)
  _wait(procs, 600)
  for path, _, _ in procs:
    with open(path) as f:
      assert re.findall(r"stopped at step (\d+)", f.read()) == [str(stop + 1)], path


def _finished(procs: list, timeout_s: float) -> list[str]:
  """Waits for every worker to end (any exit code); returns their logs. Fails on a timeout: a
  process left waiting for a peer that has ended."""
  deadline = time.time() + timeout_s
  logs = []
  try:
    for path, _, proc in procs:
      try:
        proc.wait(timeout=max(1.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"{os.path.basename(path)} still runs after {timeout_s} s: it waits for a "
                    "peer that has ended")
  finally:
    _kill_and_close(procs)
  for path, _, _ in procs:
    with open(path) as f:
      logs.append(f.read())
  return logs


def test_bad_records_of_one_process_end_both_processes_together(tmp_path):
  # 48 images, 4 of them unreadable, all among process 0's rows (the unshuffled stream's rows
  # 0-3, 8-11, ... at 4 rows per process). Dropped, they left process 0 a batch short: it ran out
  # of its one epoch after step 5 and raised, while process 1 waited in step 6's collectives and
  # process 0's exit waited for process 1 (both still there after 150 s, measured). Replaced, both
  # read 6 batches and stop after step 6 with the same error.
  from PIL import Image

  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(48):
    path = folder / f"img_{i:02d}.png"
    if i in (0, 1, 2, 8):
      path.write_bytes(b"\x89PNG\r\n\x1a\n-truncated")
    else:
      Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
  overrides = {**COMMON, "total_steps": 10, "checkpoint_every": 100,
               "data.source": "folder", "data.path": str(folder), "data.shuffle": False,
               "data.num_epochs": 1, "data.batch_size": 8, "data.max_skip_ratio": 0.5}
  runs = {"two": [(4, 0, 2), (4, 1, 2)]}
  logs = _finished(_start(tmp_path, "sft.py:tiny", overrides, runs), ERROR_TIMEOUT_S)
  for log in logs:
    assert "the data ran out before step 10" in log, log[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "two" / "work" / "metrics.jsonl").open()]
  assert [r["step"] for r in rows] == list(range(1, 7))
  assert "img_00.png" in logs[0] and "img_00.png" not in logs[1]  # process 0 read the bad ones

  # With a ratio the 4 of 48 exceed, both processes stop on the totals of both, together.
  (tmp_path / "strict").mkdir()
  logs = _finished(_start(tmp_path / "strict", "sft.py:tiny",
                          {**overrides, "data.max_skip_ratio": 0.05}, runs), ERROR_TIMEOUT_S)
  for log in logs:
    assert "4 of 48 records read by 2 processes were unreadable" in log, log[-3000:]
    assert "ran out" not in log


def test_a_workdir_on_each_host_s_own_disk_stops_every_process_at_start_up(tmp_path):
  # `--workdir /tmp/run` on a pod: every host its own folder. The processes used to train on,
  # each deciding from its own folder whether its stage was finished and where to resume; now
  # each says so in one line before anything is built, and leaves no folder behind.
  runs = {"apart": [(4, 0, 2), (4, 1, 2)]}
  overrides = {**COMMON, "total_steps": 2, "checkpoint_every": 2}
  logs = _finished(_start(tmp_path, "sft.py:tiny", overrides, runs, work="work_{process}"),
                   ERROR_TIMEOUT_S)
  for log in logs:
    assert "process(es) 1 of 2 cannot see the file process 0 wrote there" in log, log[-3000:]
    assert "not each host's own disk" in log
  assert not (tmp_path / "apart").exists()

  # A workdir process 0 cannot write into: said on every process, none left waiting for it.
  (tmp_path / "blocked").mkdir()
  (tmp_path / "blocked" / "a_file").write_text("")
  logs = _finished(_start(tmp_path, "sft.py:tiny", overrides, {"blocked": runs["apart"]},
                          work="a_file/work"), ERROR_TIMEOUT_S)
  assert "a_file/work: process 0 cannot write there (Not a directory)" in logs[0], logs[0][-3000:]
  assert "a_file/work: process 0 cannot write there (see its log)" in logs[1], logs[1][-3000:]


CHECKPOINT_WORKER = os.path.join(ROOT, "tests", "checkpoint_worker.py")


def _restore_with_fault(tmp_path, fault: str) -> tuple[list[dict], list[str]]:
  """Two processes save steps 1 and 2, then restore with `fault` in one process's read of step 2
  (tests/checkpoint_worker.py); returns each process's result and log."""
  port = _free_port()
  procs = []
  for process_id in (0, 1):
    log = open(tmp_path / f"checkpoint_{process_id}.log", "w")
    command = [sys.executable, CHECKPOINT_WORKER, str(tmp_path / "work"),
               str(tmp_path / "result"), fault]
    procs.append((log.name, log, subprocess.Popen(
        command, cwd=ROOT, env=_env(2, process_id, 2, port), stdout=log,
        stderr=subprocess.STDOUT)))
  logs = _finished(procs, 120)
  results = []
  for process_id, log in enumerate(logs):
    path = tmp_path / f"result_{process_id}.json"
    assert path.is_file(), log[-3000:]
    results.append(json.loads(path.read_text()))
  return results, logs


@pytest.mark.parametrize("fault", ["state:1", "data:0"])
def test_a_checkpoint_one_process_cannot_read_is_skipped_by_every_process(tmp_path, fault):
  # Orbax's restore ends in a barrier. A process failing before it met its peer's barrier with
  # the barrier of its restore of step 1: one went on from step 2, the other from step 1, and
  # their next collectives paired unrelated ones (seen: a garbage gathered value, a barrier name
  # mismatch, a wait until the coordination service ended them 5 minutes later). Now both fail
  # step 2 and resume from step 1.
  results, logs = _restore_with_fault(tmp_path, fault)
  for result in results:
    assert result == {"step": 1, "value": 1.0, "position": 1, "next": [1, 1]}, result
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["1", "2.damaged"]
  bad, good = (logs[1], logs[0]) if fault.endswith("1") else (logs[0], logs[1])
  assert "injected" in bad and "checkpoints/2 cannot be restored" in bad
  assert f"process(es) {fault[-1]} could not read it" in good


def test_a_checkpoint_one_process_refuses_stops_every_process(tmp_path):
  results, _ = _restore_with_fault(tmp_path, "refuse:1")
  assert "injected: not this run's position" in results[1]["error"]
  assert results[0]["error"].endswith("checkpoints/2: refused by process(es) 1 (see their logs)")
  assert sorted(os.listdir(tmp_path / "work" / "checkpoints")) == ["1", "2"]  # kept in place
