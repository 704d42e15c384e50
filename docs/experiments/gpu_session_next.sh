#!/usr/bin/env bash
# The next GPU session's measurements (after session 15's H200 runs of ac54ab7-9a403ff), one
# STEP per device call so that each fits the 10-minute limit. Steps that read the real model or
# the corpora need staging first (device_stage.py: chunk0, chunk1, then chunk2 with the wheels
# installed to /tmp/site, three calls back to back: /tmp goes with the machine); the kernel
# steps need none. Run from the repository root:
#
#   bash docs/experiments/gpu_session_next.sh STEP OUT
#
# STEP, in order of priority (minutes on one H200):
#   tests-models   ~5  families, real-model, fine-tuning (the compile_pointwise inductor test of
#                      1cc9dcc has not run on a GPU) and export GPU tests (the bf16 gates-only
#                      export test failed at 66d893f; fixed on CPU in bb9fd7e); needs staging
#   tests-decode   ~4  the decode GPU tests (decode kernels and model; static caches now take a
#                      sparse prefill)
#   bench-decode   ~3  issue 15: bench-decode --tune, with the kernel alone replayed from a CUDA
#                      graph (the eager B=1 numbers are host launch work: empty selection = sparse)
#   decode-quality ~6  issue 15: decode perplexity and passkey with sparse decode
#   bench-kernels  ~5  the issue 16 table (8k / 32k / 128k, backward at 32k), then TTFT at 128k
#                      (kernels unchanged since 8c84a20 but for the launchers' stride helper;
#                      every kernel GPU test passed at 66d893f)
#   gate-passkey   ~6  issue 17: passkey of both gate sets, knob and threshold at ~0.12
#   tests-kernels  ~6  the kernel GPU tests in two processes at once (after any kernel change)
#   tests-export   ~2  the GPU export test alone
#   ft-timing      ~2  issue 13's timing phase (done at 66d893f: row (c) 0.246 s/step)
#   ft-passkey     ~5  issue 13's rows (a), (c) at 0.1 compiled and their passkey (done at 66d893f)
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

FT=(-m seer_attn.eval.finetune_run --model "$GGUF" "${DATA[@]}" --work /tmp/seer/ft --out "$OUT/ft" --no-progress)

case "$STEP" in
  ft-timing)
    timeout 540 "$PY" "${FT[@]}" --phases timing --timing-steps 16 --timing-variants stride-compile frozen-compile dense-compile \
      stride-no-ckpt-compile dense-sdpa-compile > "$OUT/ft.log" 2>&1
    echo "finetune_run: exit $?"; grep "timing," "$OUT/ft.log" ;;
  ft-passkey)
    timeout 560 "$PY" "${FT[@]}" --phases gates0 a c0.1 passkey --densities 0.1 --compile-pointwise --time-budget 520 \
      > "$OUT/ft.log" 2>&1
    echo "finetune_run: exit $? (run again until no phase is 'not finished')"; tail -n 20 "$OUT/ft.log" ;;
  tests-kernels)
    T=tests/kernels/test_gpu_kernels.py
    (timeout 540 "$PY" -m pytest -q -p no:cacheprovider -rfE $T -k "long or bf16_sparse or padded" \
      > "$OUT/kernels_a.log" 2>&1; echo "A: exit $?" >> "$OUT/summary.txt") &
    timeout 540 "$PY" -m pytest -q -p no:cacheprovider -rfE $T -k "not (long or bf16_sparse or padded)" \
      > "$OUT/kernels_b.log" 2>&1; echo "B: exit $?" >> "$OUT/summary.txt"; wait
    grep -hE "^(FAILED|ERROR)" "$OUT"/kernels_*.log; tail -qn 1 "$OUT"/kernels_*.log; cat "$OUT/summary.txt" ;;
  bench-decode) PARTS=bench_decode PY=$PY bash docs/experiments/decode_gpu_session.sh "$OUT" ;;
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
