# Sourced by launch/local.sh and launch/tpu_pod.sh: waiting for the processes they started.

# fd 3: the launcher's stderr, for what it says while wait_all runs (its traps, its ON_FAIL):
# wait_all sends fd 2 to /dev/null while it polls.
exec 3>&2

# wait_all ON_FAIL PID...: waits until every PID has exited, polling: a trapped signal (Ctrl-C)
# cuts `wait` short, and a launcher must return only once its trainers have saved and exited.
# A trainer stopped by a signal exits 130 (SIGINT) or 143 (SIGTERM) once its checkpoint is saved
# (robust_u1_jax/training/checkpoint.py, `Stopped`): the others stop at the same step, so that is
# no failure. When the first PID fails (any other non-zero status), runs `ON_FAIL PID STATUS`
# (none when ON_FAIL is "") and later returns that status; else the first stop's status, or 0
# when every PID exited 0.
wait_all() {
  local on_fail="$1" status=0 stopped=0 pid code
  shift
  local running=("$@") still
  while ((${#running[@]})); do
    # A trapped Ctrl-C ends `sleep` with 130: keep waiting (set -e). Bash reports a job killed by
    # a signal ("Killed") while it waits here: the caller reports exits its own way.
    { sleep 1 || true; } 2> /dev/null
    still=()
    for pid in "${running[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
      code=0
      wait "$pid" 2> /dev/null || code=$?  # without bash's "Killed" line: the caller reports
      if ((code == 130 || code == 143)); then
        ((stopped)) || stopped=$code
      elif ((code != 0 && status == 0)); then
        status=$code
        [[ -z "$on_fail" ]] || "$on_fail" "$pid" "$code"
      fi
    done
    running=("${still[@]}")
  done
  ((status)) || status=$stopped
  return "$status"
}
