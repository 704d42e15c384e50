#!/usr/bin/env bash
# The next GPU session's measurements (after session 12's H200 runs of bdd4fe6), one STEP per
# device call so that each fits the 10-minute limit; staging first (device_stage.py: chunk0,
# chunk1, then chunk2 with the wheels installed to /tmp/site). Run from the repository root:
#
#   bash docs/experiments/gpu_session_next.sh STEP OUT
#
# STEP, in order of priority (minutes on one H200):
#   tests-kernels  ~4  kernel and decode GPU tests (the SDPA route at density 1 and the eager
#                      static-cache decode test have not run on a GPU yet)
#   tests-models   ~6  families, real-model, fine-tuning and export GPU tests
#   timing-demo    ~4  fine-tuning step at density 1 through the Seer layer (SDPA now) vs plain
#                      SDPA (issue 13 (a): <= 0.64 s/step), then the GPU demo (issue 12: the
#                      command results/demo/h200.json cites)
#   quality        ~6  issue 12's quality re-run: the q1 command of smollm2_quality_h100.md
#                      (results/quality/h100_sink_local_400steps.json), without its passkey
#   decode-quality ~6  issue 15: decode perplexity and passkey with sparse decode
#   gate-passkey   ~6  issue 17: passkey of both gate sets, knob and threshold at ~0.12
#
# Every step writes under OUT/STEP and prints its table last.
set -u
STEP=${1:?usage: gpu_session_next.sh STEP OUT}
OUT=${2:?usage: gpu_session_next.sh STEP OUT}/$1
PY=${PY:-python3}
GGUF=${GGUF:-/tmp/seer/smollm2.gguf}
CORPORA=${CORPORA:-/tmp/seer/corpora}
export SEER_SMOLLM2_GGUF=${SEER_SMOLLM2_GGUF:-$GGUF} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
DATA=(--train "$CORPORA/train.jsonl" --eval "$CORPORA/eval.jsonl")

case "$STEP" in
  tests-kernels) PY=$PY bash docs/experiments/gpu_tests.sh kernels "$OUT" ;;
  tests-models) PY=$PY bash docs/experiments/gpu_tests.sh models "$OUT" ;;
  timing-demo)
    timeout 200 "$PY" -m seer_attn.eval.finetune_run --model "$GGUF" "${DATA[@]}" --work /tmp/seer/ft \
      --out "$OUT/finetune_timing" --phases timing --timing-variants dense dense-sdpa --no-progress \
      > "$OUT/timing.log" 2>&1
    echo "timing: exit $?"; grep -A6 "^| variant" "$OUT/timing.log"
    timeout 300 "$PY" -m seer_attn.hub_cards.cli demo --output "$OUT/demo" > "$OUT/demo.log" 2>&1
    echo "demo: exit $?"; tail -n 25 "$OUT/demo.log" ;;
  quality)
    timeout 560 "$PY" -m seer_attn.eval.quality_run "${DATA[@]}" --no-progress --keep-sink --keep-local 1 \
      --steps 400 --thresholds 1e-2 2e-2 4e-2 --nz-ratios 0.1 0.2 --phases distill ppl --out "$OUT/q1" \
      > "$OUT/quality.log" 2>&1
    echo "quality: exit $?"; tail -n 25 "$OUT/quality.log" ;;
  decode-quality) PARTS=decode_quality DQ_LIMIT=560 PY=$PY bash docs/experiments/decode_gpu_session.sh "$OUT" ;;
  gate-passkey)
    timeout 560 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain retrieval \
      --phases passkey --passkey-settings gate:threshold=0.03 --budget-s 480 --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 8 "$OUT/gate_quality.log" ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
