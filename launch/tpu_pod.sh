#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice (v4, v5p, v5e, v6e; one process per host): creates the slice or
# reuses it, installs this checkout on every worker, and runs the trainer on all of them at once.
#
#   launch/tpu_pod.sh --name NAME --zone ZONE --accelerator v5p-64 [options] -- \
#       --config configs/sft.py:bagel_7b --workdir /mnt/shared/runs/sft \
#       --config.init_from=/mnt/shared/BAGEL-7B-MoT [--config.field=value ...]
#
# Everything after `--` goes to `python -m robust_u1_jax.train` unchanged. Steps, each printed
# before it runs (--dry-run prints them all and runs nothing, not even gcloud):
#   0. `train --check_config` here checks the config's fields and values before any slice is
#      made (skipped when this machine's python3 cannot import the project; paths are not looked
#      at: they are the workers').
#   1. `gcloud compute tpus tpu-vm describe`: the slice is reused when it exists, is READY and is
#      of the --accelerator type (a preempted or stopped one, or another type, is refused with
#      the command that deletes or starts it), else created (--version: the TPU software
#      version, by default the one for the generation; --spot).
#   2. This checkout (the files git tracks, and untracked ones it does not ignore) is copied to
#      every worker and installed there with `pip install -e ".[tpu]"` (jax 0.10.2 and the libtpu
#      it pins); --no_install skips the step.
#   3. `python -m robust_u1_jax.train` starts on every worker, with
#        ROBUST_U1_DISTRIBUTED=1     jax.distributed.initialize() finds the coordinator, the
#                                    process count and this host's index in the TPU VM metadata
#        JAX_COMPILATION_CACHE_DIR   the persistent compilation cache: give --cache
#                                    gs://BUCKET/jax_cache so every host reads what process 0
#                                    compiled (the default, a directory on each worker, is only
#                                    filled on worker 0: JAX writes the cache from process 0)
#        LIBTPU_INIT_ARGS            the XLA TPU flags below (--libtpu_args replaces them)
#        TPU_STDERR_LOG_LEVEL=2, TPU_MIN_LOG_LEVEL=0  libtpu: errors on stderr, the rest in its
#                                    log files (/tmp/tpu_logs)
#      One log per worker: LOGS/worker_<i>.log on this machine (default logs/tpu/NAME), worker 0's
#      also on the terminal. With --detach the trainers run on under nohup (closing this terminal
#      does not stop them) and log to ~/robust_u1_jax_logs/worker_<i>.log on each worker.
#   A worker that fails is named, and the others are asked to save and stop.
#   Ctrl-C here, or `--stop` later, sends SIGTERM to every trainer: each saves a checkpoint and
#   exits 143 (this script returns when they have, with that status; a second Ctrl-C returns at
#   once); the same command resumes.
#
# The workdir (and init_from) must be one shared path on every worker (a Filestore NFS mount, or
# a bucket mounted with gcsfuse): all hosts write the checkpoint together, process 0 the logs.
#
# LIBTPU_INIT_ARGS defaults (all known to libtpu 0.0.42; tests/test_launch.py checks them):
#   --xla_tpu_enable_async_collective_fusion=true                FSDP's all-gathers and reduce-
#   --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true  scatters run asynchronously,
#   --xla_tpu_enable_async_collective_fusion_multiple_steps=true   fused with and spread over
#   --xla_tpu_overlap_compute_collective_tc=true                   the layers' compute
#   --xla_enable_async_all_gather=true                             (MaxText's FSDP settings)
#   --xla_tpu_enable_data_parallel_all_reduce_opt=true           the gradient all-reduce over a
#   --xla_tpu_data_parallel_opt_different_sized_ops=true           data axis overlaps backprop
#
# Options:
#   --name NAME --zone ZONE --accelerator TYPE   the slice (TYPE: v4-32, v5p-64, v5litepod-16,
#                                                v6e-256, ...); all three required
#   --project P       gcloud project (default: gcloud's)
#   --version V       TPU software version (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5
#                     for v5p, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv6e for v6e)
#   --spot            create the slice on Spot capacity
#   --cache DIR       JAX_COMPILATION_CACHE_DIR on the workers (default ~/.cache/robust_u1_jax/jit)
#   --logs DIR        where the workers' logs go here (default logs/tpu/NAME)
#   --libtpu_args S   LIBTPU_INIT_ARGS instead of the defaults above
#   --workers N       hosts of the slice, for --dry-run (default: from TYPE; a real run asks gcloud)
#   --no_install      skip step 2 (the checkout is already installed on every worker)
#   --detach          start the trainers under nohup and return
#   --stop            send SIGTERM to the trainers of a running job and exit (needs --name and
#                     --zone only; no `--`)
#   --dry-run         print every command, run nothing
set -euo pipefail

LIBTPU_DEFAULT="--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true \
--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true"
REMOTE_DIR='~/robust_u1_jax'  # expanded by the worker's shell

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}
die() {
  echo "error: $*" >&2
  echo "usage: launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE [options] -- \
--config FILE.py:VARIANT --workdir DIR [...]" >&2
  exit 2
}
is_int() { [[ "$1" =~ ^[1-9][0-9]*$ ]]; }
quote() { printf '%q ' "$@" | sed 's/ $//'; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/processes.sh
source "$ROOT/launch/processes.sh"
name="" zone="" accelerator="" project="" version="" spot=0 cache="~/.cache/robust_u1_jax/jit"
logs="" libtpu_args="$LIBTPU_DEFAULT" workers="" install=1 detach=0 stop_job=0 dry_run=0
while (($#)); do
  case "$1" in
    --name) name="${2-}"; shift 2 || die "--name needs a value" ;;
    --zone) zone="${2-}"; shift 2 || die "--zone needs a value" ;;
    --accelerator) accelerator="${2-}"; shift 2 || die "--accelerator needs a value" ;;
    --project) project="${2-}"; shift 2 || die "--project needs a value" ;;
    --version) version="${2-}"; shift 2 || die "--version needs a value" ;;
    --spot) spot=1; shift ;;
    --cache) cache="${2-}"; shift 2 || die "--cache needs a value" ;;
    --logs) logs="${2-}"; shift 2 || die "--logs needs a value" ;;
    --libtpu_args) libtpu_args="${2-}"; shift 2 || die "--libtpu_args needs a value" ;;
    --workers) workers="${2-}"; shift 2 || die "--workers needs a value" ;;
    --no_install) install=0; shift ;;
    --detach) detach=1; shift ;;
    --stop) stop_job=1; shift ;;
    --dry-run|--dry_run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (the trainer's flags go after --)" ;;
  esac
done
train_args=("$@")

[[ -n "$name" ]] || die "--name is required (the TPU VM slice to create or reuse)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || \
  die "--name '$name' is not a valid TPU name (lowercase letters, digits, hyphens)"
[[ -n "$zone" ]] || die "--zone is required (e.g. us-east5-a)"
((dry_run)) || command -v gcloud > /dev/null || \
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) and log in"

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[[ -z "$project" ]] || where+=(--project "$project")
REMOTE_LOGS='~/robust_u1_jax_logs'  # beside the checkout, which each install replaces
# What --stop and a Ctrl-C here run on every worker: the trainer saves and exits.
REMOTE_STOP="kill -TERM \$(cat $REMOTE_LOGS/train.pid) 2>/dev/null || true"

if ((stop_job)); then  # the slice's name and zone are enough
  stop_cmd=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$REMOTE_STOP")
  if ((dry_run)); then quote "${stop_cmd[@]}"; echo; else "${stop_cmd[@]}"; fi
  exit 0
fi

[[ -n "$accelerator" ]] || die "--accelerator is required (e.g. v5p-64)"
[[ "$accelerator" =~ ^(v2|v3|v4|v5p|v5litepod|v5e|v6e)-([1-9][0-9]*)$ ]] || \
  die "--accelerator '$accelerator' is not a TPU type (v4-32, v5p-64, v5litepod-16, v6e-256)"
generation="${BASH_REMATCH[1]}" size="${BASH_REMATCH[2]}"
[[ -z "$workers" ]] || is_int "$workers" || die "--workers must be a positive integer"
logs="${logs:-logs/tpu/$name}"
if [[ -z "$version" ]]; then
  case "$generation" in
    v2|v3|v4) version=tpu-ubuntu2204-base ;;
    v5p) version=v2-alpha-tpuv5 ;;
    v5litepod|v5e) version=v2-alpha-tpuv5-lite ;;
    v6e) version=v2-alpha-tpuv6e ;;
  esac
fi

# shellcheck source=launch/trainer_args.sh
source "$ROOT/launch/trainer_args.sh"
read_trainer_args "${train_args[@]}"
[[ "$config_file" != /* ]] || die "--config $config_file: give it relative to the checkout \
($ROOT), which is copied to the workers"
[[ -f "$ROOT/$config_file" ]] || \
  die "config file $config_file not found in the checkout (give it relative to $ROOT)"
[[ "$workdir" != gs://* ]] || \
  die "--workdir $workdir: mount the bucket on every worker (gcsfuse) and give the mount's path"
[[ "$workdir" == /* ]] || die "--workdir must be an absolute path shared by every worker"

hosts_of() {  # hosts of a slice type: chips per host are 4 (v4, v5p, v5e/v6e beyond 8 chips)
  case "$generation" in
    v2|v3) echo $(( (size + 7) / 8 )) ;;  # TensorCores, 8 a host
    v4|v5p) echo $(( (size / 2 + 3) / 4 )) ;;  # TensorCores, 2 a chip
    *) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;  # chips
  esac
}

# 0. The config's fields and values, checked here before a slice is created or used (the paths it
# names are the workers', checked there), as a run of the slice's hosts reads them (unpacked
# batches need one text width on every host). A machine whose python3 cannot run the project
# skips it.
check=(env PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" python3 -m robust_u1_jax.train
       "${train_args[@]}" --check_config "--check_processes=$(hosts_of)")
echo "# 0. check the config here"
if ((dry_run)); then
  quote "${check[@]}"
  echo
else
  status=0
  said="$(cd "$ROOT" && "${check[@]}" 2>&1)" || status=$?
  if ((status == 2)); then  # a bad config: the trainer's own error line
    grep '^error:' <<< "$said" >&2 || echo "$said" >&2
    exit 2
  elif ((status != 0)); then
    echo "# (not checked: python3 here cannot run robust_u1_jax.train, status $status; the" \
      "workers check it)"
  fi
fi

reuse_or_die() {  # reuse_or_die STATE TYPE: an existing slice runs the trainers only when READY
  local state="$1" type="$2" delete
  delete="$(quote "${gcloud_tpu[@]}" delete "$name" "${where[@]}")"
  # gcloud names v5e slices v5litepod-N; --accelerator takes either.
  [[ "${type/v5litepod-/v5e-}" == "${accelerator/v5litepod-/v5e-}" ]] || die "TPU $name is a \
$type, not the $accelerator asked for: give --accelerator $type, another --name, or delete it \
first ($delete)"
  case "$state" in
    READY) ;;
    PREEMPTED|TERMINATED) die "TPU $name is $state and cannot run again: delete it ($delete), \
then the same command creates it anew and the trainers resume from the workdir's checkpoint" ;;
    STOPPED) die "TPU $name is STOPPED: start it ($(quote "${gcloud_tpu[@]}" start "$name" \
"${where[@]}")), then run this command again" ;;
    *) die "TPU $name is ${state:-in no state gcloud names}, not READY: run this command again \
once it is" ;;
  esac
}

run() {  # prints a step's command, then runs it unless --dry-run
  quote "$@"
  echo
  ((dry_run)) || "$@"
}

# 1. The slice.
describe=("${gcloud_tpu[@]}" describe "$name" "${where[@]}"
          --format='value(state,acceleratorType)')
create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" --accelerator-type "$accelerator"
        --version "$version")
((spot)) && create+=(--spot)
if ((dry_run)); then
  echo "# 1. reuse the slice if it exists, else create it"
  echo "$(quote "${describe[@]}") || $(quote "${create[@]}")"
  workers="${workers:-$(hosts_of)}"
else
  # Its last line is the state and type (warnings may come first); on a failure, what says why.
  if said="$("${describe[@]}" 2>&1)"; then
    read -r state type <<< "$(tail -n 1 <<< "$said")"
    reuse_or_die "$state" "$type"
    echo "# 1. reusing TPU $name ($state, $type)"
  elif grep -qi "not.\{0,1\}found" <<< "$said"; then
    echo "# 1. creating TPU $name ($accelerator, $version)"
    run "${create[@]}"
  else  # another failure (login, project, permission) is no reason to create a slice
    reason="$(grep -v '^\s*$' <<< "$said" | tail -n 1)"
    die "gcloud could not describe TPU $name: ${reason:-no reason given}"
  fi
  endpoints="$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" \
    --format='value(networkEndpoints[].ipAddress)')"
  workers="$(tr ';,' '\n\n' <<< "$endpoints" | grep -c .)"
  ((workers > 0)) || die "gcloud lists no workers for TPU $name"
fi

# 2. The project on every worker.
if ((install)); then
  echo "# 2. copy this checkout to the $workers worker(s) and install it"
  archive="${TMPDIR:-/tmp}/robust_u1_jax_$name.tar.gz"
  if git -C "$ROOT" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
    # Files deleted from the working tree are still in git's index: skipped.
    pack="cd $(quote "$ROOT") && git ls-files -co --exclude-standard | \
while read -r f; do [[ -e \"\$f\" ]] && printf '%s\\0' \"\$f\"; done | \
tar --null -czf $(quote "$archive") -T -"
  else  # not a git checkout: everything but caches and build outputs
    pack="tar -czf $(quote "$archive") -C $(quote "$ROOT") --exclude=.git --exclude=__pycache__ \
--exclude='*.egg-info' --exclude=logs ."
  fi
  echo "$pack"
  ((dry_run)) || bash -c "$pack"
  run "${gcloud_tpu[@]}" scp "$archive" "$name:robust_u1_jax.tar.gz" "${where[@]}" --worker=all
  install_cmd="set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; \
tar xzf ~/robust_u1_jax.tar.gz -C $REMOTE_DIR; cd $REMOTE_DIR; \
python3 -m pip install -q -e '.[tpu]'"
  run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$install_cmd"
fi

# 3. The trainer on every worker.
remote_path() {  # a path for the worker's shell: a leading ~/ becomes its $HOME
  if [[ "$1" == "~/"* ]]; then echo "\"\$HOME\"/$(quote "${1#\~/}")"; else quote "$1"; fi
}
train="env ROBUST_U1_DISTRIBUTED=1 JAX_COMPILATION_CACHE_DIR=$(remote_path "$cache") \
LIBTPU_INIT_ARGS=$(quote "$libtpu_args") TPU_STDERR_LOG_LEVEL=2 TPU_MIN_LOG_LEVEL=0 \
python3 -m robust_u1_jax.train $(quote "${train_args[@]}")"
remote_command() {  # remote_command WORKER -> the shell command worker WORKER runs
  local start="echo \$\$ > $REMOTE_LOGS/train.pid && exec $train"
  if ((detach)); then
    echo "mkdir -p $REMOTE_LOGS && cd $REMOTE_DIR && nohup bash -c $(quote "$start") \
> $REMOTE_LOGS/worker_$1.log 2>&1 < /dev/null &"
  else
    echo "mkdir -p $REMOTE_LOGS && cd $REMOTE_DIR && $start"
  fi
}
echo "# 3. the trainer on the $workers worker(s)$( ((detach)) && echo ", detached")"
pids=()
stop() {
  echo "launch/tpu_pod.sh: asking every trainer to save and stop" >&3
  "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$REMOTE_STOP" || true
}
((dry_run)) || mkdir -p "$logs"
for ((i = 0; i < workers; i++)); do
  ssh_cmd=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" "--worker=$i" --command
           "$(remote_command "$i")")
  if ((detach)); then  # at once on every worker: a slice's last host waits for none before it
    if ((dry_run)); then run "${ssh_cmd[@]}"; else run "${ssh_cmd[@]}" & pids+=("$!"); fi
    continue
  fi
  echo "$(quote "${ssh_cmd[@]}") > $(quote "$logs/worker_$i.log") 2>&1 &"
  ((dry_run)) && continue
  if ((i == 0)); then
    # tee ignores Ctrl-C, which goes to the whole group: worker 0's ssh must keep its output.
    "${ssh_cmd[@]}" > >(trap '' INT TERM; exec tee "$logs/worker_$i.log") 2>&1 &
  else
    "${ssh_cmd[@]}" > "$logs/worker_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
if ((dry_run)); then
  exit 0
fi
if ((detach)); then
  failed=0
  for i in "${!pids[@]}"; do
    wait "${pids[i]}" || { echo "launch/tpu_pod.sh: worker $i did not start" >&2; failed=1; }
  done
  ((failed == 0)) || exit 1
  echo "started; logs: ${gcloud_tpu[*]} ssh $name ${where[*]} --worker=0 --command" \
    "'tail -f $REMOTE_LOGS/worker_0.log'; stop: $0 --name $name ${where[*]} --stop"
  exit 0
fi
interrupts=0
interrupted() {  # the first Ctrl-C asks for a save; a second one stops waiting
  if ((interrupts++)); then
    echo "launch/tpu_pod.sh: not waiting any more; the trainers go on saving (stop them:" \
      "$0 --name $name ${where[*]} --stop)" >&3
    exit 130
  fi
  stop
}
trap interrupted INT TERM
echo "launch/tpu_pod.sh: logs in $logs/worker_<i>.log" >&2
stop_the_others() {  # a failed worker: the others would wait for it in their next collective
  local i
  for i in "${!pids[@]}"; do [[ "${pids[i]}" != "$1" ]] || break; done
  echo "launch/tpu_pod.sh: worker $i failed (exit status $2; $logs/worker_$i.log)" >&3
  ((workers == 1)) || stop
}
wait_all stop_the_others "${pids[@]}" || exit $?
