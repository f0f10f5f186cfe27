"""launch/: every script checks its arguments, prints what it would run with --dry-run, and runs it
(here with stand-ins for python, gcloud and srun that record what they were given)."""

import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.sh")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
SLURM = os.path.join(ROOT, "launch", "gpu_slurm.sbatch")
TRAIN = ["--config", "configs/sft.py:tiny", "--workdir", "/shared/runs/sft",
         "--config.total_steps=3", "--config.data.source=folder",
         "--config.data.path=a folder with spaces"]
TPU_ARGS = ["--name", "robust-u1", "--zone", "us-east5-a", "--accelerator", "v5p-32"]

# A stand-in interpreter: records its arguments and the launch environment as JSON, one file per
# process, then exits with FAKE_EXIT (or sleeps FAKE_SLEEP seconds first). Given FAKE_SAVE_S, it
# answers SIGTERM and SIGINT as the trainer does: "saves" for that long, says so on its output,
# writes <name>.saved, exits 128 + the signal; given FAKE_IGNORE_TERM, it ignores SIGTERM.
# (FAKE_EXIT_, FAKE_SLEEP_ and FAKE_SAVE_S_ end in the process's or worker's number.)
FAKE_PYTHON = r"""#!/usr/bin/env python3
import json, os, signal, sys, time
name = os.environ.get("JAX_PROCESS_ID") or os.environ.get("FAKE_WORKER") or "0"
if os.environ.get("FAKE_IGNORE_TERM_" + name):
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
if os.environ.get("FAKE_SAVE_S_" + name):
  def save_and_exit(signum, frame):
    for sig in (signal.SIGTERM, signal.SIGINT):  # the first signal is the one reported
      signal.signal(sig, signal.SIG_IGN)
    time.sleep(float(os.environ["FAKE_SAVE_S_" + name]))
    print("checkpoint saved", flush=True)  # fails if the output's reader (tee) is gone
    open(os.path.join(os.environ["FAKE_OUT"], name + ".saved"), "w").close()
    sys.exit(128 + signum)
  signal.signal(signal.SIGTERM, save_and_exit)
  signal.signal(signal.SIGINT, save_and_exit)
if sys.argv[1:3] == ["-m", "pip"]:
  name = "pip_" + name
if "--check_config" in sys.argv:
  name = "check"
keys = ("JAX_", "XLA_", "LIBTPU_", "ROBUST_U1_", "TPU_", "HOME", "PYTHONPATH")
with open(os.path.join(os.environ["FAKE_OUT"], name + ".json"), "w") as f:
  json.dump({"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(),
             "env": {k: v for k, v in os.environ.items() if k.startswith(keys)}}, f)
time.sleep(float(os.environ.get("FAKE_SLEEP_" + name, "0")))
sys.exit(int(os.environ.get("FAKE_EXIT_" + name, "0")))
"""


def _script(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
  return str(path)


@pytest.fixture
def fakes(tmp_path):
  """(bin dir with a fake `python3`, the folder the fakes record into)."""
  bin_dir, out = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  out.mkdir()
  _script(bin_dir / "python3", FAKE_PYTHON.replace("/usr/bin/env python3", sys.executable))
  return bin_dir, out


def _run(command, env=None, cwd=ROOT, timeout=120):
  return subprocess.run(command, cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout,
                        capture_output=True, text=True)


def _records(out):
  return {p[:-5]: json.load(open(os.path.join(out, p))) for p in os.listdir(out)
          if p.endswith(".json")}


def _lines(stdout):
  """The printed commands, split into words the way bash would (comments skipped)."""
  return [shlex.split(line) for line in stdout.splitlines() if line and not line.startswith("#")]


@pytest.mark.parametrize("script", [LOCAL, TPU, SLURM])
def test_scripts_parse_and_explain_themselves(script):
  assert _run(["bash", "-n", script]).returncode == 0
  shown = _run(["bash", script, "--help"])
  assert shown.returncode == 0 and "--dry-run" in shown.stdout
  assert os.access(script, os.X_OK)


@pytest.mark.parametrize("script,before", [(LOCAL, []), (TPU, TPU_ARGS), (SLURM, [])])
def test_bad_arguments_are_one_error_line_and_status_2(script, before):
  cases = [
      [*before, "--dry-run", "--", "--workdir", "/shared/w"],  # no --config
      [*before, "--dry-run", "--", "--config", "configs/sft.py:tiny"],  # no --workdir
      [*before, "--dry-run", "--", "--config", "configs/nope.py:tiny", "--workdir", "/shared/w"],
      [*before, "--frobnicate", "--dry-run", "--", *TRAIN],
  ]
  if script == LOCAL:  # the one launcher that creates the workdir's logs/ on this machine
    cases.append(["--dry-run", "--", "--config", "configs/sft.py:tiny", "--workdir",
                  os.path.abspath(__file__)])
  for args in cases:
    result = _run(["bash", script, *args])
    assert result.returncode == 2, (args, result.stdout, result.stderr)
    assert result.stderr.startswith("error: "), result.stderr
    assert "usage:" in result.stderr


def test_local_dry_run_prints_each_process(tmp_path):
  # XLA_FLAGS empty (the test session's own flags would be kept in front of the device count).
  result = _run([LOCAL, "--dry-run", "--processes", "2", "--backend", "cpu", "--port", "23456",
                 "--", *TRAIN], env={"XLA_FLAGS": ""})
  assert result.returncode == 0, result.stderr
  lines = _lines(result.stdout)
  assert len(lines) == 2
  for i, words in enumerate(lines):
    assert words[0] == "env"
    assert {"JAX_PLATFORMS=cpu", "JAX_COORDINATOR_ADDRESS=localhost:23456",
            "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}",
            "XLA_FLAGS=--xla_force_host_platform_device_count=4"} <= set(words)
    assert words[-len(TRAIN) - 6:] == [
        "python3", "-m", "robust_u1_jax.train", *TRAIN, ">",
        f"/shared/runs/sft/logs/process_{i}.log", "2>&1"]
  # GPUs: each process its own devices.
  result = _run([LOCAL, "--dry-run", "--processes", "2", "--backend", "gpu",
                 "--devices_per_process", "4", "--", *TRAIN])
  ids = [w for words in _lines(result.stdout) for w in words if w.startswith("JAX_LOCAL")]
  assert ids == ["JAX_LOCAL_DEVICE_IDS=0,1,2,3", "JAX_LOCAL_DEVICE_IDS=4,5,6,7"]
  for args in (["--processes", "2"], ["--processes", "2", "--backend", "tpu"],
               ["--backend", "npu"], ["--processes", "-1"],
               # one process takes fake devices on CPU only (the count was silently dropped)
               ["--devices_per_process", "4", "--backend", "gpu"],
               ["--python", str(tmp_path / "no_python")], ["--cache", LOCAL]):
    assert _run([LOCAL, "--dry-run", *args, "--", *TRAIN]).returncode == 2, args
  # `--processes --config ...`: the next option is no value.
  result = _run([LOCAL, "--dry-run", "--processes", "--", *TRAIN])
  assert result.returncode == 2 and result.stderr.startswith("error: --processes needs a value")
  one = _run([LOCAL, "--dry-run", "--devices_per_process", "4", "--backend", "cpu", "--", *TRAIN],
             env={"XLA_FLAGS": ""})
  assert "XLA_FLAGS=--xla_force_host_platform_device_count=4" in _lines(one.stdout)[0]


def test_local_starts_the_processes_and_stops_them_when_one_fails(tmp_path, fakes):
  bin_dir, out = fakes
  workdir = tmp_path / "work"
  train = ["--config", "configs/sft.py:tiny", "--workdir", str(workdir)]
  env = {"FAKE_OUT": str(out)}
  result = _run([LOCAL, "--processes", "2", "--backend", "cpu", "--python",
                 str(bin_dir / "python3"), "--cache", str(tmp_path / "cache"), "--", *train],
                env=env)
  assert result.returncode == 0, result.stderr
  records = _records(out)
  assert sorted(records) == ["0", "1"]
  for i in ("0", "1"):
    assert records[i]["argv"] == ["-m", "robust_u1_jax.train", *train]
    assert records[i]["env"]["JAX_NUM_PROCESSES"] == "2"
    assert records[i]["env"]["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
    assert os.path.exists(workdir / "logs" / f"process_{i}.log")
  # Process 1 fails at once while process 0 would run for a minute: the script stops it and
  # exits with process 1's status.
  start = time.time()
  result = _run([LOCAL, "--processes", "2", "--backend", "cpu", "--python",
                 str(bin_dir / "python3"), "--", *train],
                env={**env, "FAKE_EXIT_1": "3", "FAKE_SLEEP_0": "60"})
  assert result.returncode == 3, (result.stdout, result.stderr)
  assert time.time() - start < 30
  # Named by its number, as its log is (it was named by its pid).
  assert (f"process 1 failed (exit status 3; {workdir / 'logs' / 'process_1.log'})"
          in result.stderr)
  assert "asking the others to stop" in result.stderr
  # Each launch appends to the logs, after a line with the date and command: the failed run's
  # log is kept above the next one's.
  log = (workdir / "logs" / "process_0.log").read_text()
  assert log.count("launch/local.sh, process 0 of 2: ") == 2


def test_local_kills_a_process_that_does_not_stop_after_another_failed(tmp_path, fakes):
  # A process waiting in a collective for the failed one ignored the stop, and the launcher
  # waited for its abort (about 100 s in a helper's run).
  bin_dir, out = fakes
  start = time.time()
  result = _run([LOCAL, "--processes", "2", "--backend", "cpu", "--python",
                 str(bin_dir / "python3"), "--", "--config", "configs/sft.py:tiny", "--workdir",
                 str(tmp_path / "work")],
                env={"FAKE_OUT": str(out), "FAKE_EXIT_1": "3", "FAKE_SLEEP_0": "60",
                     "FAKE_IGNORE_TERM_0": "1", "ROBUST_U1_STOP_GRACE_S": "2"})
  assert result.returncode == 3 and time.time() - start < 30, result.stderr
  assert "killing process 0, still running" in result.stderr
  assert "Killed" not in result.stderr  # bash's own line about its job


def test_local_takes_a_free_port_and_refuses_a_given_one_in_use(tmp_path, fakes):
  # A second run on the port of a running one broke into it: jax.distributed took the newcomers
  # for restarted peers and aborted the first run, losing its steps since the last checkpoint.
  import socket

  bin_dir, out = fakes
  train = ["--", "--config", "configs/sft.py:tiny", "--workdir", str(tmp_path / "work")]
  command = [LOCAL, "--processes", "2", "--backend", "cpu", "--python", str(bin_dir / "python3")]
  with socket.socket() as held, socket.socket() as default:
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    result = _run([*command, "--port", str(port), *train], env={"FAKE_OUT": str(out)})
    assert result.returncode == 2 and not _records(out), result.stderr
    assert result.stderr.startswith(f"error: --port {port} is in use")
    # The default port held here (or by something else already: the same case). SO_REUSEADDR:
    # a run's connections just closed on it (TIME_WAIT) refused the bind while nothing listened,
    # so the launcher found it free and the test failed.
    default.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      default.bind(("127.0.0.1", 12355))
      default.listen()
    except OSError:
      pass
    result = _run([*command, *train], env={"FAKE_OUT": str(out)})
  assert result.returncode == 0, result.stderr
  taken = int(_records(out)["0"]["env"]["JAX_COORDINATOR_ADDRESS"].split(":")[1])
  assert taken != 12355 and f"port 12355 is in use (another run?); the coordinator takes {taken}" \
      in result.stderr


def _as_from_a_terminal():
  """In the launcher's child before exec: Ctrl-C's and SIGTERM's default disposition, unblocked,
  as a shell starts a command. A signal ignored or blocked when bash starts cannot be trapped,
  and in the full suite (-n 2) the launchers' traps never ran in two runs of this session (their
  lines missing, the second Ctrl-C not killing), while these tests passed alone."""
  signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start_in_own_group(command, env, stderr_path, out):
  """Starts a launcher as a terminal would (its own process group, so Ctrl-C can reach every
  process it starts) and returns once both fake trainers run and the launcher has said so.
  stderr goes to a file: the trainers' tee may hold a pipe open after the launcher exits."""
  with open(stderr_path, "w") as err:
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True, preexec_fn=_as_from_a_terminal)
  deadline = time.time() + 60
  # The launcher's line after its loop of starts (and its Ctrl-C trap) too, not the fakes' files
  # alone: a Ctrl-C while that loop still ran would reach tpu_pod.sh before its trap and miss
  # local.sh's last pid.
  ready = re.compile(r"process\(es\) started|logs in .*worker_<i>\.log")
  while time.time() < deadline and not (
      all((out / f"{i}.json").exists() for i in (0, 1))
      and ready.search(stderr_path.read_text())):
    time.sleep(0.1)
  if time.time() >= deadline:
    pytest.fail(f"the launcher had not started both processes after 60 s: "
                f"{stderr_path.read_text()[-2000:]}")
  time.sleep(0.5)  # the fakes' signal handlers are set before they record
  return proc


def _start_local_pair(tmp_path, fakes, save_s: int):
  """launch/local.sh with two fake trainers that run for two minutes and take `save_s` seconds
  to save on a stop, started as a terminal would; returns (launcher, the fakes' output folder)."""
  bin_dir, out = fakes
  env = {**os.environ, "FAKE_OUT": str(out), "FAKE_SLEEP_0": "120", "FAKE_SLEEP_1": "120",
         "FAKE_SAVE_S_0": str(save_s), "FAKE_SAVE_S_1": str(save_s)}
  command = [LOCAL, "--processes", "2", "--backend", "cpu", "--python", str(bin_dir / "python3"),
             "--logs", str(tmp_path / "logs"), "--", "--config", "configs/sft.py:tiny",
             "--workdir", str(tmp_path / "work")]
  return _start_in_own_group(command, env, tmp_path / "stderr", out), out


def test_local_ctrl_c_lets_every_process_save_and_log(tmp_path, fakes):
  proc, out = _start_local_pair(tmp_path, fakes, save_s=2)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the terminal's whole foreground group
  proc.wait(timeout=60)
  assert sorted(p.name for p in out.glob("*.saved")) == ["0.saved", "1.saved"]
  # The trainers' status, not 0 (the run is not finished), and no failure: a stop is no crash.
  stderr = (tmp_path / "stderr").read_text()
  assert proc.returncode == 130 and "failed" not in stderr, stderr
  # Process 0 reports through tee: it must outlive the Ctrl-C, or process 0's next line fails.
  assert "checkpoint saved" in (tmp_path / "logs" / "process_0.log").read_text()


def test_local_a_process_stopped_by_a_signal_is_no_failure(tmp_path, fakes):
  # As a preemption notice to one process: it saves and exits 143, and its peer stops at the
  # same step through JAX's service (here: it ends 3 s later). The launcher neither names a
  # failure nor asks the peer to stop, whose save a kill after the grace time could cut short.
  bin_dir, out = fakes
  env = {**os.environ, "FAKE_OUT": str(out), "FAKE_SLEEP_0": "3", "FAKE_SLEEP_1": "120",
         "FAKE_SAVE_S_0": "1", "FAKE_SAVE_S_1": "1", "ROBUST_U1_STOP_GRACE_S": "1"}
  command = [LOCAL, "--processes", "2", "--backend", "cpu", "--python", str(bin_dir / "python3"),
             "--logs", str(tmp_path / "logs"), "--", "--config", "configs/sft.py:tiny",
             "--workdir", str(tmp_path / "work")]
  proc = _start_in_own_group(command, env, tmp_path / "stderr", out)
  os.kill(_records(out)["1"]["pid"], signal.SIGTERM)
  proc.wait(timeout=60)
  stderr = (tmp_path / "stderr").read_text()
  assert proc.returncode == 143, stderr
  assert "failed" not in stderr and "asking the others" not in stderr
  assert sorted(p.name for p in out.glob("*.saved")) == ["1.saved"]  # process 0 was not stopped


def test_local_second_ctrl_c_kills(tmp_path, fakes):
  # Trainers that would take a minute to save: the second Ctrl-C does not wait for them.
  proc, out = _start_local_pair(tmp_path, fakes, save_s=60)
  start = time.time()
  os.killpg(proc.pid, signal.SIGINT)
  # The second once the launcher has taken the first (two pending SIGINTs are one), and a while
  # after, as a person presses it: sent at once, under load, it went unanswered.
  deadline = time.time() + 30
  while "Ctrl-C again kills" not in (tmp_path / "stderr").read_text() and time.time() < deadline:
    time.sleep(0.05)
  time.sleep(1.5)
  os.killpg(proc.pid, signal.SIGINT)
  proc.wait(timeout=30)
  assert time.time() - start < 20 and proc.returncode == 130
  assert not list(out.glob("*.saved"))
  stderr = (tmp_path / "stderr").read_text()
  assert "Ctrl-C again kills" in stderr and "killing the processes" in stderr
  # The kill it asked for is no failure to report, nor a reason to wait for the others.
  assert "failed" not in stderr and "asking the others" not in stderr, stderr


def _sandbox_worker(tmp_path, command, worker, fake_bin, out, wait_for=None):
  """Runs a worker's --command under bash, as the TPU VM's login shell would: HOME is a fresh
  folder holding ~/robust_u1_jax, `python3` is the fake."""
  home = tmp_path / f"worker_{worker}"
  (home / "robust_u1_jax").mkdir(parents=True, exist_ok=True)
  env = {"HOME": str(home), "PATH": f"{fake_bin}:{os.environ['PATH']}", "FAKE_OUT": str(out),
         "FAKE_WORKER": str(worker)}
  result = _run(["bash", "-c", command], env=env, cwd=home)
  assert result.returncode == 0, result.stderr
  if wait_for:  # a detached trainer
    deadline = time.time() + 30
    while not os.path.exists(wait_for) and time.time() < deadline:
      time.sleep(0.1)
    if not os.path.exists(wait_for):
      pytest.fail(f"the detached trainer wrote no {wait_for} in 30 s")
  return home


@pytest.mark.parametrize("detach", [False, True])
def test_tpu_pod_dry_run_and_what_each_worker_runs(tmp_path, fakes, detach):
  bin_dir, out = fakes
  result = _run([TPU, *TPU_ARGS, "--dry-run", *(["--detach"] if detach else []), "--", *TRAIN])
  assert result.returncode == 0, result.stderr
  text = result.stdout
  assert "gcloud compute tpus tpu-vm describe robust-u1 --zone us-east5-a" in text
  assert ("gcloud compute tpus tpu-vm create robust-u1 --zone us-east5-a --accelerator-type "
          "v5p-32 --version v2-alpha-tpuv5") in text
  assert "git ls-files -co --exclude-standard" in text
  words = [w for w in _lines(text) if w[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
  assert any(w[4] == "scp" and "--worker=all" in w for w in words)
  install = [w for w in words if w[4] == "ssh" and "--worker=all" in w]
  assert install and "pip install -q -e '.[tpu]'" in install[0][install[0].index("--command") + 1]
  runs = [w for w in words if w[4] == "ssh" and any(x[len("--worker="):].isdigit() for x in w)]
  assert len(runs) == 4  # v5p-32: 16 chips, 4 hosts
  for i, run in enumerate(runs):
    assert f"--worker={i}" in run
    command = run[run.index("--command") + 1]
    pid_file = tmp_path / f"worker_{i}" / "robust_u1_jax_logs" / "train.pid"
    home = _sandbox_worker(tmp_path, command, i, bin_dir, out,
                           wait_for=out / f"{i}.json" if detach else None)
    record = _records(out)[str(i)]
    assert record["argv"] == ["-m", "robust_u1_jax.train", *TRAIN]
    assert record["cwd"] == str(home / "robust_u1_jax")
    env = record["env"]
    assert env["ROBUST_U1_DISTRIBUTED"] == "1"
    assert env["JAX_COMPILATION_CACHE_DIR"] == str(home / ".cache" / "robust_u1_jax" / "jit")
    assert env["LIBTPU_INIT_ARGS"].split() == _libtpu_default()
    assert int(pid_file.read_text()) == record["pid"]  # what --stop signals
    if detach:  # outside the checkout, which the next launch's install replaces
      assert (home / "robust_u1_jax_logs" / f"worker_{i}.log").exists()


def _libtpu_default():
  with open(TPU) as f:
    text = f.read()
  block = text.split('LIBTPU_DEFAULT="', 1)[1].split('"', 1)[0]
  return block.replace("\\\n", " ").split()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm {describe,create,scp,ssh} on a fake slice of FAKE_HOSTS workers,
# each a folder FAKE_ROOT/worker_<i> used as its HOME.
echo "gcloud $*" >> "$FAKE_ROOT/gcloud.log"
shift 3  # compute tpus tpu-vm
action="$1"; shift
worker="" command="" format=""
args=()
while (($#)); do
  case "$1" in
    --worker=*) worker="${1#--worker=}"; shift ;;
    --command) command="$2"; shift 2 ;;
    --format=*) format="${1#--format=}"; shift ;;
    --zone|--project|--accelerator-type|--version) shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
workers() { if [[ "$worker" == all ]]; then seq 0 $((FAKE_HOSTS - 1)); else echo "$worker"; fi; }
case "$action" in
  describe)
    if [[ -n "${FAKE_DESCRIBE_ERROR-}" ]]; then echo "ERROR: $FAKE_DESCRIBE_ERROR" >&2; exit 1; fi
    if [[ ! -f "$FAKE_ROOT/created" ]]; then
      echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found" >&2
      exit 1
    fi
    if [[ "$format" == *ipAddress* ]]; then
      seq -s ';' 1 "$FAKE_HOSTS" | sed 's/[0-9][0-9]*/10.0.0.&/g'
    else
      printf '%s\t%s\n' "${FAKE_STATE:-READY}" "${FAKE_TYPE:-v5p-32}"
    fi ;;
  create) touch "$FAKE_ROOT/created" ;;
  scp)
    for i in $(workers); do
      mkdir -p "$FAKE_ROOT/worker_$i"
      cp "${args[0]}" "$FAKE_ROOT/worker_$i/${args[1]#*:}"
    done ;;
  ssh)
    for i in $(workers); do
      mkdir -p "$FAKE_ROOT/worker_$i"
      (cd "$FAKE_ROOT/worker_$i" && HOME="$FAKE_ROOT/worker_$i" FAKE_WORKER="$i" \
        bash -c "$command") || exit $?
    done ;;
esac
"""


def test_tpu_pod_creates_installs_and_runs_on_every_worker(tmp_path, fakes):
  bin_dir, out = fakes
  _script(bin_dir / "gcloud", FAKE_GCLOUD)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path),
         "FAKE_HOSTS": "2", "FAKE_OUT": str(out), "TMPDIR": str(tmp_path)}
  logs = tmp_path / "logs"
  result = _run([TPU, *TPU_ARGS, "--logs", str(logs), "--", *TRAIN], env=env, timeout=300)
  assert result.returncode == 0, (result.stdout, result.stderr)
  calls = (tmp_path / "gcloud.log").read_text()
  assert "tpu-vm create robust-u1" in calls  # describe failed: created
  records = _records(out)
  assert sorted(records) == ["0", "1", "check", "pip_0", "pip_1"]
  # The config was checked here, in the checkout, before the slice was made.
  assert records["check"]["argv"] == ["-m", "robust_u1_jax.train", *TRAIN, "--check_config",
                                     "--check_processes=4"]  # v5p-32: 4 hosts
  assert records["check"]["cwd"] == ROOT
  for i in ("0", "1"):
    assert records[f"pip_{i}"]["argv"] == ["-m", "pip", "install", "-q", "-e", ".[tpu]"]
    checkout = tmp_path / f"worker_{i}" / "robust_u1_jax"
    assert (checkout / "setup.py").exists() and (checkout / "launch" / "tpu_pod.sh").exists()
    assert records[i]["argv"] == ["-m", "robust_u1_jax.train", *TRAIN]
    assert records[i]["env"]["ROBUST_U1_DISTRIBUTED"] == "1"
    assert (logs / f"worker_{i}.log").exists()
  # Run again: the slice is reused; a failing worker is named, the others are asked to stop,
  # and its status is the script's.
  (out / "0.json").unlink()
  result = _run([TPU, *TPU_ARGS, "--no_install", "--logs", str(logs), "--", *TRAIN],
                env={**env, "FAKE_EXIT_1": "4"}, timeout=300)
  assert result.returncode == 4
  assert "reusing TPU robust-u1" in result.stdout
  assert f"worker 1 failed (exit status 4; {logs / 'worker_1.log'})" in result.stderr
  assert "asking every trainer to save and stop" in result.stderr
  assert (tmp_path / "gcloud.log").read_text().count("tpu-vm create") == 1
  # A slice that cannot run the trainers is refused before anything reaches its workers, naming
  # what to do: it reused a preempted Spot slice, or one of another type, and ran ssh on it.
  (out / "0.json").unlink()
  for fake, message in (
      ({"FAKE_STATE": "PREEMPTED"}, "error: TPU robust-u1 is PREEMPTED and cannot run again: "
       "delete it (gcloud compute tpus tpu-vm delete robust-u1 --zone us-east5-a), then"),
      ({"FAKE_STATE": "STOPPED"}, "error: TPU robust-u1 is STOPPED: start it (gcloud compute "
       "tpus tpu-vm start robust-u1 --zone us-east5-a)"),
      ({"FAKE_STATE": "CREATING"}, "error: TPU robust-u1 is CREATING, not READY"),
      ({"FAKE_TYPE": "v5p-64"}, "error: TPU robust-u1 is a v5p-64, not the v5p-32 asked for")):
    result = _run([TPU, *TPU_ARGS, "--no_install", "--logs", str(logs), "--", *TRAIN],
                  env={**env, **fake}, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith(message), result.stderr
    assert not (out / "0.json").exists()
  # A describe that fails for another reason than a missing slice creates none.
  result = _run([TPU, *TPU_ARGS, "--no_install", "--logs", str(logs), "--", *TRAIN],
                env={**env, "FAKE_DESCRIBE_ERROR": "(gcloud.auth) You do not currently have an "
                     "active account selected."}, timeout=300)
  assert result.returncode == 2
  assert (tmp_path / "gcloud.log").read_text().count("tpu-vm create") == 1
  assert result.stderr.startswith("error: gcloud could not describe TPU robust-u1: ERROR: "
                                  "(gcloud.auth) You do not")


def test_tpu_pod_refuses_a_bad_config_before_it_makes_a_slice(tmp_path):
  # The real trainer checks the config here (python3 on PATH is this interpreter's). gcloud only
  # records its calls and fails: FAKE_GCLOUD's ssh would run the install with this interpreter.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "gcloud", '#!/usr/bin/env bash\necho "gcloud $*" >> "$FAKE_ROOT/gcloud.log"\n'
          'exit 1\n')
  os.symlink(sys.executable, bin_dir / "python3")
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path)}
  result = _run([TPU, *TPU_ARGS, "--", *TRAIN, "--config.data.batch_size=-1"], env=env,
                timeout=300)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stderr == ("error: config field data.batch_size = -1 is invalid: allowed a "
                           "positive integer\n")
  assert not (tmp_path / "gcloud.log").exists()
  # Valid on one host, not on the slice's 4: unpacked rows need one text width on every host (the
  # RL stage's bagel_7b variant stopped so on a pod, after the slice was made and installed).
  result = _run([TPU, *TPU_ARGS, "--", *TRAIN[:4]], env=env, timeout=300)
  assert result.returncode == 2, (result.stdout, result.stderr)
  assert result.stderr.startswith("error: a multi-host run of unpacked batches needs "
                                  "data.text_pad_to > 0"), result.stderr
  assert not (tmp_path / "gcloud.log").exists()


def test_tpu_pod_stop_needs_the_name_and_zone_only_and_gcloud_is_checked(tmp_path, fakes):
  # The stop command the script itself prints lacked --accelerator, which --stop required.
  result = _run([TPU, "--name", "robust-u1", "--zone", "us-east5-a", "--stop", "--dry-run"])
  assert result.returncode == 0, result.stderr
  command = _lines(result.stdout)[0]
  assert command[command.index("--command") + 1] == ("kill -TERM $(cat ~/robust_u1_jax_logs/"
                                                     "train.pid) 2>/dev/null || true")
  # Without gcloud: one line (it was bash's 'gcloud: command not found' after '# 1. creating').
  bin_dir, _ = fakes
  for tool in ("bash", "dirname", "sed", "cat"):
    os.symlink(shutil.which(tool), bin_dir / tool)
  for args in (["--stop"], ["--accelerator", "v5p-32", "--", *TRAIN]):
    result = _run(["bash", TPU, "--name", "robust-u1", "--zone", "us-east5-a", *args],
                  env={"PATH": str(bin_dir)})
    assert result.returncode == 2 and result.stderr.startswith("error: gcloud not found"), args


def test_tpu_pod_ctrl_c_returns_after_every_trainer_has_saved(tmp_path, fakes):
  bin_dir, out = fakes
  _script(bin_dir / "gcloud", FAKE_GCLOUD)
  (tmp_path / "created").touch()  # the slice exists
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_ROOT": str(tmp_path),
         "FAKE_HOSTS": "2", "FAKE_OUT": str(out), "FAKE_SLEEP_0": "120", "FAKE_SLEEP_1": "120",
         # Worker 0 saves for longer than worker 1.
         "FAKE_SAVE_S_0": "4", "FAKE_SAVE_S_1": "1"}
  for i in (0, 1):
    (tmp_path / f"worker_{i}" / "robust_u1_jax").mkdir(parents=True)
  proc = _start_in_own_group([TPU, *TPU_ARGS, "--no_install", "--logs", str(tmp_path / "logs"),
                              "--", *TRAIN], env, tmp_path / "stderr", out)
  os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: to the terminal's whole foreground group
  proc.wait(timeout=60)
  stderr = (tmp_path / "stderr").read_text()
  assert "asking every trainer to save and stop" in stderr
  # Both trainers were still saving when the signal came: the script waited for them.
  assert sorted(p.name for p in out.glob("*.saved")) == ["0.saved", "1.saved"], stderr
  assert proc.returncode in (130, 143) and "failed" not in stderr, stderr
  # Worker 0's output still reached its log through tee.
  assert "checkpoint saved" in (tmp_path / "logs" / "worker_0.log").read_text()


def test_gpu_slurm_dry_run(tmp_path):
  result = _run(["bash", SLURM, "--dry-run", "--", *TRAIN])
  assert result.returncode == 0, result.stderr
  lines = _lines(result.stdout)
  install, train = lines
  assert install[:3] == ["srun", "--nodes=1", "--ntasks=1"]
  assert install[-4:] == ["install", "-q", "-e", f"{ROOT}[cuda]"]
  assert train[:3] == ["srun", "--kill-on-bad-exit=1", "--output=logs/slurm/JOBID/task_%t.log"]
  assert "ROBUST_U1_DISTRIBUTED=1" in train and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in train
  assert train[-len(TRAIN) - 3:] == ["python3", "-m", "robust_u1_jax.train", *TRAIN]
  assert "2 node(s) x 8 GPU process(es)" in result.stdout
  per_node = _run(["bash", SLURM, "--dry-run", "--install", "per_node", "--", *TRAIN])
  assert _lines(per_node.stdout)[0][:3] == ["srun", "--ntasks-per-node=1", "--nodes=2"]
  assert _run(["bash", SLURM, "--", *TRAIN]).returncode == 2  # not in a job: use sbatch


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun OPTIONS... COMMAND...: runs COMMAND once (as task 0), options logged.
opts=()
while [[ "$1" == --* ]]; do opts+=("$1"); shift; done
echo "srun ${opts[*]}" >> "$FAKE_OUT/srun.log"
exec "$@"
"""


def test_gpu_slurm_job_installs_and_trains(tmp_path, fakes):
  bin_dir, out = fakes
  _script(bin_dir / "srun", FAKE_SRUN)
  slurm = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_GPUS_ON_NODE": "4", "SLURM_SUBMIT_DIR": ROOT}
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out), **slurm}
  logs = tmp_path / "logs"
  result = _run(["bash", SLURM, "--logs", str(logs), "--cache", str(tmp_path / "cache"), "--",
                 *TRAIN], env=env)
  assert result.returncode == 0, (result.stdout, result.stderr)
  records = _records(out)
  assert records["pip_0"]["argv"] == ["-m", "pip", "install", "-q", "-e", f"{ROOT}[cuda]"]
  assert records["0"]["argv"] == ["-m", "robust_u1_jax.train", *TRAIN]
  job_env = records["0"]["env"]
  assert job_env["ROBUST_U1_DISTRIBUTED"] == "1"
  assert job_env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / "cache")
  assert job_env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  srun = (out / "srun.log").read_text().splitlines()
  assert srun == ["srun --nodes=1 --ntasks=1",
                  f"srun --kill-on-bad-exit=1 --output={logs}/task_%t.log"]
  # Tasks must match GPUs: jax.distributed gives each task one GPU.
  bad = _run(["bash", SLURM, "--", *TRAIN], env={**env, "SLURM_GPUS_ON_NODE": "8"})
  assert bad.returncode == 2 and "--ntasks-per-node=8" in bad.stderr


@pytest.mark.slow  # four interpreters start jax (and libtpu)
def test_the_scripts_flags_are_known_to_xla_and_libtpu():
  """XLA aborts on an unknown XLA_FLAGS entry, libtpu on an unknown LIBTPU_INIT_ARGS one."""
  slurm = _lines(_run(["bash", SLURM, "--dry-run", "--", *TRAIN]).stdout)[1]
  xla_flags = next(w for w in slurm if w.startswith("XLA_FLAGS="))[len("XLA_FLAGS="):]
  check = _run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
               env={"XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"})
  assert check.returncode == 0, check.stderr[-2000:]
  bogus = _run([sys.executable, "-c", "import jax; jax.numpy.zeros(2).block_until_ready()"],
               env={"XLA_FLAGS": "--xla_gpu_no_such_flag=true", "JAX_PLATFORMS": "cpu"})
  assert bogus.returncode != 0  # the check above can fail
  pytest.importorskip("libtpu")
  probe = ("from jax.experimental import topologies; "
           "print(len(topologies.get_topology_desc('v5p:2x2x1', 'tpu').devices))")
  tpu_env = {"JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5p-8",
             "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  check = _run([sys.executable, "-c", probe],
               env={**tpu_env, "LIBTPU_INIT_ARGS": " ".join(_libtpu_default())})
  assert check.returncode == 0 and check.stdout.strip() == "4", check.stderr[-2000:]
  bogus = _run([sys.executable, "-c", probe],
               env={**tpu_env, "LIBTPU_INIT_ARGS": "--xla_tpu_no_such_flag=true"})
  assert bogus.returncode != 0
