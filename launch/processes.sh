# Sourced by launch/local.sh and launch/tpu_pod.sh: waiting for the processes they started.

# wait_all ON_FAIL PID...: waits until every PID has exited, polling: a trapped signal (Ctrl-C)
# cuts `wait` short, and a launcher must return only once its trainers have saved and exited.
# When the first PID exits non-zero, runs `ON_FAIL PID STATUS` (none when ON_FAIL is "") and
# later returns that status; 0 when every PID exited 0.
wait_all() {
  local on_fail="$1" status=0 pid code
  shift
  local running=("$@") still
  while ((${#running[@]})); do
    sleep 1 || true  # a trapped Ctrl-C ends `sleep` with 130: keep waiting (set -e)
    still=()
    for pid in "${running[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then still+=("$pid"); continue; fi
      code=0
      wait "$pid" || code=$?
      if ((code != 0 && status == 0)); then
        status=$code
        [[ -z "$on_fail" ]] || "$on_fail" "$pid" "$code"
      fi
    done
    running=("${still[@]}")
  done
  return "$status"
}
