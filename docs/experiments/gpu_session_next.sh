#!/usr/bin/env bash
# The next GPU session's measurements (after session 13's H200 runs of af41b99 and 5b912b1), one
# STEP per device call so that each fits the 10-minute limit. Steps that read the real model or
# the corpora need staging first (device_stage.py: chunk0, chunk1, then chunk2 with the wheels
# installed to /tmp/site); the kernel steps need none. Run from the repository root:
#
#   bash docs/experiments/gpu_session_next.sh STEP OUT
#
# STEP, in order of priority (minutes on one H200):
#   tests-kernels  ~7  the kernel GPU tests (more than 290 s since the one-pass pooling commit:
#                      212 of 217 cases passed in session 13, the last five test_bf16_window_small
#                      cases did not run)
#   tests-decode   ~4  the decode GPU tests (decode kernels and model)
#   bench-kernels  ~5  the issue 16 table with the one-pass pooling and longest-rows-first
#                      kernels (8k / 32k / 128k, backward at 32k), then TTFT at 128k
#   tests-export   ~2  the GPU export test (fixed on CPU in cc99e26: fresh processes keep PYTHONPATH)
#   decode-quality ~6  issue 15: decode perplexity and passkey with sparse decode
#   gate-passkey   ~6  issue 17: passkey of both gate sets, knob and threshold at ~0.12
#   tests-models   ~6  families, real-model, fine-tuning and export GPU tests (passed at af41b99
#                      but for the export test)
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
  tests-decode) PY=$PY bash docs/experiments/gpu_tests.sh decode "$OUT" ;;
  bench-kernels)
    timeout 330 "$PY" -m seer_attn.eval.bench_kernels --lengths 8192 32768 131072 --bwd-lengths 32768 \
      --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
    echo "bench_kernels: exit $?"; tail -n 12 "$OUT/kernels.log"
    timeout 200 "$PY" -m seer_attn.eval.bench_ttft --lengths 131072 --out "$OUT/ttft" > "$OUT/ttft.log" 2>&1
    echo "bench_ttft: exit $?"; tail -n 8 "$OUT/ttft.log" ;;
  tests-export)
    timeout 110 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/hub_cards/test_export.py -k gpu > "$OUT/export.log" 2>&1
    echo "export: exit $?, $(tail -n 1 "$OUT/export.log")" ;;
  tests-models) PY=$PY bash docs/experiments/gpu_tests.sh models "$OUT" ;;
  decode-quality) PARTS=decode_quality DQ_LIMIT=560 PY=$PY bash docs/experiments/decode_gpu_session.sh "$OUT" ;;
  gate-passkey)
    timeout 560 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain retrieval \
      --phases passkey --passkey-settings gate:threshold=0.03 --budget-s 480 --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 8 "$OUT/gate_quality.log" ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
