#!/usr/bin/env bash
# Trains on one machine, any backend (CPU, one or more GPUs, a single-host TPU VM).
#
#   launch/local.sh [options] -- --config configs/sft.py:tiny --workdir /tmp/robust_u1/sft \
#       [--config.field=value ...]
#
# Everything after `--` goes to `python -m robust_u1_jax.train` unchanged. With --processes N > 1
# it starts N processes on localhost joined through jax.distributed (JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES, JAX_PROCESS_ID, read by robust_u1_jax.data.multihost), each reading its own
# slice of the data: on CPU, a rehearsal of a multi-host run with fake devices (it computes what
# one process does: tests/test_multihost_processes.py); on GPUs, one process per group of GPUs.
#
# Options:
#   --processes N            processes (default 1)
#   --devices_per_process K  CPU: fake devices per process (default 4 when N > 1, 1 for one
#                            process); GPU: GPUs per process when N > 1 (default: all GPUs / N)
#   --backend B              cpu | gpu | tpu | auto (default auto: what jax finds)
#   --port P                 coordinator port on localhost when N > 1 (default 12355, or the
#                            next free one when another run holds it); a given port in use is
#                            refused
#   --cache DIR              persistent compilation cache (default ~/.cache/robust_u1_jax/jit):
#                            a re-run skips compiling
#   --logs DIR               one log per process, process_<i>.log (default WORKDIR/logs); each
#                            launch appends to it after a line with the date and command
#   --python PY              the interpreter (default $PYTHON or python3)
#   --dry-run                print the environment and commands, run nothing
#
# Ctrl-C (or SIGTERM) is passed on: every process saves a checkpoint and stops, and the script
# exits as they do (not 0: the run is not finished): 130 for a terminal's Ctrl-C, which reaches
# every process, 143 for a SIGTERM, or a SIGINT sent to the script alone (passed on as SIGTERM);
# re-running the same command resumes. A second Ctrl-C kills them (no checkpoint; exit 130). When one process fails, the
# others are asked to stop, and killed if they still run 20 s later (ROBUST_U1_STOP_GRACE_S; a
# step waiting for the failed process never ends, nor does a save); re-running resumes from the
# last checkpoint.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}
die() {
  echo "error: $*" >&2
  echo "usage: launch/local.sh [options] -- --config FILE.py:VARIANT --workdir DIR [...]" >&2
  exit 2
}
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
# needs OPTION VALUE: an option's value, not the next option (`--processes -- ...`)
needs() { [[ -n "${2-}" && "${2-}" != --* ]] || die "$1 needs a value"; }
port_in_use() { (exec 3<> "/dev/tcp/127.0.0.1/$1") 2> /dev/null; }
GRACE_S="${ROBUST_U1_STOP_GRACE_S:-20}"  # how long the others may take to stop after a failure

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/processes.sh
source "$ROOT/launch/processes.sh"
processes=1 devices="" backend=auto port="" cache="${HOME}/.cache/robust_u1_jax/jit"
logs="" python="${PYTHON:-python3}" dry_run=0
while (($#)); do
  case "$1" in
    --processes) needs "$@"; processes="$2"; shift 2 ;;
    --devices_per_process) needs "$@"; devices="$2"; shift 2 ;;
    --backend) needs "$@"; backend="$2"; shift 2 ;;
    --port) needs "$@"; port="$2"; shift 2 ;;
    --cache) needs "$@"; cache="$2"; shift 2 ;;
    --logs) needs "$@"; logs="$2"; shift 2 ;;
    --python) needs "$@"; python="$2"; shift 2 ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the trainer's flags go after --)" ;;
  esac
done
train_args=("$@")

is_int "$processes" || die "--processes must be a positive integer, got '$processes'"
[[ -z "$devices" ]] || is_int "$devices" || \
  die "--devices_per_process must be a positive integer, got '$devices'"
[[ -z "$port" ]] || { is_int "$port" && ((port < 65536)); } || \
  die "--port must be a port number, got '$port'"
case "$backend" in cpu|gpu|tpu|auto) ;; *) die "--backend must be cpu, gpu, tpu or auto" ;; esac
if ((processes > 1)); then
  [[ "$backend" != tpu ]] || \
    die "a TPU VM runs one process per host; for a multi-host slice use launch/tpu_pod.sh"
  [[ "$backend" != auto ]] || die "--processes $processes needs --backend cpu or gpu"
elif [[ -n "$devices" && "$backend" != cpu ]]; then
  die "--devices_per_process with one process sets fake devices: give --backend cpu (one process \
uses every GPU it sees)"
fi

# The trainer's --config and --workdir, checked here so a typo fails before anything starts.
# shellcheck source=launch/trainer_args.sh
source "$ROOT/launch/trainer_args.sh"
read_trainer_args "${train_args[@]}"
[[ -f "$config_file" ]] || die "config file $config_file not found (paths are relative to $PWD)"
[[ ! -e "$workdir" || -d "$workdir" ]] || die "--workdir $workdir: a file, not a folder"
logs="${logs:-$workdir/logs}"
[[ ! -e "$logs" || -d "$logs" ]] || die "--logs $logs: a file, not a folder"
[[ ! -e "$cache" || -d "$cache" ]] || die "--cache $cache: a file, not a folder"
command -v "$python" > /dev/null || die "--python $python: no such interpreter"

if ((processes > 1)) && [[ -z "$devices" ]]; then
  if [[ "$backend" == cpu ]]; then
    devices=4
  elif command -v nvidia-smi > /dev/null; then
    gpus="$(nvidia-smi -L | grep -c '^GPU')"
    ((gpus % processes == 0 && gpus > 0)) || \
      die "$gpus GPUs do not split over $processes processes: give --devices_per_process"
    devices=$((gpus / processes))
  else
    die "no nvidia-smi to count the GPUs: give --devices_per_process"
  fi
fi

# The coordinator's port: a second run on the port of a running one would break into its
# processes (jax.distributed reads the newcomers as restarted peers and aborts the run).
if ((processes > 1)); then  # in a dry run too: it prints the port the run would take
  if [[ -n "$port" ]]; then
    ! port_in_use "$port" || die "--port $port is in use (another run's coordinator?): give \
another --port, or leave it out to take a free one"
  else
    port=12355
    while port_in_use "$port"; do
      ((++port <= 12455)) || die "ports 12355 to 12455 are all in use: give --port"
    done
    ((port == 12355)) || \
      echo "launch/local.sh: port 12355 is in use (another run?); the coordinator takes $port" >&2
  fi
fi
port="${port:-12355}"

# Environment of every process. The package is installed (pip install -e .); the checkout also
# works without installing.
common_env=("JAX_COMPILATION_CACHE_DIR=$cache" "PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}")
[[ "$backend" == auto ]] || common_env+=("JAX_PLATFORMS=$backend")
process_env() {  # process_env INDEX -> the variables of process INDEX, one per line
  local i="$1"
  printf '%s\n' "${common_env[@]}"
  if ((processes > 1)); then
    printf '%s\n' "JAX_COORDINATOR_ADDRESS=localhost:$port" "JAX_NUM_PROCESSES=$processes" \
      "JAX_PROCESS_ID=$i"
    if [[ "$backend" == gpu && -n "$devices" ]]; then
      local ids=() d
      for ((d = i * devices; d < (i + 1) * devices; d++)); do ids+=("$d"); done
      echo "JAX_LOCAL_DEVICE_IDS=$(IFS=,; echo "${ids[*]}")"
    fi
  fi
  if [[ "$backend" == cpu && -n "$devices" ]]; then  # this count replaces one in XLA_FLAGS
    local flags
    flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g; s/  +/ /g; s/^ | $//g' \
      <<< "${XLA_FLAGS-}")"
    echo "XLA_FLAGS=${flags:+$flags }--xla_force_host_platform_device_count=$devices"
  fi
}
command_line=("$python" -m robust_u1_jax.train "${train_args[@]}")

if ((dry_run)); then
  echo "# launch/local.sh: $processes process(es), backend $backend, logs in $logs"
  for ((i = 0; i < processes; i++)); do
    mapfile -t env_i < <(process_env "$i")
    printf 'env'
    printf ' %q' "${env_i[@]}" "${command_line[@]}"
    printf ' > %q 2>&1\n' "$logs/process_$i.log"
  done
  exit 0
fi

mkdir -p "$logs" "$cache"
pids=()
stop() {  # passes a stop request on: the trainer saves and exits
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
interrupts=0
interrupted() {  # the first Ctrl-C asks for a save; a second one kills
  if ((interrupts++)); then
    echo "launch/local.sh: killing the processes (no checkpoint)" >&3
    for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  else
    echo "launch/local.sh: asking every process to save and stop (Ctrl-C again kills)" >&3
    stop
  fi
}
trap interrupted INT TERM
for ((i = 0; i < processes; i++)); do
  mapfile -t env_i < <(process_env "$i")
  # A re-run appends: the log of the run that failed stays above the one that resumes it.
  printf '\n# %s launch/local.sh, process %d of %d:%s\n' "$(date '+%F %T')" "$i" "$processes" \
    "$(printf ' %q' "${command_line[@]}")" >> "$logs/process_$i.log"
  if ((i == 0)); then  # process 0 reports progress: on the terminal and in its log
    # tee ignores Ctrl-C: the signal goes to the whole group, and process 0 must still report
    # its save (a dead tee would fail its next line).
    env "${env_i[@]}" "${command_line[@]}" \
      > >(trap '' INT TERM; exec tee -a "$logs/process_$i.log") 2>&1 &
  else
    env "${env_i[@]}" "${command_line[@]}" >> "$logs/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
echo "launch/local.sh: ${#pids[@]} process(es) started, logs in $logs" >&2
number_of() {  # number_of PID -> the process's number (its log's)
  local i
  for i in "${!pids[@]}"; do [[ "${pids[i]}" != "$1" ]] || echo "$i"; done
}
stop_the_others() {
  local i others=() pid
  ((interrupts < 2)) || return 0  # killed as the second Ctrl-C asked: no failure to report
  i="$(number_of "$1")"
  echo "launch/local.sh: process $i failed (exit status $2; $logs/process_$i.log)" >&3
  for pid in "${pids[@]}"; do [[ "$pid" == "$1" ]] || others+=("$pid"); done
  ((${#others[@]})) || return 0
  echo "launch/local.sh: asking the others to stop; those still running in ${GRACE_S} s are \
killed" >&3
  stop
  (  # in the background: wait_all goes on collecting exits meanwhile
    sleep "$GRACE_S" < /dev/null > /dev/null 2>&1  # holds no pipe of the caller's
    for pid in "${others[@]}"; do
      if kill -0 "$pid" 2> /dev/null; then
        echo "launch/local.sh: killing process $(number_of "$pid"), still running" >&3
        kill -KILL "$pid" 2> /dev/null || true
      fi
    done
  ) &
  killer=$!
}
killer=""
status=0
wait_all stop_the_others "${pids[@]}" || status=$?
[[ -z "$killer" ]] || kill "$killer" 2> /dev/null || true
((interrupts < 2)) || exit 130  # as a shell reports the Ctrl-C that ended it
exit "$status"
