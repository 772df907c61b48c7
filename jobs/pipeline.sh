#!/bin/bash
# Submit the whole DualPM preparation and training as dependent Slurm jobs; print their ids.
#
#   jobs/pipeline.sh SRC OUT CONFIG RUN_DIR
#
# Jobs, each starting only when the one before succeeded (--dependency=afterok; a failure cancels
# the rest): [synth ->] render -> features -> train. Every prep job verifies what it wrote.
# Prints one "STAGE JOBID" line per job. Options come from the environment (see jobs/README.md).

# ---- Defaults: every one can be overridden by setting the variable when calling ---------------
DUALPM_SYNTH_ARGS=${DUALPM_SYNTH_ARGS:-}                    # non-empty: generate SRC first, e.g. "--num-samples 10000"
DUALPM_RENDER_ARGS=${DUALPM_RENDER_ARGS:---resolution 160 --layers 8}
DUALPM_FEATURES_ARGS=${DUALPM_FEATURES_ARGS:---extractor sd-dino}  # + --sd-model/--dino-model or their env vars
DUALPM_TRAIN_ARGS=${DUALPM_TRAIN_ARGS:-}                    # extra dualpm-train options, e.g. "--set train.steps=50000"
DUALPM_SBATCH_ARGS=${DUALPM_SBATCH_ARGS:-}                  # sbatch options for every job, e.g. "--account=myproject"
DUALPM_PREP_SBATCH_ARGS=${DUALPM_PREP_SBATCH_ARGS:-}        # ... for the prep jobs only
DUALPM_TRAIN_SBATCH_ARGS=${DUALPM_TRAIN_SBATCH_ARGS:-}      # ... for the training job only
# ------------------------------------------------------------------------------------------------

set -euo pipefail

if [[ $# -ne 4 ]]; then
  echo "usage: jobs/pipeline.sh SRC OUT CONFIG RUN_DIR" >&2
  exit 2
fi
src=$1 out=$2 config=$3 run_dir=$4
jobs_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck disable=SC2206  # the *_ARGS variables are lists of options, split on purpose
common=($DUALPM_SBATCH_ARGS --parsable --kill-on-invalid-dep=yes)
# shellcheck disable=SC2206
prep=(sbatch "${common[@]}" $DUALPM_PREP_SBATCH_ARGS)

after=()      # the dependency on the job submitted last
submitted=()  # ids so far: if a later submission fails (bad option, ...) they are cancelled, not left
trap 'if (($? != 0 && ${#submitted[@]} > 0)); then
  echo "pipeline.sh: a submission failed: cancelling ${submitted[*]}" >&2; scancel "${submitted[@]}"; fi' EXIT
submit() {  # submit STAGE SBATCH_COMMAND...: print "STAGE ID", make the next job depend on it
  local stage=$1 id
  shift
  id=$("$@" | cut -d';' -f1)  # --parsable prints "id" or "id;cluster"
  submitted+=("$id")
  echo "$stage $id"
  after=(--dependency=afterok:"$id")
}
# shellcheck disable=SC2086  # the stage arguments are split on purpose
{
  if [[ -n $DUALPM_SYNTH_ARGS ]]; then
    submit synth "${prep[@]}" "$jobs_dir/prep.sbatch" synth "$src" $DUALPM_SYNTH_ARGS
  fi
  submit render "${prep[@]}" "${after[@]}" "$jobs_dir/prep.sbatch" \
    render "$src" "$out" $DUALPM_RENDER_ARGS :: verify "$out" --column render
  submit features "${prep[@]}" "${after[@]}" "$jobs_dir/prep.sbatch" \
    features "$src" "$out" $DUALPM_FEATURES_ARGS :: verify "$out"
  submit train sbatch "${common[@]}" $DUALPM_TRAIN_SBATCH_ARGS "${after[@]}" "$jobs_dir/train.sbatch" \
    "$config" "$out" "$run_dir" $DUALPM_TRAIN_ARGS
}
