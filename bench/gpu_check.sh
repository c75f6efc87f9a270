#!/usr/bin/env bash
# Issue 5's measurement on one H100/H200, as one prepared command (device tool: run from the repo root):
#     bash bench/gpu_check.sh            # writes $OUT/distill_step.{txt,json} (./gpu_check_out without $OUT)
# 1. the full-size benchmark: 2019-style fp32 reference vs the project's Distiller step (bf16, SDPA,
#    fused loss, compile), 3 warm-up + 10 timed steps, plus a torch.profiler table of the project step;
# 2. the project step without torch.compile (what compile buys), project side only.
# Budget: about 3-5 min on a warm machine (compilation is most of it).
set -uo pipefail
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

timeout 420 python bench/distill_step.py --profile --json "$OUT/distill_step.json" \
    > "$OUT/distill_step_full.txt" 2> "$OUT/distill_step.stderr"
status=$?
timeout 150 python bench/distill_step.py --skip_reference --no-compile --json "$OUT/distill_step_nocompile.json" \
    > "$OUT/distill_step_nocompile.txt" 2>> "$OUT/distill_step.stderr"
tail -n 40 "$OUT/distill_step.stderr"
echo
echo "== profile (project step) =="
sed -n '/^profile of/,$p' "$OUT/distill_step_full.txt" | head -n 40
echo
echo "== without torch.compile (project side only) =="
grep '^| project' "$OUT/distill_step_nocompile.txt"
echo
echo "== distill step (exit status $status) =="
cat "$OUT/env.txt"
sed '/^profile of/,$d' "$OUT/distill_step_full.txt" | tee "$OUT/distill_step.txt"
exit $status
