#!/bin/bash
# A confidential training job: the sealed CCTA phantoms of examples/ccta-preprocess are prepared
# in the job's private memory, the coronary 3D U-Net is trained on all cases but the last and
# validated on the last, and the checkpoint, metrics and PNGs come back sealed to you.
# Submit with `sbatch train-job.sh` (README.md); CPU reference trainer (the GPU trainer is to come).
# TRAIN_RANKS=N trains data-parallel on N ranks inside the job (one process each, sharing the
# job's cores; docs/training.md §5): the same weights as one rank, up to rounding.
# As a step of several tasks (srun -n N, each task in its own sandbox or VM) with
# TRESOR_STEP_ROSTER=1, the tasks are the ranks: each agent claims its task's rank with a link key
# drawn in private memory, the broker hands the step's roster to attested tasks only, and the
# ranks' links are TLS pinned to those keys (docs/training.md §5.4).
# TRAIN_DEVICE=cuda trains on the job's GPU (one per rank; submit with --gres=gpu:N), cpu (the
# default) on the reference trainer, emulated on the GPU trainer's CPU emulation (slow; tests).
#SBATCH --job-name=coronary-unet
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=2
#SBATCH --tresor-dataset=demo/ccta-phantoms
#SBATCH --tresor-output=coronary-unet-results
set -eu
dataset=${TRESOR_DATASET_ID:-demo/ccta-phantoms}
tresor=${TRESOR_BIN:-tresor}
work=$TMPDIR/coronary-unet   # private memory, gone with the job
mkdir -p "$work"
case "${TRAIN_DEVICE:-cpu}" in
  cpu) prep_device=cpu ;;
  emulated) prep_device=emulated ;;
  *) prep_device=auto ;;
esac
if [ "${TRESOR_INPUTS:-opened}" = sealed ]; then
  # Submitted with TRESOR_INPUTS=sealed (docs/user-guide.md §5.1a): the phantoms stay sealed. On a
  # GPU, tresor prep opens each case in device memory and seals its outputs there to a key made
  # for this job, and the trainer's GPU data loader opens those in device memory again: the CT
  # volumes are never decrypted by the CPU.
  job_recipient=$("$tresor" keygen -o "$work/job.identity" | head -n 1)
  prep_inputs=("$TRESOR_SEALED_DATA/$dataset" --file-keys "$TRESOR_FILE_KEYS" -r "$job_recipient")
  train_keys=(-i "$work/job.identity")
else
  prep_inputs=("$TRESOR_DATA/$dataset")
  train_keys=()
fi
"$tresor" prep "${prep_inputs[@]}" -o "$work/prepared" --spacing 1.0 --sigmas 1,2 --no-preview \
  --device "$prep_device" --threads "${SLURM_CPUS_PER_TASK:-0}"
cases=$(cd "$work/prepared" && ls -d */ | tr -d /)
n=$(echo "$cases" | wc -l)
if [ "$n" -lt 2 ]; then echo "coronary-unet: need at least 2 cases, found $n" >&2; exit 2; fi
train=$(echo "$cases" | head -n $((n - 1)) | sed 's/.*/"prepared\/&"/' | paste -sd, -)
val=$(echo "$cases" | tail -n 1 | sed 's/.*/"prepared\/&"/')
if [ -n "${TRESOR_ROSTER:-}" ]; then
  # The agent gave this task its step's roster: one rank per task, ranks from Slurm.
  ranks=$SLURM_NTASKS
  per_task=1
  rank_args=()
else
  # Ranks inside the job, meeting in its private directory.
  ranks=${TRAIN_RANKS:-1}
  per_task=$ranks
  rank_args=(--ranks "$ranks" --rendezvous "$work")
fi
cat > "$work/train.toml" <<TOML
[model]
levels = 3
base_channels = ${UNET_BASE_CHANNELS:-4}
max_channels = 32
deep_supervision = ${UNET_DEEP_SUPERVISION:-true}

[data]
train = [$train]
validation = [$val]

[training]
steps = ${TRAIN_STEPS:-300}
batch = 2
patch = 24
optimizer = "adamw"
lr = 0.01
validate_every = ${TRAIN_VALIDATE_EVERY:-50}
threads = $(( ${SLURM_CPUS_PER_TASK:-2} / per_task > 0 ? ${SLURM_CPUS_PER_TASK:-2} / per_task : 1 ))

[output]
dir = "$TRESOR_OUTPUT_DIR"
TOML
echo "coronary-unet: $((n - 1)) training case(s), 1 validation case, $ranks rank(s) on ${TRAIN_DEVICE:-cpu} (inputs ${TRESOR_INPUTS:-opened})${TRESOR_ROSTER:+, rank ${SLURM_PROCID} on the roster of the step}"
"$tresor" train --config "$work/train.toml" "${rank_args[@]}" --device "${TRAIN_DEVICE:-cpu}" "${train_keys[@]}"
echo "coronary-unet: done"
