#!/usr/bin/env bash
# One-shot GPU checks on a lent CUDA machine (see bench/gpu_check.py for what each section checks).
#
#   bash bench/gpu_check.sh [BUDGET_SECONDS]          # on the device, from the repository root
#   GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_SMALL=1 GPU_CHECK_NO_WHEELS=1 PY=.venv/bin/python bash bench/gpu_check.sh 300
#                                                     # a CPU dry run on a dev machine (its venv; no wheels)
#
# Wheels in .whl/ (megatron-core, pydantic, transformers pinned as pyproject.toml pins them) are installed into
# /tmp/site first when present. Each section runs in its own process under `timeout`, against one overall budget,
# in priority order: HF family bf16, megatron trainer on NCCL, a Qwen3-14B-shaped layer. Every check prints one
# PASS/FAIL/SKIP line; a summary ends the log ($OUT/gpu_check.log, or /tmp/gpu_check_out/gpu_check.log).
set +e
BUDGET=${1:-400}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
PY=${PY:-python3}
W=${GPU_CHECK_WORK:-/tmp/gpu_check_work}
rm -rf "$W" && mkdir -p "$W"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
START=$SECONDS
SUMMARY=()

left() { echo $((BUDGET - (SECONDS - START))); }
# section NAME LIMIT CMD...: runs CMD under min(LIMIT, budget left - 10 s); records its verdict lines
section() {
  local name=$1 limit=$2; shift 2
  if [ -n "$GPU_CHECK_ONLY" ] && [[ " $GPU_CHECK_ONLY " != *" $name "* ]]; then return 0; fi
  local budget=$(( $(left) - 10 ))
  (( budget < limit )) && limit=$budget
  if (( limit < 15 )); then
    echo "SKIP $name: out of time budget"; SUMMARY+=("SKIP $name: out of time budget"); return
  fi
  echo; echo "=== $name (limit ${limit}s, $(( SECONDS - START ))s elapsed) ==="
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$W/$name.out" 2>&1
  local rc=$?
  cat "$W/$name.out"
  (( rc == 124 || rc == 137 )) && echo "FAIL $name: timed out after ${limit}s" >> "$W/$name.out"
  echo "--- $name: rc $rc, $(( SECONDS - t0 ))s"
  while IFS= read -r line; do SUMMARY+=("$line"); done < <(grep -E '^(PASS|FAIL|SKIP) ' "$W/$name.out")
  return $rc
}

echo "gpu_check: $(date -u +%FT%TZ) on $(hostname), budget ${BUDGET}s, commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv 2>&1 | head -3

if [ -z "$GPU_CHECK_NO_WHEELS" ] && ls .whl/*.whl >/dev/null 2>&1; then
  t0=$SECONDS
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | grep -v -i "warning" | tail -5
  export PYTHONPATH=/tmp/site:$ROOT
  echo "wheels installed into /tmp/site in $(( SECONDS - t0 ))s: $(ls .whl | tr '\n' ' ')"
else
  export PYTHONPATH=$ROOT
fi

section env 60 $PY bench/gpu_check.py env "$W"
# 1. the HF family in bf16 against the tier exports in vanilla transformers (+ 4. the attention path)
section hf 150 $PY bench/gpu_check.py hf "$W"
# 2. the megatron trainer on one GPU over NCCL (world 1)
section prep 90 $PY bench/gpu_check.py prep "$W"
TR=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m ruyi_core.megatron.trainer --stage cpt
    --family "$W/family" --data "$W/packed")
# transformer_impl auto (the default) on a GPU without Transformer Engine: a refusal naming the fix is expected
section trainer_auto 90 "${TR[@]}" --spec "$W/spec_auto.yaml" --init-hf "$W/family" --out "$W/train_auto"
rc=$?
if [ -n "$GPU_CHECK_ONLY" ] && [[ " $GPU_CHECK_ONLY " != *" trainer_auto "* ]]; then
  line=""
elif [ -n "$GPU_CHECK_ALLOW_CPU" ] && ! $PY -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  line="SKIP megatron.auto_without_te: CPU dry run (auto means local on the CPU; rc $rc)"
elif (( rc != 0 )) && grep -q "Transformer Engine cannot be used" "$W/trainer_auto.out"; then
  line="PASS megatron.auto_without_te: refused (rc $rc): $(grep -m1 -o 'error: .*' "$W/trainer_auto.out" | cut -c1-400)"
elif (( rc == 0 )); then
  line="FAIL megatron.auto_without_te: trained without Transformer Engine under transformer_impl auto (silent fallback)"
else
  line="FAIL megatron.auto_without_te: rc $rc without the expected refusal: $(grep -E 'error' "$W/trainer_auto.out" | tail -1 | cut -c1-300)"
fi
[ -n "$line" ] && { echo "$line"; SUMMARY+=("$line"); }
section trainer_local 180 "${TR[@]}" --spec "$W/spec_local.yaml" --init-hf "$W/family" --export "$W/train_local_hf" \
  --out "$W/train_local"
rc=$?
if [ -z "$GPU_CHECK_ONLY" ] || [[ " $GPU_CHECK_ONLY " == *" trainer_local "* ]]; then
  line="$([ $rc = 0 ] && echo PASS || echo FAIL) megatron.train_local_bf16_nccl: rc $rc"
  echo "$line"; SUMMARY+=("$line")
fi
[ -f "$W/train_local/cpt_losses.jsonl" ] && section verdict 60 $PY bench/gpu_check.py verdict "$W"
# 3. one Qwen3-14B-shaped decoder layer at seq 8192 against ruyi plan
section layer 150 $PY bench/gpu_check.py layer "$W"

cp "$W"/train_local/cpt_losses.jsonl "$OUT/" 2>/dev/null
echo; echo "=== summary ($(( SECONDS - START ))s) ==="
printf '%s\n' "${SUMMARY[@]}"
n_fail=$(printf '%s\n' "${SUMMARY[@]}" | grep -c '^FAIL')
n_pass=$(printf '%s\n' "${SUMMARY[@]}" | grep -c '^PASS')
n_skip=$(printf '%s\n' "${SUMMARY[@]}" | grep -c '^SKIP')
echo "TOTAL: $n_pass PASS, $n_fail FAIL, $n_skip SKIP"
exit 0
