#!/usr/bin/env bash
# Issue 12's speed check: one command, at most 8 minutes on one H100/H200, ending with one table.
#
#   bash bench/gpu_check.sh --prepare [DIR]   # CPU, beforehand: real Japanese shards + a 32,000-piece tokenizer in
#                                             # DIR (default checkpoints/gpu_check, git-ignored, 7.2 MB; 1.5-6 min
#                                             # on 2 cores, the tokenizer is most of it) from $CORPORA
#                                             # (../shared/corpora); carry checkpoints/gpu_check to the device
#   bash bench/gpu_check.sh                   # GPU: the steps below; results in $OUT (./gpu_check_out without $OUT)
#   bash bench/gpu_check.sh --cpu             # the same steps at tiny sizes on the CPU, about 1 min on 2 idle cores
#                                             # (CI: tests/bench/test_gpu_check.py)
#
# Steps, most telling first, with what each should take on one H200. The machine starts with no
# compile cache: a compilation costs ~30 s per model and shape class (the 11-27 session: ~100 s for a
# cold distill_step.py process), a cached one a few seconds (its train run compiled in ~2 s).
#   imports   the modules every step needs; missing ones are installed from .device/whl when it
#             exists (no registry on the device), else named in one line and nothing runs        ~10 s
#   a_bs8     distill_step.py --profile: the 2019 reference vs the project at bs 8 x 1024, and a
#             profile of 3 project steps with the GPU's busy share; compiling is most of it      ~120 s
#   c_plain   the project at bs 8, --no-fused_loss (the models' graphs come from a_bs8's cache) ~20 s
#   teacher   a random 24x1024 teacher, vocab 32,000, made on the GPU and saved (save_pretrained) ~15 s
#   d_train   train.py, 300 steps x 8 sequences of the prepared shards, the design card's defaults
#             (bf16, compile, fused loss, --pad_multiple 64): start-up and loading ~20 s; the first
#             batch is 8 x 1024 (a_bs8's graphs, cached), the second recompiles both models with a
#             dynamic length ~50 s; 300 steps ~10 s; the final save ~10 s                     ~100 s
#   b_bs32    the project at bs 32 x 1024 (its own compilation)                                   ~70 s
#   c_pad1    d_train with --pad_multiple 1: the dynamic-length graphs come from the cache, the
#             loss chunk recompiles for new row counts up to torch's limit (8)                   ~60 s
#   b_bs16    the project at bs 16 x 1024, last: it lies between bs 8 and 32                      ~70 s
#                                                                            total ~465 s (+-25%)
# Every step runs under `timeout`, capped by what is left of BUDGET (465 s; $GPU_CHECK_BUDGET sets it):
# a step that finds under 20 s left is skipped, so the script ends within 8 minutes whatever happens,
# and the table says which steps ran out (timeout), failed (exit status) or were skipped; a train run
# cut short still reports the log windows it wrote. The train runs' tokens/s are their own log lines
# (the windows after the first, which holds the compilation), next to a_bs8's bench step.
#
# $OUT gets at most 8 files, no folder: env.txt, step_bs8.txt (bench table + profile), train_pad64.txt,
# train_pad1.txt (the runs' logs), stderr.txt (each step's last lines), results.json, summary.md.
# The last thing printed is the table (bench/gpu_check_table.py). Exit status: 0 every step ran, 1 one
# did not, 2 a Python package is missing.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=gpu
DATA=checkpoints/gpu_check
case "${1:-}" in
    "") ;;
    --cpu) MODE=cpu ;;
    --prepare) MODE=prepare; DATA=${2:-$DATA} ;;
    --prepare-tiny) MODE=prepare-tiny; DATA=${2:?--prepare-tiny needs a folder} ;;  # what --cpu builds
    *) echo "usage: bash bench/gpu_check.sh [--cpu | --prepare [DIR]]" >&2; exit 2 ;;
esac
DATA=$(realpath -m "$DATA")  # relative to the caller's folder, as $OUT
OUT=$(realpath -m "${OUT:-gpu_check_out}")
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

die() { echo "gpu_check: $*" >&2; exit 1; }

# tokenize_and_binarize DIR VOCAB LIMIT DOC_DIR...: DIR/tokenizer (make_tokenizer.py) and DIR/shards (binarize.py).
tokenize_and_binarize() {
    local dir=$1 vocab=$2 limit=$3; shift 3
    timeout "$limit" python data_prep/make_tokenizer.py --vocab_size "$vocab" --overwrite --input "$@" \
        --output_dir "$dir/tokenizer" || return 1
    timeout "$limit" python data_prep/binarize.py --overwrite --quiet --num_workers 2 --input "$@" \
        --tokenizer "$dir/tokenizer" --output_dir "$dir/shards"
}

if [ "$MODE" = prepare ]; then
    # Japanese Wikipedia (JaQuAD train: 9,713 paragraphs of 691 articles, in article order) rejoined 14
    # consecutive paragraphs to a document (about one article, as rinna's Wikipedia layout), plus the
    # Wikinews articles (one per line): after train.py cuts at 1024 tokens, ~5,800 sequences, a quarter of
    # them full 1024-token chunks and the rest 12..1023 tokens, 3.2M tokens.
    CORPORA=$(realpath -m "${CORPORA:-../shared/corpora}")
    for f in jawiki_jaquad_train jawikinews; do
        [ -f "$CORPORA/$f.txt.xz" ] || die "no $CORPORA/$f.txt.xz: set CORPORA to the folder of the corpora"
    done
    TMP=$(mktemp -d) || die "no temporary folder"
    trap 'rm -rf "$TMP"' EXIT
    start=$SECONDS
    xz -dc "$CORPORA/jawiki_jaquad_train.txt.xz" | awk '{ print } NR % 14 == 0 { print "" }' > "$TMP/jawiki.txt" \
        || die "cannot read $CORPORA/jawiki_jaquad_train.txt.xz"
    timeout 300 python data_prep/build_corpus.py --source text --split_sentences --quiet \
        --input "$TMP/jawiki.txt" --output_dir "$TMP/wiki" || die "build_corpus.py failed on the Wikipedia text"
    timeout 300 python data_prep/build_corpus.py --source text --doc_per_line --split_sentences --quiet \
        --input "$CORPORA/jawikinews.txt.xz" --output_dir "$TMP/news" || die "build_corpus.py failed on Wikinews"
    tokenize_and_binarize "$DATA" 32000 3600 "$TMP/wiki/doc_data" "$TMP/news/doc_data" \
        || die "make_tokenizer.py or binarize.py failed (their message is above)"
    echo "gpu_check: shards and tokenizer in $DATA: $(du -sh "$DATA" | cut -f1), built in $(( SECONDS - start )) s;" \
         "carry $(realpath --relative-to="$ROOT" "$DATA") to the device"
    exit 0
fi
if [ "$MODE" = prepare-tiny ]; then  # the same tools on the project's own sample text, 1,000 pieces: never ../shared
    TMP=$(mktemp -d) || die "no temporary folder"
    trap 'rm -rf "$TMP"' EXIT
    timeout 120 python data_prep/build_corpus.py --source text --quiet --input data_prep/sample/ja_train.txt \
        --output_dir "$TMP/corpus" || die "build_corpus.py failed on the sample text"
    tokenize_and_binarize "$DATA" 1000 120 "$TMP/corpus/doc_data" || die "make_tokenizer.py or binarize.py failed"
    exit 0
fi
mkdir -p "$OUT" || die "cannot create \$OUT ($OUT)"

W=$(mktemp -d) || die "no temporary folder"
trap 'rm -rf "$W"' EXIT
: > "$W/status.tsv"
if [ "$MODE" = gpu ]; then
    BUDGET=${GPU_CHECK_BUDGET:-465}
    BENCH=()                                   # distill_step.py's full size on CUDA
    DEVICE=cuda; TRAIN_DEV=(--n_gpu 1); TRAIN_STEPS=300; LOG_EVERY=100
    TEACHER=(32000 1024 1024 24 16 0)          # vocab, context, width, layers, heads; student: the design card's
    STUDENT=examples/distillation/training_configs/distilgpt2-ja.json
else
    BUDGET=900
    BENCH=(--tiny --threads 1)                 # 4x64 teacher, 2x64 student, vocab 512, 64 tokens, fp32
    DEVICE=cpu; TRAIN_DEV=(--n_gpu 0); TRAIN_STEPS=30; LOG_EVERY=10
    TEACHER=(1024 128 64 4 4 2)                # and a 2-layer student config beside it
    STUDENT=$W/teacher/student.json
    DATA=$W/data
    export OMP_NUM_THREADS=1
fi
END=$(( SECONDS + BUDGET ))

# step NAME LIMIT CMD...: CMD under `timeout`, at most LIMIT seconds and what is left of the budget;
# stdout and stderr to $W/NAME.out and .err; a line "NAME<TAB>exit status<TAB>seconds<TAB>limit" in status.tsv.
step() {
    local name=$1 limit=$2 left=$(( END - SECONDS )) start=$SECONDS rc; shift 2
    (( left < 20 )) && { skip "$name" "time budget spent"; return 1; }
    (( limit > left )) && limit=$left
    echo "gpu_check: $name (at most ${limit} s)" >&2
    timeout -k 5 "$limit" "$@" > "$W/$name.out" 2> "$W/$name.err"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - start ))" "$limit" >> "$W/status.tsv"
    (( rc == 0 )) || echo "gpu_check: $name: $( ((rc == 124 || rc == 137)) && echo "timeout after $limit s" || echo "exit $rc"):" \
        "$(grep -v '^\s*$' "$W/$name.err" | tail -n 1)" >&2
    return $rc
}
skip() { printf '%s\tskipped\t0\t%s\n' "$1" "$2" >> "$W/status.tsv"; echo "gpu_check: $1 skipped: $2" >&2; }
# outcome: what happened to the last step, in words
outcome() { tail -n 1 "$W/status.tsv" | awk -F '\t' '{ print $1 ": " ($2 == "skipped" ? $4 : ($2 == 124 || $2 == 137) ? "timeout" : "exit " $2) }'; }

summarise() {
    {
        for name in $(cut -f1 "$W/status.tsv"); do
            [ -s "$W/$name.err" ] && { echo "== $name: last lines of stderr"; grep -v '^\s*$' "$W/$name.err" | tail -n 25; }
        done
    } > "$OUT/stderr.txt"
    [ -f "$W/a_bs8.out" ] && cp "$W/a_bs8.out" "$OUT/step_bs8.txt"
    for name in d_train_pad64 c_train_pad1; do
        [ -f "$W/$name.err" ] && cat "$W/$name.out" "$W/$name.err" > "$OUT/${name#?_}.txt"
    done
    timeout 120 python bench/gpu_check_table.py --mode "$MODE" --work "$W" --out "$OUT" --budget "$BUDGET" \
        || echo "gpu_check: the summary failed; raw results: $OUT/stderr.txt"
}

# ---- imports: one line naming what is missing ---------------------------------------------------
IMPORTS='import importlib.util as u
mods = {"torch": "torch", "transformers": "transformers", "tensorboardX": "tensorboardX", "google.protobuf": "protobuf",
        "sentencepiece": "sentencepiece", "safetensors": "safetensors", "numpy": "numpy", "tqdm": "tqdm"}
def found(m):
    try:
        return u.find_spec(m) is not None
    except ImportError:
        return False
print(" ".join(p for m, p in mods.items() if not found(m)))'
missing=$(python -c "$IMPORTS")
if [ -n "$missing" ] && [ "$MODE" = gpu ] && [ -d .device/whl ]; then
    echo "gpu_check: installing $missing from .device/whl" >&2
    python -m pip install -q --no-deps --no-index --find-links .device/whl $missing >&2
    missing=$(python -c "$IMPORTS")
fi
{
    date -u
    [ "$MODE" = gpu ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), mode $MODE, budget $BUDGET s, data $DATA"
} > "$OUT/env.txt" 2>&1
if [ -n "$missing" ]; then
    echo "gpu_check: missing Python packages: $missing (no package registry on the device: put their wheels in .device/whl)" >&2
    for name in a_bs8 c_plain_bs8 d_train_pad64 c_train_pad1 b_bs16 b_bs32; do skip "$name" "missing $missing"; done
    summarise
    exit 2
fi

# ---- (a) reference vs project at bs 8, with the profile; (c) the project without the fused loss ---
step a_bs8 210 python bench/distill_step.py "${BENCH[@]}" --batch_size 8 --profile --json "$W/a_bs8.json"
step c_plain_bs8 90 python bench/distill_step.py "${BENCH[@]}" --batch_size 8 --skip_reference --no-comparison_step \
    --no-fused_loss --json "$W/c_plain_bs8.json"

# ---- (d) end to end: train.py on the real shards; (b) bs 32; (c) --pad_multiple 1; (b) bs 16 ------
TEACHER_PY='import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
out, device = sys.argv[1], sys.argv[2]
vocab, context, width, layers, heads, student_layers = map(int, sys.argv[3:])
config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                    bos_token_id=1, eos_token_id=2, pad_token_id=3, activation_function="gelu_new")
torch.manual_seed(0)
try:
    with torch.device(device):  # on the GPU: seconds, not the CPU initialisation of 350M weights
        teacher = GPT2LMHeadModel(config)
except Exception as err:
    print(f"initialising on {device} failed ({err}); on the CPU instead", file=sys.stderr)
    teacher = GPT2LMHeadModel(config)
teacher.save_pretrained(out)
print(f"random teacher {layers}x{width}, vocab {vocab}, {teacher.num_parameters() / 1e6:.0f}M parameters: {out}")
if student_layers:
    config.n_layer = student_layers
    open(f"{out}/student.json", "w").write(json.dumps(config.to_dict()))'
teacher_ok=1
if [ "$MODE" = cpu ]; then
    step data 300 bash bench/gpu_check.sh --prepare-tiny "$DATA" || { teacher_ok=0; why="no shards ($(outcome))"; }
elif [ ! -f "$DATA/shards/manifest.json" ] || [ ! -f "$DATA/tokenizer/spiece.model" ]; then
    teacher_ok=0; why="no shards in $DATA: build them with bash bench/gpu_check.sh --prepare and carry checkpoints/gpu_check"
    echo "gpu_check: $why" >&2
fi
if (( teacher_ok )) && ! step teacher 60 python -c "$TEACHER_PY" "$W/teacher" "$DEVICE" "${TEACHER[@]}"; then
    teacher_ok=0; why="no teacher ($(outcome))"
fi
TRAIN=(python examples/distillation/train.py "${TRAIN_DEV[@]}" --data_file "$DATA/shards" --student_config "$STUDENT"
       --teacher_name "$W/teacher" --tokenizer_name "$DATA/tokenizer" --max_steps "$TRAIN_STEPS" --batch_size 8
       --gradient_accumulation_steps 1 --log_interval "$LOG_EVERY" --checkpoint_interval 0)
# train NAME LIMIT PAD_MULTIPLE: one run, its recompilations logged (TORCH_LOGS=recompiles)
train() {
    if (( teacher_ok )); then
        step "$1" "$2" env TORCH_LOGS=recompiles "${TRAIN[@]}" --pad_multiple "$3" --dump_path "$W/run_pad$3"
    else
        skip "$1" "$why"
    fi
}
# bench BATCH: the project side alone at that batch size (b)
bench() {
    step "b_bs$1" 100 python bench/distill_step.py "${BENCH[@]}" --batch_size "$1" --skip_reference \
        --no-comparison_step --steps 8 --json "$W/b_bs$1.json"
}

train d_train_pad64 160 64
bench 32
train c_train_pad1 120 1
bench 16

summarise
awk -F '\t' '$2 != "0" { failed = 1 } END { exit failed }' "$W/status.tsv"
