#!/usr/bin/env bash
# The whole chain on the sample data with the offline tiny model (see README.md). Stages that exist so far:
# build the tiny model, then SFT. Later stages (merge, reward model, PPO) are added as they land.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pipeline}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

stage() { echo; echo "=== $1 ==="; }

stage "tiny model"
[ -f "$OUT/tiny/config.json" ] || $PY -m common.tiny_model --output_dir "$OUT/tiny"

stage "SFT"
if [ ! -f "$OUT/sft/adapter_config.json" ]; then
  $PY training_sft.py --model_name_or_path "$OUT/tiny" --dataset_name . --subset data/finetune \
    --size_valid_set 200 --seq_length 128 --batch_size 8 --max_steps 80 --learning_rate 5e-3 \
    --num_warmup_steps 4 --lora_modules_to_save lm_head --eval_first_step true --eval_freq 40 --save_freq 40 \
    --log_freq 5 --output_dir "$OUT/sft" ${SFT_ARGS:-} || { echo "error: stage SFT failed" >&2; exit 1; }
fi
$PY - "$OUT/sft" <<'PYEOF'
import sys
from common.outputs import read_metrics
m = read_metrics(sys.argv[1])
ev = [r["eval_loss"] for r in m if "eval_loss" in r]
print(f"\nSFT: eval loss {ev[0]:.3f} -> {ev[-1]:.3f} over {max(r['step'] for r in m)} steps ({sys.argv[1]})")
PYEOF
