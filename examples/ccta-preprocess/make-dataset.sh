#!/bin/bash
# Makes the example's dataset (the data owner's side): N synthetic CCTA phantoms (tresor phantom,
# seeds 1..N), all sealed under one new dataset key that the key broker creates and holds.
#   make-dataset.sh DATASETS_DIR BROKER_ADMIN_SOCKET [N] [SIZE] [SPACING]
# Leaves DATASETS_DIR/demo/ccta-phantoms/caseNN/{ccta,labels}.nii.sealed. The phantoms and the
# key file exist only in a private scratch directory, removed at the end.
set -euo pipefail
datasets=$1 socket=$2 n=${3:-3} size=${4:-512x512x256} spacing=${5:-0.39x0.39x0.625}
tresor=${TRESOR_BIN:-tresor}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
chmod 700 "$scratch"
"$tresor" admin --socket "$socket" dataset create demo/ccta-phantoms -o "$scratch/dataset.key" > /dev/null
for i in $(seq 1 "$n"); do
  case=$(printf 'case%02d' "$i")
  "$tresor" phantom -o "$scratch/$case" --seed "$i" --size "$size" --spacing "$spacing" --no-dicom > /dev/null
  mkdir -p "$datasets/demo/ccta-phantoms/$case"
  for f in ccta.nii labels.nii; do
    "$tresor" seal --dataset-key-file "$scratch/dataset.key" --dataset demo/ccta-phantoms \
      -o "$datasets/demo/ccta-phantoms/$case/$f.sealed" "$scratch/$case/$f"
  done
  rm -rf "${scratch:?}/$case"
  echo "make-dataset: $case sealed"
done
