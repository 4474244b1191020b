#!/bin/bash
# A confidential preprocessing job: every CT case of a sealed dataset becomes isotropic z-scored
# volumes, vesselness, labels, previews and training patches, sealed to you when the job ends.
# Submit with `sbatch prep-job.sh` (see README.md); the options below can be overridden on the
# sbatch command line (--tresor-dataset=…, --tresor-output=…).
#SBATCH --job-name=ccta-prep
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=2
#SBATCH --tresor-dataset=demo/ccta-phantoms
#SBATCH --tresor-output=ccta-prep-results
set -eu
# Inside the job: the dataset decrypted in private memory under $TRESOR_DATA, results go to
# $TRESOR_OUTPUT_DIR (sealed to you afterwards). Print counts and progress only: the job's
# standard output is written in the clear.
#
# Submitted with TRESOR_INPUTS=sealed in its environment (`TRESOR_INPUTS=sealed sbatch …`), the
# agent leaves the inputs sealed ($TRESOR_SEALED_DATA) and gives the job their file keys
# ($TRESOR_FILE_KEYS): on a GPU, tresor prep then takes each case through the secure channel and
# the CPU never decrypts it. PREP_DEVICE picks the device (auto: a GPU where there is one).
dataset=${TRESOR_DATASET_ID:-demo/ccta-phantoms}
tresor=${TRESOR_BIN:-tresor}
if [ "${TRESOR_INPUTS:-opened}" = sealed ]; then
  inputs=("$TRESOR_SEALED_DATA/$dataset" --file-keys "$TRESOR_FILE_KEYS")
else
  inputs=("$TRESOR_DATA/$dataset")
fi
echo "ccta-prep: $(ls "${inputs[0]}" | wc -l) entries in $dataset (inputs ${TRESOR_INPUTS:-opened})"
"$tresor" prep "${inputs[@]}" -o "$TRESOR_OUTPUT_DIR" --device "${PREP_DEVICE:-auto}" \
  --spacing "${PREP_SPACING:-0.5}" --patches "${PREP_PATCHES:-8}" --patch-size "${PREP_PATCH_SIZE:-64x64x64}" \
  --threads "${SLURM_CPUS_PER_TASK:-0}"
echo "ccta-prep: done"
