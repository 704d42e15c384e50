#!/usr/bin/env bash
# One GPU session for decode sparsity (issue 15), about 6 minutes on one H200:
#   1. the GPU tests of the model's Triton decode path (every block = dense decode, dynamic and
#      static cache; the share read) and of the decode kernel (bf16, 32k/128k, int64 lists);
#   2. bench-decode with --tune (kernel vs SDPA at B 1/16 x 32k/128k, the launch floor, the
#      gate's per-layer cost, one layer eager vs CUDA graph, time per output token at 4x128k
#      and 16x32k), envelope + CSV + PNG under OUT/decode;
#   3. a short decode-quality run on SmolLM2 (gates distilled 150 steps at 4k, decode
#      perplexity of 8 windows of 4096 tokens with their second half as decode steps, dense /
#      share=0.1 / budget=2048, paired passkey at 2k/4k, 3 prompts per cell), envelope + markdown
#      under OUT/decode_quality. The full protocol (8192-token windows, >= 75 passkey
#      prompts) is the longer command printed at the end.
#
#   SEER_GIT_COMMIT=<commit> bash docs/experiments/decode_gpu_session.sh OUT
#
# Each part runs under its own time limit (a slow or failing part does not stop the next); a
# summary of exit codes and seconds is printed last, after each part's own table. PARTS picks
# parts (default "gpu_tests bench_decode decode_quality"): on the H200 (bdd4fe6) the decode-
# quality part needed more than its 200 s after the tests and the benchmark (distillation 33 s,
# then the windows and passkey), so run it in a call of its own with DQ_LIMIT=500:
#   PARTS=decode_quality DQ_LIMIT=500 bash docs/experiments/decode_gpu_session.sh OUT
set -u
OUT=${1:?usage: decode_gpu_session.sh OUT}
PY=${PY:-python}
GGUF=${GGUF:-/tmp/seer/smollm2.gguf}
CORPORA=${CORPORA:-/tmp/seer/corpora}
mkdir -p "$OUT"
: > "$OUT/summary.txt"

PARTS=${PARTS:-gpu_tests bench_decode decode_quality}
DQ_LIMIT=${DQ_LIMIT:-200}

part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc, $(( $(date +%s) - start )) s (limit $limit s)" >> "$OUT/summary.txt"
}

part gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rfEs \
  tests/modeling_seer/test_decode_gpu.py tests/kernels/test_gpu_decode.py
part bench_decode 180 "$PY" -m seer_attn.eval.bench_decode --tune --out "$OUT/decode"
part decode_quality "$DQ_LIMIT" "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" \
  --train "$CORPORA/train.jsonl" --eval "$CORPORA/eval.jsonl" --steps 150 --seq-len 4096 \
  --length 4096 --windows 8 --batch-size 8 --passkey-lengths 2048 4096 --passkey-samples 3 \
  --no-progress --out "$OUT/decode_quality"

echo "== GPU tests"; tail -n 8 "$OUT/gpu_tests.log"
echo "== bench-decode"
if grep -q '^# ' "$OUT/bench_decode.log"; then sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 12
else tail -n 5 "$OUT/bench_decode.log"; fi
echo "== decode quality"; tail -n 10 "$OUT/decode_quality.log"
echo "== full protocol, later (about 15 min): $PY -m seer_attn.eval.decode_quality --model $GGUF" \
  "--train $CORPORA/train.jsonl --eval $CORPORA/eval.jsonl --out OUT/decode_quality_full"
echo "== summary"; cat "$OUT/summary.txt"
