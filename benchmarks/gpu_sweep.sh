#!/usr/bin/env bash
# Fine-tuning sweep on one CUDA GPU, from a packed dataset, in about 10 minutes (issue 10).
#
#   here:   pneumoscope pack ../shared/data/chest_xray --out gpu/chest_xray-256.zip --size 256
#           echo gpu/ >> .git/info/exclude          # carried, never committed
#   there:  bash benchmarks/gpu_sweep.sh gpu/chest_xray-256.zip "$OUT"
#
# Needs torch with CUDA on the GPU machine; the package's other dependencies are installed
# from wheels in gpu/wheels when there is no network (pip download them here first).
# Each recipe is `pneumoscope train` with stage 2 on the GPU (AMP, channels-last), then
# `pneumoscope evaluate` on the pack's test/ split with the run's own validation threshold.
set -euo pipefail
DATA=${1:?packed dataset .zip}
OUT=${2:-gpu-results}
mkdir -p "$OUT"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
if ! python -c "import pneumoscope" 2>/dev/null; then
    pip install --quiet --no-index --find-links gpu/wheels -e . || pip install --quiet -e .
fi
export PNEUMOSCOPE_CACHE="$OUT/cache"
declare -A RECIPES=(
    [top-4ep]="--finetune-epochs 4 --unfreeze top"
    [all-lr3e-5-6ep]="--finetune-epochs 6 --unfreeze all --finetune-lr 3e-5"
    [all-lr1e-4-strong-8ep]="--finetune-epochs 8 --unfreeze all --finetune-lr 1e-4 --augment strong"
)
for name in "${!RECIPES[@]}"; do
    for seed in 0 1 2; do
        run="$OUT/runs/$name-seed$seed"
        # shellcheck disable=SC2086
        pneumoscope -q train "$DATA" --out "$run" --seed "$seed" --accelerator gpu --workers 8 ${RECIPES[$name]}
        pneumoscope -q evaluate "$run" "$DATA" --out "$run.eval" --no-audit --bootstraps 200
        python - "$name" "$seed" "$run.eval/metrics.json" >> "$OUT/sweep.jsonl" <<'PY'
import json, sys
m = json.load(open(sys.argv[3]))
print(json.dumps({"recipe": sys.argv[1], "seed": int(sys.argv[2]), **{k: m[k] for k in ("roc_auc", "accuracy", "sensitivity", "specificity")}}))
PY
    done
done
cat "$OUT/sweep.jsonl"
