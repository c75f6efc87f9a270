#!/usr/bin/env bash
# Distil rinna/japanese-gpt2-medium into a 6-layer student.
#
#   bash run_distill.sh [TRAIN_PY_ARGS...]            the full recipe on one 4-GPU node (torchrun)
#   bash run_distill.sh --demo [--force] [OUT_DIR]    offline end-to-end demo on the shipped sample, CPU, < 5 min
#
# Full recipe: the hyperparameters are train.py's defaults (examples/distillation/config.py, RECIPE;
# `python examples/distillation/train.py --help` lists them). This script passes only the inputs
# (DATA, TEACHER, STUDENT_CONFIG), the topology, and the settings set in the environment, e.g.
#   N_GPU=8 DATA=data/binarized DUMP_PATH=checkpoints/run1 PRECISION=fp16 bash run_distill.sh
#   ALPHA_CE=3 LEARNING_RATE=3e-4 bash run_distill.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_distill.sh      (then NODE_RANK=1 on the other node)
#   SHARD_TEACHER=1 bash run_distill.sh                                 (a teacher too large for one GPU)
#   N_GPU=0 [NPROC=2] bash run_distill.sh                               (the CPU: NPROC processes, default 1)
# Extra arguments go to train.py last, unchanged (they win over everything here).
# A recipe file (--config FILE.yaml among them, see recipes/) names the inputs itself: N_GPU, DATA, TEACHER
# and STUDENT_CONFIG are then passed (and override the file) only when set in the environment:
#   bash run_distill.sh --config recipes/rinna-medium-6l-4gpu.yaml
#
# Paths: the script runs from any folder and never changes folder. Every relative path is relative to the
# folder you run it from: those in the environment (DATA, EVAL_DATA, DUMP_PATH, STUDENT_CONFIG, STUDENT_INIT,
# a local TEACHER), the demo's OUT_DIR, those among the extra arguments, and the defaults data/binarized,
# checkpoints/demo and train.py's --dump_path (checkpoints/distilgpt2-ja). Only shipped files (the scripts,
# the default STUDENT_CONFIG, the demo's sample and configs) are taken from this repository.
#
# Before launching, the inputs are checked; a refusal is one line `error: ...` on stderr and exit 1 (missing
# DATA) or 2 (anything else). When a worker fails anyway, its own last `error: ...` line is printed again
# after torchrun's report, and the exit status is torchrun's.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python}    # runs the demo's commands and counts the GPUs (the tests point it at a stub)

die() {  # die STATUS MESSAGE...: the one error line (the words joined by spaces), then exit
    local status=$1
    shift
    echo "error: $*" >&2
    exit "$status"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
    exit 0
fi

# ---- demo ------------------------------------------------------------------------------------------
# What the demo writes in OUT_DIR (a folder it marks as its own first); a rerun replaces these, nothing else.
DEMO_ENTRIES=(tokenizer data teacher student_kd student_no_kd perplexity.json results.json curves.png export)

# outputs ARGS...: distil_ja.outputs, the deletion rule every command follows (one line and exit 2 when it refuses)
outputs() {
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m distil_ja.outputs "$@" > /dev/null || exit 2
}

# The demo writes into a new or empty folder or a previous output of this toolkit (a rerun replaces the demo's
# entries there, --force everything). A folder it did not write is refused, --force or not, and so are the
# repository, the home folder, the current folder and the folders above them. Checked before anything runs.
check_demo_dir() {  # check_demo_dir OUT
    outputs "$1" --replace --what "demo output"
}

run_demo() {  # run_demo OUT FORCE
    local out=$1 force=$2
    local scripts=$REPO/examples/distillation cfg=$REPO/examples/distillation/training_configs
    local train_txt=$REPO/data_prep/sample/ja_train.txt dev_txt=$REPO/data_prep/sample/ja_dev.txt
    # Demo settings (overridable): small models, a few hundred optimizer steps in all.
    # DEMO_SEED seeds the two students; the teacher keeps its own seed: a fixed artifact, as a real
    # pretrained teacher is (teacher seed 0 -> ~101 perplexity; some seeds give a much weaker teacher).
    local vocab=${DEMO_VOCAB:-1000} seed=${DEMO_SEED:-0} teacher_seed=${DEMO_TEACHER_SEED:-0}
    # The teacher (4 x 128) stops near its best held-out perplexity; the students (2 x 64) train for a
    # short budget, where the teacher's full next-token distributions (T=1) teach far more per step
    # than the one-hot targets: KD wins by a wide margin (about 129 vs 167 perplexity).
    local teacher_steps=${DEMO_TEACHER_STEPS:-200} student_steps=${DEMO_STUDENT_STEPS:-80}
    local teacher_lr=${DEMO_TEACHER_LR:-3e-3} student_lr=${DEMO_STUDENT_LR:-3e-3}
    local temperature=${DEMO_TEMPERATURE:-1.0} alpha_ce=${DEMO_ALPHA_CE:-0.9} alpha_clm=${DEMO_ALPHA_CLM:-0.1}
    local batch=${DEMO_BATCH_SIZE:-8}
    # Tiny models run fastest on one thread per process, and a busy machine does not stall them.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false

    local start=$SECONDS entry
    echo "== demo: output in $out"
    if [[ $force == 1 ]]; then
        outputs "$out" --replace --empty --claim "run_distill.sh --demo"   # --force: all the earlier output
    else
        outputs "$out" --replace --claim "run_distill.sh --demo"
    fi
    for entry in "${DEMO_ENTRIES[@]}"; do
        rm -rf "${out:?}/$entry"
    done
    # The demo states its own settings instead of taking train.py's defaults (the full-size recipe):
    # no cosine term in any run (the teacher and the no-KD student have no teacher; KD here is on the logits).
    # Logged every 10 steps and scored every 20, so that curves.png has curves (neither changes the training).
    local common=(--n_gpu 0 --batch_size "$batch" --gradient_accumulation_steps 1 --warmup_prop 0.05
                  --alpha_cos 0 --log_interval 10 --checkpoint_interval 0 --data_file "$out/data/train"
                  --eval_data "$out/data/dev" --eval_interval 20)
    # Both students: the same model, budget and seed, no weight decay.
    local student=(--student_config "$cfg/demo-student.json" --max_steps "$student_steps"
                   --learning_rate "$student_lr" --weight_decay 0 --seed "$seed")

    echo "== 1/8 tokenizer (sentencepiece unigram, $vocab pieces, rinna's special ids)"
    $PYTHON "$REPO/data_prep/make_tokenizer.py" --input "$train_txt" --vocab_size "$vocab" \
        --output_dir "$out/tokenizer"
    echo "== 2/8 binarize train and dev"
    $PYTHON "$REPO/data_prep/binarize.py" --input "$train_txt" --tokenizer "$out/tokenizer" \
        --output_dir "$out/data/train" --num_workers 1 --quiet
    $PYTHON "$REPO/data_prep/binarize.py" --input "$dev_txt" --tokenizer "$out/tokenizer" \
        --output_dir "$out/data/dev" --num_workers 1 --quiet
    echo "== 3/8 pretrain the teacher ($teacher_steps steps, no teacher: --alpha_clm 1 --alpha_ce 0)"
    $PYTHON "$scripts/train.py" "${common[@]}" --dump_path "$out/teacher" \
        --student_config "$cfg/demo-teacher.json" --tokenizer_name "$out/tokenizer" \
        --alpha_clm 1 --alpha_ce 0 --max_steps "$teacher_steps" --learning_rate "$teacher_lr" --weight_decay 0.1 \
        --seed "$teacher_seed"
    echo "== 4/8 distil the student ($student_steps steps, T=$temperature, alpha_ce $alpha_ce, alpha_clm $alpha_clm)"
    $PYTHON "$scripts/train.py" "${common[@]}" "${student[@]}" --dump_path "$out/student_kd" \
        --teacher_name "$out/teacher" --tokenizer_name "$out/tokenizer" \
        --temperature "$temperature" --alpha_ce "$alpha_ce" --alpha_clm "$alpha_clm"
    echo "== 5/8 the same student without the teacher ($student_steps steps)"
    $PYTHON "$scripts/train.py" "${common[@]}" "${student[@]}" --dump_path "$out/student_no_kd" \
        --tokenizer_name "$out/tokenizer" --alpha_clm 1 --alpha_ce 0
    echo "== 6/8 held-out perplexity (data_prep/sample/ja_dev.txt)"
    $PYTHON "$scripts/evaluate.py" --device cpu --tokenizer "$out/tokenizer" --data "$dev_txt" \
        --model "teacher=$out/teacher" --model "student_kd=$out/student_kd" --model "student_no_kd=$out/student_no_kd" \
        --json "$out/perplexity.json"
    $PYTHON - "$out/perplexity.json" "$out/results.json" <<'EOF'
import json, math, sys
ppl = json.load(open(sys.argv[1]))["perplexity"]
results = {k: ppl[k] for k in ("teacher", "student_kd", "student_no_kd")}
with open(sys.argv[2], "w") as f:
    json.dump(results, f, indent=2)
    f.write("\n")
if not all(math.isfinite(v) for v in results.values()):
    sys.exit(f"non-finite perplexity in {results}")
verdict = "beats" if results["student_kd"] < results["student_no_kd"] else "does NOT beat"
print(f"distilled student ({results['student_kd']:.2f}) {verdict} the student trained alone ({results['student_no_kd']:.2f})")
EOF
    echo "== 7/8 training curves of the three runs (bench/plot_runs.py)"
    $PYTHON "$REPO/bench/plot_runs.py" "$out/teacher" "$out/student_kd" "$out/student_no_kd" --out "$out/curves.png"
    echo "== 8/8 export the distilled student"
    $PYTHON "$scripts/export.py" --checkpoint "$out/student_kd" --tokenizer "$out/tokenizer" \
        --output_dir "$out/export" --perplexities "$out/results.json" --eval_data "$dev_txt" --name distilgpt2-ja-demo
    local generate=examples/distillation/generate.py
    [[ "$PWD" == "$REPO" ]] || generate=$REPO/$generate
    echo "== demo done in $((SECONDS - start)) s"
    echo "results: $out/results.json"
    echo "plot:    $out/curves.png  (each run's own: $out/<run>/curves.png)"
    echo "export:  $out/export  (try: $PYTHON $generate --model $out/export --prompt 春になると)"
}

if [[ "${1:-}" == "--demo" ]]; then
    shift
    demo_usage="usage: bash run_distill.sh --demo [--force] [OUT_DIR]"
    force=0
    demo_out=()
    for arg in "$@"; do
        case $arg in
            --force) force=1 ;;
            -h|--help) echo "$demo_usage"; exit 0 ;;
            -*) die 2 "unknown demo option $arg ($demo_usage)" ;;
            *) demo_out+=("$arg") ;;
        esac
    done
    if [[ ${#demo_out[@]} -gt 1 ]]; then
        die 2 "one OUT_DIR at most, got ${demo_out[*]} ($demo_usage)"
    fi
    out=${demo_out[0]:-checkpoints/demo}
    [[ -n "$out" ]] || die 2 "empty OUT_DIR ($demo_usage)"
    check_demo_dir "$out"
    run_demo "$out" "$force"
    exit 0
fi

# ---- full recipe: rinna/japanese-gpt2-medium (24 x 1024) -> 6 x 1024 on one 4-GPU node ----------
given() {  # given FLAG ARGS...: FLAG is among the extra arguments, which then decide (train.py checks them)
    local flag=$1 arg
    shift
    for arg in "$@"; do
        if [[ "$arg" == "$flag" || "$arg" == "$flag="* ]]; then return 0; fi
    done
    return 1
}
recipe_file=0                               # 1: --config FILE names the inputs; the environment overrides it
if given --config "$@"; then recipe_file=1; fi
# Topology (torchrun)
N_GPU_SET=${N_GPU:+1}
N_GPU=${N_GPU:-4}                           # GPUs (processes) per node; 0: a CPU run (gloo)
NPROC=${NPROC:-}                            # processes per node of a CPU run (N_GPU=0); default 1
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}             # torchrun restarts crashed workers; they resume from the newest checkpoint
SHARD_TEACHER=${SHARD_TEACHER:-0}           # 1: split the teacher between each node's processes (--shard_teacher)
# Inputs of this recipe (relative paths: relative to the folder the script is run from)
if [[ $recipe_file == 0 ]]; then
    DATA=${DATA:-data/binarized}
    TEACHER=${TEACHER:-rinna/japanese-gpt2-medium}
    STUDENT_CONFIG=${STUDENT_CONFIG:-$REPO/examples/distillation/training_configs/distilgpt2-ja.json}
    N_GPU_SET=1
fi
DATA=${DATA:-} TEACHER=${TEACHER:-} STUDENT_CONFIG=${STUDENT_CONFIG:-}
# Passed only when set and non-empty (else train.py's default):
#   DUMP_PATH  STUDENT_INIT (e.g. the output of scripts/extract.py)  EVAL_DATA
#   TEMPERATURE ALPHA_CE ALPHA_CLM ALPHA_MSE ALPHA_COS
#   BATCH_SIZE (sequences per GPU per micro-batch)  GRAD_ACCUM (global batch = N_GPU x NNODES x BATCH_SIZE x GRAD_ACCUM)
#   LEARNING_RATE WARMUP_PROP WEIGHT_DECAY N_EPOCH MAX_STEPS (> 0 overrides N_EPOCH)
#   PRECISION (auto|bf16|fp16|fp32; auto: bf16 on a GPU that has it)  SEED
#   LOG_INTERVAL CHECKPOINT_INTERVAL EVAL_INTERVAL (needs EVAL_DATA)
args=()
pass_if_set() {  # pass_if_set VAR --flag: add "--flag $VAR" when VAR is set and non-empty
    if [[ -n "${!1:-}" ]]; then args+=("$2" "${!1}"); fi
}
if [[ -n "$N_GPU_SET" ]]; then args+=(--n_gpu "$N_GPU"); fi
pass_if_set DATA --data_file
pass_if_set STUDENT_CONFIG --student_config
pass_if_set TEACHER --teacher_name
PRECISION=${PRECISION:-}
PRECISION=${PRECISION#--}                   # the older form PRECISION=--bf16 means bf16
pass_if_set DUMP_PATH --dump_path
pass_if_set STUDENT_INIT --student_pretrained_weights
pass_if_set EVAL_DATA --eval_data
pass_if_set TEMPERATURE --temperature
pass_if_set ALPHA_CE --alpha_ce
pass_if_set ALPHA_CLM --alpha_clm
pass_if_set ALPHA_MSE --alpha_mse
pass_if_set ALPHA_COS --alpha_cos
pass_if_set BATCH_SIZE --batch_size
pass_if_set GRAD_ACCUM --gradient_accumulation_steps
pass_if_set LEARNING_RATE --learning_rate
pass_if_set WARMUP_PROP --warmup_prop
pass_if_set WEIGHT_DECAY --weight_decay
pass_if_set N_EPOCH --n_epoch
pass_if_set MAX_STEPS --max_steps
pass_if_set PRECISION --precision
pass_if_set SEED --seed
pass_if_set LOG_INTERVAL --log_interval
pass_if_set CHECKPOINT_INTERVAL --checkpoint_interval
pass_if_set EVAL_INTERVAL --eval_interval
if [[ "$SHARD_TEACHER" == 1 ]]; then args+=(--shard_teacher); fi

# ---- checks: one line and exit 1 (data) or 2 (anything else) before anything is launched -----------
where() {  # where PATH: how a relative PATH was read, for the error lines
    if [[ "$1" == /* ]]; then echo "$1"; else echo "$1 (relative to $PWD)"; fi
}
is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

if [[ -n "$DATA" ]] && ! given --data_file "$@" && [[ ! -e "$DATA" ]]; then
    die 1 "DATA $(where "$DATA") does not exist: binarize a corpus first (docs/data-preparation.md) or set DATA"
fi
if [[ -n "$STUDENT_CONFIG" ]] && ! given --student_config "$@" && [[ ! -f "$STUDENT_CONFIG" ]]; then
    die 2 "STUDENT_CONFIG $(where "$STUDENT_CONFIG") is not a file"
fi
if [[ -n "${STUDENT_INIT:-}" ]] && ! given --student_pretrained_weights "$@" && [[ ! -e "$STUDENT_INIT" ]]; then
    die 2 "STUDENT_INIT $(where "$STUDENT_INIT") does not exist (make it with scripts/extract.py)"
fi
if [[ -n "${EVAL_DATA:-}" ]] && ! given --eval_data "$@" && [[ ! -e "$EVAL_DATA" ]]; then
    die 2 "EVAL_DATA $(where "$EVAL_DATA") does not exist"
fi
# A teacher is a local model folder or a hub name org/name (a relative folder that does not exist is refused
# when it does not look like org/name; one that does is taken for a hub name, as transformers does).
if [[ -n "$TEACHER" ]] && ! given --teacher_name "$@" && [[ ! -d "$TEACHER" ]] \
        && ! [[ "$TEACHER" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    die 2 "TEACHER $(where "$TEACHER") is neither a folder nor a hub name (org/name)"
fi
is_count "$N_GPU" || die 2 "N_GPU=$N_GPU is not a number of GPUs per node (N_GPU=0: the CPU)"
if ! is_count "$NNODES" || [[ $NNODES == 0 ]]; then
    die 2 "NNODES=$NNODES is not a number of nodes (> 0)"
fi
if ! is_count "$NODE_RANK" || (( 10#$NODE_RANK >= 10#$NNODES )); then
    die 2 "NODE_RANK=$NODE_RANK is not a node of NNODES=$NNODES (0 to $((NNODES - 1)))"
fi
[[ "$SHARD_TEACHER" == [01] ]] || die 2 "SHARD_TEACHER=$SHARD_TEACHER is neither 0 nor 1"
if [[ $N_GPU == 0 ]]; then
    nproc=${NPROC:-1}
    if ! is_count "$nproc" || [[ $nproc == 0 ]]; then
        die 2 "NPROC=$nproc is not a number of processes (> 0)"
    fi
else
    if [[ -n "$NPROC" && "$NPROC" != "$N_GPU" ]]; then
        die 2 "NPROC=$NPROC is for CPU runs (N_GPU=0); on GPUs the processes per node are N_GPU=$N_GPU"
    fi
    nproc=$N_GPU
    if ! given --n_gpu "$@"; then
        gpus=$($PYTHON -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null) \
            || die 2 "could not count the GPUs with $PYTHON (is torch installed? N_GPU=0 runs on the CPU)"
        gpus=${gpus##*$'\n'}
        is_count "$gpus" || die 2 "could not count the GPUs with $PYTHON (it printed '$gpus')"
        if (( gpus == 0 )); then
            die 2 "N_GPU=$N_GPU but no GPU is visible here (torch.cuda.device_count() is 0); N_GPU=0 trains on the CPU"
        elif (( gpus < N_GPU )); then
            die 2 "N_GPU=$N_GPU but only $gpus GPU(s) are visible here; set N_GPU=$gpus or less (N_GPU=0: the CPU)"
        fi
    fi
fi
command -v torchrun > /dev/null || die 2 "torchrun is not on PATH (it comes with torch: pip install -r requirements.txt)"

# ---- launch ---------------------------------------------------------------------------------------
echo "== distilling ${TEACHER:-the teacher of the recipe} into ${STUDENT_CONFIG:-its student} on $NNODES node(s) x" \
     "$([[ $N_GPU == 0 ]] && echo "$nproc CPU process(es)" || echo "$N_GPU GPU(s)")" \
     "-> ${DUMP_PATH:-$([[ $recipe_file == 1 ]] && echo "the recipe's --dump_path" || echo "the default --dump_path of train.py")}"
# torchrun's stdout goes straight to ours; its stderr (the workers' too) goes through tee to ours, live,
# and a copy through a FIFO to grep, which keeps only the error lines (not the whole log of a long run).
# Neither tee nor grep dies on Ctrl-C, so torchrun's shutdown messages still come through.
tmp=$(mktemp -d "${TMPDIR:-/tmp}/run_distill.XXXXXX")
grep_pid=
cleanup() {
    if [[ -n "$grep_pid" ]]; then kill "$grep_pid" 2> /dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
mkfifo "$tmp/stderr"
# a background job: deaf to Ctrl-C already. An error line may follow a progress bar's \r on one line.
LC_ALL=C grep -a -o -E $'(^|\r)(\\[[^]]*\\]:? ?)?error: [^\r]*' < "$tmp/stderr" > "$tmp/errors" &
grep_pid=$!
exec 3>&1
set +e
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS" \
    "$REPO/examples/distillation/train.py" "${args[@]}" "$@" 2>&1 1>&3 3>&- | (trap '' INT; exec tee "$tmp/stderr") >&2 3>&-
status=${PIPESTATUS[0]}
set -e
exec 3>&-
wait "$grep_pid" || true
grep_pid=
if [[ $status != 0 ]]; then
    # the worker's own one-line reason, last, after torchrun's traceback (ChildFailedError)
    # (a worker that torchrun stopped because another failed says "terminated": the other's line wins)
    last=$( (grep -v -E 'error: terminated \(' "$tmp/errors" || cat "$tmp/errors") | tail -n 1 | tr -d '\r' |
           sed -E 's/^\[[^]]*\]:? ?//')
    if [[ -n "$last" ]]; then echo "$last" >&2; fi
fi
exit "$status"
