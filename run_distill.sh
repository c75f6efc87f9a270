#!/usr/bin/env bash
# Distil rinna/japanese-gpt2-medium into a 6-layer student.
#
#   bash run_distill.sh [TRAIN_PY_ARGS...]     the full recipe on one 4-GPU node (torchrun)
#   bash run_distill.sh --demo [OUT_DIR]       offline end-to-end demo on the shipped sample, CPU, < 5 min
#
# Full recipe: the hyperparameters are train.py's defaults (examples/distillation/config.py, RECIPE;
# `python examples/distillation/train.py --help` lists them). This script passes only the inputs
# (DATA, TEACHER, STUDENT_CONFIG), the topology, and the settings set in the environment, e.g.
#   N_GPU=8 DATA=data/binarized DUMP_PATH=checkpoints/run1 PRECISION=fp16 bash run_distill.sh
#   ALPHA_CE=3 LEARNING_RATE=3e-4 bash run_distill.sh
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash run_distill.sh      (then NODE_RANK=1 on the other node)
# Extra arguments go to train.py last, unchanged (they win over everything here).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

run_demo() {
    local out=${1:-checkpoints/demo}
    local cfg=examples/distillation/training_configs
    local train_txt=data_prep/sample/ja_train.txt dev_txt=data_prep/sample/ja_dev.txt
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

    local start=$SECONDS
    echo "== demo: output in $out"
    rm -rf "$out"
    mkdir -p "$out"
    # The demo states its own settings instead of taking train.py's defaults (the full-size recipe):
    # no cosine term in any run (the teacher and the no-KD student have no teacher; KD here is on the logits).
    local common=(--n_gpu 0 --batch_size "$batch" --gradient_accumulation_steps 1 --warmup_prop 0.05
                  --alpha_cos 0 --log_interval 50 --checkpoint_interval 0 --data_file "$out/data/train"
                  --eval_data "$out/data/dev")
    # Both students: the same model, budget and seed, no weight decay.
    local student=(--student_config "$cfg/demo-student.json" --max_steps "$student_steps"
                   --learning_rate "$student_lr" --weight_decay 0 --seed "$seed")

    echo "== 1/7 tokenizer (sentencepiece unigram, $vocab pieces, rinna's special ids)"
    $PYTHON data_prep/make_tokenizer.py --input "$train_txt" --vocab_size "$vocab" --output_dir "$out/tokenizer"
    echo "== 2/7 binarize train and dev"
    $PYTHON data_prep/binarize.py --input "$train_txt" --tokenizer "$out/tokenizer" --output_dir "$out/data/train" \
        --num_workers 1 --quiet
    $PYTHON data_prep/binarize.py --input "$dev_txt" --tokenizer "$out/tokenizer" --output_dir "$out/data/dev" \
        --num_workers 1 --quiet
    echo "== 3/7 pretrain the teacher ($teacher_steps steps, no teacher: --alpha_clm 1 --alpha_ce 0)"
    $PYTHON examples/distillation/train.py "${common[@]}" --dump_path "$out/teacher" \
        --student_config "$cfg/demo-teacher.json" --tokenizer_name "$out/tokenizer" \
        --alpha_clm 1 --alpha_ce 0 --max_steps "$teacher_steps" --learning_rate "$teacher_lr" --weight_decay 0.1 \
        --seed "$teacher_seed"
    echo "== 4/7 distil the student ($student_steps steps, T=$temperature, alpha_ce $alpha_ce, alpha_clm $alpha_clm)"
    $PYTHON examples/distillation/train.py "${common[@]}" "${student[@]}" --dump_path "$out/student_kd" \
        --teacher_name "$out/teacher" --tokenizer_name "$out/tokenizer" \
        --temperature "$temperature" --alpha_ce "$alpha_ce" --alpha_clm "$alpha_clm"
    echo "== 5/7 the same student without the teacher ($student_steps steps)"
    $PYTHON examples/distillation/train.py "${common[@]}" "${student[@]}" --dump_path "$out/student_no_kd" \
        --tokenizer_name "$out/tokenizer" --alpha_clm 1 --alpha_ce 0
    echo "== 6/7 held-out perplexity ($dev_txt)"
    $PYTHON examples/distillation/evaluate.py --device cpu --tokenizer "$out/tokenizer" --data "$dev_txt" \
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
    echo "== 7/7 export the distilled student"
    $PYTHON examples/distillation/export.py --checkpoint "$out/student_kd" --tokenizer "$out/tokenizer" \
        --output_dir "$out/export" --perplexities "$out/results.json" --eval_data "$dev_txt" --name distilgpt2-ja-demo
    echo "== demo done in $((SECONDS - start)) s"
    echo "results: $out/results.json"
    echo "export:  $out/export  (try: $PYTHON examples/distillation/generate.py --model $out/export --prompt 春になると)"
}

if [[ "${1:-}" == "--demo" ]]; then
    shift
    if [[ $# -gt 1 ]]; then
        echo "usage: bash run_distill.sh --demo [OUT_DIR]" >&2
        exit 2
    fi
    run_demo "$@"
    exit 0
fi

# ---- full recipe: rinna/japanese-gpt2-medium (24 x 1024) -> 6 x 1024 on one 4-GPU node ----------
# Topology (torchrun)
N_GPU=${N_GPU:-4}                           # GPUs (processes) per node
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}             # torchrun restarts crashed workers; they resume from the newest checkpoint
# Inputs of this recipe
DATA=${DATA:-data/binarized}
TEACHER=${TEACHER:-rinna/japanese-gpt2-medium}
STUDENT_CONFIG=${STUDENT_CONFIG:-examples/distillation/training_configs/distilgpt2-ja.json}
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

echo "== distilling $TEACHER into $STUDENT_CONFIG on $NNODES node(s) x $N_GPU GPU(s)" \
     "-> ${DUMP_PATH:-the default --dump_path of train.py}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$N_GPU" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "$MAX_RESTARTS" \
    examples/distillation/train.py --n_gpu "$N_GPU" --data_file "$DATA" \
    --student_config "$STUDENT_CONFIG" --teacher_name "$TEACHER" \
    "${args[@]}" "$@"
