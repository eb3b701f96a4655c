#!/usr/bin/env bash
# The whole RLHF chain: SFT -> merge -> reward model -> merge -> PPO -> merge -> evaluation of the final model
# against the SFT model on held-out questions, then a summary with plots. ALGO=rloo or ALGO=grpo runs stage 3 with
# training_rl.py --algorithm rloo|grpo (critic-free RL against the same reward model, the same flags; its folder is
# rloo/ or grpo/). With ALGO=dpo, stage 3 is DPO on the preference pairs (training_dpo.py) instead; the reward model
# is still trained, as a judge for the evaluation.
#
#   bash scripts/run_pipeline.sh                      # offline demo: pretrained tiny model, sample data, CPU
#   SEED=3 OUT=runs/seed3 bash scripts/run_pipeline.sh   # the same with every stage seeded with 3
#   ALGO=dpo OUT=runs/dpo bash scripts/run_pipeline.sh   # DPO instead of PPO
#   ALGO=grpo OUT=runs/grpo bash scripts/run_pipeline.sh # GRPO instead of PPO (or ALGO=rloo)
#
#   # a real run: your base model and data, each stage under accelerate with a config from configs/
#   BASE_MODEL=meta-llama/Llama-2-7b-hf DATASET=lvwerra/stack-exchange-paired OUT=runs/llama \
#   LAUNCHER="accelerate launch --config_file configs/accelerate/multi_gpu.yaml" \
#   SFT_ARGS="--load_in_4bit --streaming --max_steps 5000 --seq_length 1024 --learning_rate 1e-5" \
#   RM_ARGS="--load_in_4bit --train_subset 100000 --eval_subset 5000 --max_length 512" \
#   PPO_ARGS="--load_in_4bit --steps 20000 --batch_size 8 --gradient_accumulation_steps 8 --early_stopping true" \
#   bash scripts/run_pipeline.sh
#
# Environment: BASE_MODEL (default: the committed pretrained tiny model), DATASET (default: . = the sample data in
# data/), OUT (default runs/pipeline), SEED (default 0, passed to every stage), ALGO (ppo, rloo, grpo or dpo,
# default ppo), LAUNCHER (default python), PYTHON, and SFT_ARGS, RM_ARGS, PPO_ARGS (training_rl.py, for ppo, rloo and
# grpo), DPO_ARGS, MERGE_ARGS, EVAL_ARGS appended to a stage's command (later flags win). Each stage whose output folder already holds a
# final model is skipped, so re-running continues from the first unfinished stage; the first failing stage
# stops the run with a message naming it.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/pipeline}
PY=${PYTHON:-python}
LAUNCH=${LAUNCHER:-$PY}
DATASET=${DATASET:-.}
SEED=${SEED:-0}
ALGO=${ALGO:-ppo}
case "$ALGO" in
  ppo|rloo|grpo|dpo) ;;
  *) echo "error: ALGO=$ALGO: choose ALGO=ppo, rloo, grpo or dpo" >&2; exit 2 ;;
esac
for OTHER in ppo rloo grpo dpo; do
  if [ "$OTHER" != "$ALGO" ] && [ -d "$OUT/$OTHER" ]; then
    # Its final model and evaluation would be taken for this run's (finished stages are skipped).
    echo "error: OUT=$OUT holds a run with ALGO=$OTHER ($OUT/$OTHER); give this run another OUT" >&2; exit 2
  fi
done
export TOKENIZERS_PARALLELISM=false
# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning threads made steps
# several times slower (benchmarks/README.md).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
mkdir -p "$OUT"
TIMES="$OUT/seconds_per_stage.json"
[ -f "$TIMES" ] || echo "{}" > "$TIMES"

done_stage() { [ -f "$1/adapter_config.json" ] || [ -f "$1/config.json" ] || [ -f "$1/eval.json" ]; }

# stage NAME OUTPUT_DIR COMMAND...: run COMMAND unless OUTPUT_DIR holds a final model; record its seconds.
stage() {
  local name=$1 dir=$2; shift 2
  echo; echo "=== $name -> $dir ==="
  if done_stage "$dir"; then echo "(done already: skipped)"; return 0; fi
  local start=$SECONDS
  if ! "$@"; then
    echo "error: pipeline stage '$name' failed (command: $*); fix it and re-run to continue from this stage" >&2
    exit 1
  fi
  $PY - "$TIMES" "$name" "$((SECONDS - start))" <<'PYEOF'
import json, sys
path, name, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
times = json.load(open(path)); times[name] = seconds; json.dump(times, open(path, "w"))
PYEOF
}

if [ -z "${BASE_MODEL:-}" ]; then
  # Offline demo: the tiny Llama pretrained on the sample data's domain (assets/tiny-pretrained), plain LoRA SFT,
  # a fully fine-tuned reward model, PPO with the held-out gold evaluation every few steps. Whole examples and
  # whole answers: the longest question with its preferred answer is 274 tokens (SFT blocks and the reward model's
  # --max_length 288), and 168 new tokens hold 96% of the preferred answers with their EOS (PPO's responses and
  # the evaluation's answers; benchmarks/README.md, "Whole answers").
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
  BASE_MODEL="$OUT/base"
  stage "pretrained tiny model" "$BASE_MODEL" $PY -m common.tiny_model --pretrained --output_dir "$BASE_MODEL"
  DEMO_SFT="--size_valid_set 200 --packing false --seq_length 288 --batch_size 8 --learning_rate 1e-3
    --num_warmup_steps 10 --max_steps 100 --eval_first_step true --eval_freq 50 --save_freq 100 --log_freq 10"
  DEMO_RM="--use_peft false --per_device_train_batch_size 8 --learning_rate 3e-4 --lr_scheduler_type constant
    --max_steps 250 --max_length 288 --eval_steps 250 --save_steps 250 --logging_steps 25"
  DEMO_PPO="--steps 640 --batch_size 16 --mini_batch_size 4 --ppo_epochs 2 --learning_rate 3e-4
    --output_min_length 168 --output_max_length 168 --init_kl_coef 0.1 --target 4 --horizon 500 --eval_freq 20
    --eval_prompts 32"
  DEMO_DPO="--train_data_dir data/reward --eval_subset 200 --per_device_train_batch_size 8
    --gradient_accumulation_steps 1 --learning_rate 2e-4 --loss_type sigmoid sft --warmup_steps 10 --max_steps 100
    --max_length 288 --eval_first_step true --eval_steps 100 --save_steps 100 --logging_steps 10"
  DEMO_EVAL="--num_prompts 200 --max_new_tokens 168 --best_of_n 16 --best_of_n_prompts 32"
else
  DEMO_SFT="" DEMO_RM="" DEMO_PPO="" DEMO_DPO="" DEMO_EVAL=""
fi

stage "SFT" "$OUT/sft" $LAUNCH training_sft.py --model_name_or_path "$BASE_MODEL" --dataset_name "$DATASET" \
  --subset data/finetune --output_dir "$OUT/sft" --seed "$SEED" $DEMO_SFT ${SFT_ARGS:-}
stage "merge SFT" "$OUT/sft_merged" $PY merge_with_lora.py --adapter_model_name "$OUT/sft" \
  --output_name "$OUT/sft_merged" ${MERGE_ARGS:-}
stage "reward model" "$OUT/rm" $LAUNCH training_reward_model.py --model_name_or_path "$OUT/sft_merged" \
  --dataset_name "$DATASET" --output_dir "$OUT/rm" --seed "$SEED" $DEMO_RM ${RM_ARGS:-}
RM="$OUT/rm"  # a fully fine-tuned reward model is a model already; a LoRA one is merged first
if [ -f "$OUT/rm/adapter_config.json" ]; then
  RM="$OUT/rm_merged"
  stage "merge reward model" "$RM" $PY merge_with_lora.py --adapter_model_name "$OUT/rm" --output_name "$RM" \
    ${MERGE_ARGS:-}
fi
if [ "$ALGO" = dpo ]; then
  stage "DPO" "$OUT/dpo" $LAUNCH training_dpo.py --model_name_or_path "$OUT/sft_merged" --dataset_name "$DATASET" \
    --output_dir "$OUT/dpo" --seed "$SEED" $DEMO_DPO ${DPO_ARGS:-}
else  # ppo, rloo, grpo: the same script and flags; RLOO and GRPO answer each prompt --num_generations (4) times
  stage "$(echo "$ALGO" | tr a-z A-Z)" "$OUT/$ALGO" $LAUNCH training_rl.py --algorithm "$ALGO" --model_name \
    "$OUT/sft_merged" --reward_model_name "$RM" --dataset_name "$DATASET" --subset data/rl --output_dir "$OUT/$ALGO" \
    --seed "$SEED" $DEMO_PPO ${PPO_ARGS:-}
fi
STAGE3=$(echo "$ALGO" | tr a-z A-Z)
stage "merge $STAGE3" "$OUT/final" $PY merge_with_lora.py --adapter_model_name "$OUT/$ALGO" \
  --output_name "$OUT/final" ${MERGE_ARGS:-}
stage "evaluate" "$OUT/eval" $PY evaluate.py --models sft="$OUT/sft_merged" final="$OUT/final" \
  --reward_model_name "$RM" --dataset_name "$DATASET" --subset data/evaluation --seed "$SEED" \
  --output_dir "$OUT/eval" $DEMO_EVAL ${EVAL_ARGS:-}

echo; echo "=== summary ==="
$PY -m common.report "$OUT" --seconds_per_stage "$(cat "$TIMES")" --seed "$SEED"
echo; echo "report: $OUT/report.md   summary: $OUT/summary.json   plots: $OUT/*.png"
