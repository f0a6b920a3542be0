#!/usr/bin/env bash
# The whole REGINA pipeline on one dataset, seven commands in order:
#   fetch -> split -> label -> train-ae -> train-gan -> predict -> evaluate
# Each step is skipped when its output already exists, so running the script again resumes
# where it stopped (an interrupted training run continues from its last checkpoint). A training
# phase that has a checkpoint always runs again with --resume: REGINA then continues it, says
# there is nothing to resume, or refuses it when it was trained with other settings (another
# SEED, LABELS, CONFIG or dataset: set RUN_DIR to a new run), so a rerun never reports an old
# run's results as new ones. Predictions older than phase 2, and an evaluation older than the
# predictions, are made again. Remove predictions.h5ad to predict with another PREDICT_CELLS.
#
#   bash examples/pipeline.sh demo      # simulated screen, no network, CPU is enough
#   bash examples/pipeline.sh norman    # downloads Norman et al. 2019 from GEARS' Dataverse
#   GPUS=4 bash examples/pipeline.sh norman
#   FETCH_FROM=/scratch/norman.zip bash examples/pipeline.sh norman     # node without internet
#   REGINA="apptainer exec --nv REGINA.sif regina" bash examples/pipeline.sh norman
#
# Every setting below can be overridden from the environment.
set -euo pipefail

usage() {
    echo "usage: $0 demo|norman|adamson|dixit|<name>   (settings: see the top of this script)" >&2
    exit 2
}
[[ $# -eq 1 && $1 != -* ]] || usage
NAME=$1

# --- Settings --------------------------------------------------------------------------------
DATA_DIR="${DATA_DIR:-${REGINA_DATA:-data}}"  # datasets: $DATA_DIR/<name>/
RUNS_DIR="${RUNS_DIR:-runs}"                  # trained runs: $RUNS_DIR/<run>/
RUN_DIR="${RUN_DIR:-$RUNS_DIR/$NAME}"         # this pipeline's run
GPUS="${GPUS:-1}"                             # data-parallel processes for training
DEVICE="${DEVICE:-}"                          # cpu or cuda; empty: auto
SPLIT_MODE="${SPLIT_MODE:-simulation}"        # GEARS split mode
SEED="${SEED:-1}"                             # split seed
LABELS="${LABELS:-stress}"                    # stress, cell-cycle or obs:<column>
CONFIG="${CONFIG:-}"                          # config file (see configs/); empty: train-ae uses the
                                              # preset named like the dataset, else sizes the model
MAX_EPOCHS="${MAX_EPOCHS:-}"                  # cap on both training phases; empty: the config's
PREDICT_CELLS="${PREDICT_CELLS:-100}"         # predicted cells per test condition
FETCH_FROM="${FETCH_FROM:-}"                  # local copy (zip, folder, .h5ad) instead of a download
FETCH_ARGS="${FETCH_ARGS:-}"                  # extra fetch options (e.g. the demo's size)
REGINA="${REGINA:-regina}"                    # the command, e.g. "apptainer exec --nv REGINA.sif regina"
TRAIN_LAUNCH="${TRAIN_LAUNCH:-$REGINA}"       # launcher of the two training steps (Slurm: torchrun)

export REGINA_DATA="$DATA_DIR"
SPLIT="${SPLIT_MODE}_${SEED}"
if [[ $SPLIT_MODE == no_test ]]; then  # known before anything trains
    echo "pipeline: SPLIT_MODE=no_test leaves no test conditions to predict and evaluate; pick another mode" >&2
    exit 2
fi
DATASET="$DATA_DIR/$NAME"

# --- Commands and options shared by the steps ------------------------------------------------------
read -r -a regina <<< "$REGINA"
read -r -a train_launch <<< "$TRAIN_LAUNCH"
read -r -a fetch_opts <<< "$FETCH_ARGS"
[[ -n $FETCH_FROM ]] && fetch_opts+=(--from "$FETCH_FROM")
device_opts=()
[[ -n $DEVICE ]] && device_opts+=(--device "$DEVICE")
train_opts=(--gpus "$GPUS" "${device_opts[@]}")
[[ -n $MAX_EPOCHS ]] && train_opts+=(--max-epochs "$MAX_EPOCHS")
config_opts=()
[[ -n $CONFIG ]] && config_opts+=(--config "$CONFIG")

# Slurm's time limit or pre-emption sends SIGTERM to every process of the job step: let the
# running step save its state and exit, then stop here (running the script again resumes).
trap 'echo "pipeline: SIGTERM, stopping once the current step has saved its state" >&2; exit 143' TERM

# finished OUTPUT: the step writing OUTPUT completed (files are written atomically, so existing
# means complete). An empty OUTPUT never is: the training steps always run (see the top).
finished() {
    [[ -n $1 && -e $1 ]]
}

step_number=0
# step TITLE OUTPUT INPUT COMMAND...: run COMMAND unless OUTPUT shows the step already finished
# and is newer than INPUT (empty: no such input), the file it was made from.
step() {
    local title=$1 output=$2 input=$3
    shift 3
    step_number=$((step_number + 1))
    printf '\n==> [%d/7] %s\n' "$step_number" "$title"
    if finished "$output" && [[ -z $input || $output -nt $input ]]; then
        echo "    skipped: done already ($output)"
        return
    fi
    echo "    \$ $*"
    local started=$SECONDS
    "$@"
    echo "    done in $((SECONDS - started)) s${output:+ -> $output}"
}

# resume_opt PHASE_DIR: --resume when the phase has a checkpoint (interrupted, or finished: then
# REGINA checks that it was trained with these settings and writes nothing).
resume_opt() {
    [[ -e $1/last.pt ]] && echo --resume
    return 0
}

echo "REGINA pipeline: dataset $NAME, data in $DATA_DIR, run in $RUN_DIR, split $SPLIT, labels $LABELS"
[[ -n $CONFIG ]] && echo "config: $CONFIG"

step "fetch $NAME" "$DATASET/perturb_processed.h5ad" "" \
    "${regina[@]}" fetch "$NAME" "${fetch_opts[@]}"
step "split $NAME ($SPLIT)" "$DATASET/splits/$SPLIT.json" "" \
    "${regina[@]}" split "$NAME" --mode "$SPLIT_MODE" --seed "$SEED"
step "label cells ($LABELS)" "$DATASET/labels/${LABELS//[:\/]/_}@$SPLIT.csv" "" \
    "${regina[@]}" label "$NAME" --method "$LABELS" --split "$SPLIT"
step "train phase 1: autoencoder" "" "" \
    "${train_launch[@]}" train-ae "$NAME" --split "$SPLIT" --labels "$LABELS" --run "$RUN_DIR" \
    "${config_opts[@]}" "${train_opts[@]}" $(resume_opt "$RUN_DIR/ae")
step "train phase 2: latent cycle-GAN" "" "" \
    "${train_launch[@]}" train-gan --run "$RUN_DIR" "${train_opts[@]}" $(resume_opt "$RUN_DIR/gan")
step "predict the test conditions" "$RUN_DIR/predictions.h5ad" "$RUN_DIR/gan/meta.json" \
    "${regina[@]}" predict --run "$RUN_DIR" --conditions test --cells "$PREDICT_CELLS" \
    "${device_opts[@]}"
step "evaluate against the held-out cells and baselines" "$RUN_DIR/eval/metrics.json" "$RUN_DIR/predictions.h5ad" \
    "${regina[@]}" evaluate "$NAME" --predictions "$RUN_DIR/predictions.h5ad" --split "$SPLIT" --out "$RUN_DIR/eval" \
    "${device_opts[@]}"

echo
echo "Finished in ${SECONDS} s. Results in $RUN_DIR/eval/:"
echo "    metrics.json        metrics by test subgroup, for the model and each baseline"
echo "    per_condition.csv   one row per test condition and model"
for plot in "$RUN_DIR"/eval/plots/*.png; do
    [[ -e $plot ]] && echo "    plots/$(basename "$plot")"
done
echo "Predicted cells: $RUN_DIR/predictions.h5ad. Trained phases: $RUN_DIR/ae/, $RUN_DIR/gan/"
