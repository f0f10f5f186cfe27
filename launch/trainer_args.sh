# Sourced by the launchers (local.sh, tpu_pod.sh, gpu_slurm.sbatch): the trainer's flags after --.

# read_trainer_args ARG...: sets `config`, `config_file` (config without its :VARIANT) and
# `workdir` from the trainer's --config and --workdir (either as --flag=value or --flag value),
# so a launcher checks them before anything starts; dies (the launcher's `die`) if one is missing.
read_trainer_args() {
  local args=("$@") i
  config="" workdir=""
  for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
      --config=*) config="${args[i]#--config=}" ;;
      --config) config="${args[i+1]-}" ;;
      --workdir=*) workdir="${args[i]#--workdir=}" ;;
      --workdir) workdir="${args[i+1]-}" ;;
    esac
  done
  [[ -n "$config" ]] || die "the trainer needs --config FILE.py:VARIANT after --"
  [[ -n "$workdir" ]] || die "the trainer needs --workdir DIR after --"
  config_file="${config%%:*}"
}
