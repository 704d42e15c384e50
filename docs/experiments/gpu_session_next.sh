#!/usr/bin/env bash
# The next GPU session's measurements (after session 16's H200 runs of 7867506), one STEP per
# device call so that each fits the 10-minute limit. Steps that read the real model or the
# corpora need staging first (device_stage.py: chunk0, chunk1, then chunk2 with the wheels
# installed to /tmp/site, three calls back to back: /tmp goes with the machine); the kernel
# steps need none. A cold machine start cost ~400 s of the session's device time in session 16:
# put the staging chunks into the first calls of real work. Run from the repository root:
#
#   bash docs/experiments/gpu_session_next.sh STEP OUT
#
# The device's copy of the tree sits over a stale checkout whose .git reports an old, dirty commit: put the local
# HEAD into the command line, SEER_GIT_COMMIT=<git rev-parse HEAD here> SEER_GIT_DIRTY=0 (training/results.py lets
# them win), instead of adding tree_commit to the envelopes by hand afterwards (sessions 40-43 did).
#
# Session 25 ran dense-layers, dense-layers225 and coverage-layers (gate_quality.md section 8:
# layer 0 is what the knob breaks for passkey; the coverage rule beats the knob and the threshold
# at 8k). Next: density-profile (the per-sequence knob with the coverage rule's spread over the
# layers, built after those runs) and gate-calib-coverage (the coverage solved on held-out windows
# as the density knob, and at the threshold's density: issue 17's knob target), carrying the 225-run's gates
# (seer_outputs/pk/gates_plain_bf16.safetensors, ignored by git) with the staging's chunk2.
#
# Session 26 had no device (none lent). Its plan, still next: stage (gates with chunk2), gate-long
# (1200 steps, the bf16 gates kept in /tmp/seer/gates_long.safetensors), then GATES=/tmp/seer/gates_long.safetensors
# for gate-calib-coverage and density-profile: longer distillation with the coverage rule is the
# nearest measured route to issue 17's 8k perplexity targets (H100: 2400 steps took the threshold
# from 12.39 to 12.21 at 0.12; the coverage rule was 0.7% below the threshold at 0.121).
#
# Session 28: gate-long ran (215 s, H200); the gates came back (seer_outputs/pk/gates_long_bf16.safetensors, ignored by git;
# carry them with chunk2) but no machine could be started again. On the CPU they move 8k PPL at 0.1 by < 1%
# (gate_quality.md section 10). Next: stage with those gates, gate-calib-coverage (GATES=the carried file), then
# decode-distill (decode gates for the CPU's offline decode evaluator, decode_ppl_offline.py ,gate).
#
# Session 30 (H100): gate-calib-coverage (1200-step gates), decode-distill (its gates did not come back: 3 folders deep
# under OUT and over 16 MiB; the step now splits them into parts beside its log) and gate-capacity ran (gate_quality.md
# section 12), then tests-kernels on the H100 at 525a83c: 231 passed (the pair programs' test_pair_rows_long and the
# preamble helpers since bfaeb65 included). Next: stage with the 1200-step gates, decode-distill, gate-free, then
# pair-variants and bench-kernels.
#
# Session 31: no device lent ("no new device machine is lent at present"). Built the gain rule (seer_sparsity_method="gain",
# gate_quality.md section 14): on the CPU at 8k it beats the threshold by 2.6% / 1.8% and the coverage by 0.8% at 0.1 / 0.05.
# The oracle phase of gate_quality.py --oracle ran end to end on the CPU (1024 tokens). Next: stage with the 1200-step gates,
# gate-gain (the knob target with the gain rule), decode-distill, gate-free, then pair-variants and bench-kernels.
#
# Session 33 (H100, ~10 minutes of device time after ~700 s of refused starts): prior-topk, then 250-step plain and
# through-the-prior gates with their top-k, then share and density sweeps (gate_quality.md section 17; the mixture's
# top-k beats the mean-pooled baseline from 0.05 to 0.4, distilling through it is level). Next: stage with the
# 1200-step gates, gate-prior (the coverage rule on the mixture: does it beat coverage alone above 0.1?), gate-gain,
# decode-distill, gate-free, then pair-variants and bench-kernels.
#
# Session 34 (H100 at once, ~25 minutes of device time): gate-prior at 0.3 / 0.2 / 0.1 / 0.05, then 0.12 / 0.097 /
# 0.0985 and shares 2/3 and 0.4, then a 75-prompt passkey with the prior (gate_quality.md section 18: gain on the
# mixture meets the knob target at every density and reaches 12.19 at 0.0998, 11.92 at 0.122). Next: gate-gain (gain on
# the gate alone: how much is the prior?), a 225-prompt passkey with the prior and gain solved per length,
# decode-distill, then pair-variants and bench-kernels.
#
# Session 35 (H100 at once): gate-long again (the 1200-step gates were lost with an old checkout; 178 s), the 225-prompt
# passkey with the prior (gate_quality.md section 19: the knob at 0.12 loses the same 38 as without it), bench-kernels
# and pair-variants at 8dbd9c6, then passkey225-cells with gain per prompt length (section 19: level with the knob at
# 0.2; the passkey target stays missed). Next: decode-distill, gate-free; kernel work for issue 16 (dense 1.0002x
# cuDNN at 128k, d1.0 1.16x dense, d0.1 1.21x rho x cuDNN).
#
# Session 36 (H100): decode-distill (800-step decode gates, kept in seer_outputs/dec/, ignored by git); on the CPU
# the training-free mean-pooled decode score beat them at a 2048-token budget (decode_quality.md, session 36).
# Then decode-prior: the model's seer_decode_meanpool_prior at the issue's protocol, carrying those gates as DGATES.
#
# Session 37 (H100): decode-prior and its passkey (the prior at 0.7: 1.0193x at 2048 tokens), bench-decode --prior.
# Session 38 (H100): prior-sweep (prior_mix with tl.dot: 16-55 us a layer at 128k), decode-free (the loss without the
# sink: lower decode perplexity everywhere, the default since) and its passkey (decode_quality.md, session 38). Next:
# prior-sweep again (each launch alone) with decode-profile, then issue 17's gate-free and issue 16's kernels.
#
# Session 39 (one H100 call, then two H200 calls, after ~10 refused starts): gate-select (the one-launch gate and
# wider selection passes: slower, off; the gate share as the graph step runs it: 11% at 16 x 128k), then bench-decode
# on the H200 at 128k and 32k (13% / 20% at B=16). Next: issue 17's gate-free, issue 16's kernels, bench-decode at
# B=1 with a Triton projection of the gate's query (the cuBLAS bmm is ~8 us of B=1's ~19 us of gate).
#
# Session 40 (one H100 call, then ~15 refused starts): e2e-profile (the end-to-end token by kernel group, H100, 16 layers:
# GEMMs 3.16 of the fused sparse token's 5.48 ms). Built since, unmeasured: top_blocks by radix select (TOP_BLOCKS_BITS 8)
# and the dense row without the gate. Next: radix-e2e (GPU tests, selection passes, profile with the radix and merged
# projections), then bench-radix (bench-decode with bits 1 and 8; its dense row now reads every block unscored).
#
# Session 41 (H100, four calls, then ~8 refused starts): radix-tests (radix slower: off), skinny-gemm (1.00-1.15x:
# dropped), e2e-profile (one-launch cache writes and merged projections: 0.21 + 0.22 ms a token), bench-merged (fused
# 2.93x / 2.91x, 16 layers). Built after, interpreter-tested, off until measured: top_blocks' early stop
# (TOP_BLOCKS_EARLY_STOP) and decode_window (ONE_LAUNCH_WINDOW). Next: early-lean (or tests-bench with merged_early in
# its profile; bench-decode takes --early-stop --one-launch-window); if faster, turn both on and run bench-merged on an
# H200 (32 layers) for the issue's machine.
#
# Session 42 (one H100 stretch of four calls after 11 refused or lost starts, ~1130 s of the budget): s42-lean (decode GPU
# tests 61 passed before its 180 s limit, the last 2 in a second call; the profile: merged_early 0.10 ms faster), then
# bench-decode with both options on (fused 2.93x / 2.95x) and its kernel rows; both options are the defaults now (and
# bench-decode's flags --no-early-stop / --no-one-launch-window). Next: bench-merged on an H200 (32 layers), the GPU
# test files in full (tests-decode), tests-models (test_gpu_families.py: 7 passed before a 130 s limit).
#
# Session 43 (H100 at once for s43-tma; one H200 start refused, ~120 s; then H100 for s43-32 and a second 32-layer run):
# s43-tma (decode kernel through TMA: within 1% of pointers, off; its GPU tests ran past their 150 s limit, no failure
# among the first ~75), s43-32 (--shared-kv at 16 layers equals unshared to 0.2%; 32 layers fused 3.06x / 3.03x, a
# second run 3.07x / 3.03x), s43-tests (test_gpu_decode 63 passed; the kernel indifferent to cache padding and block
# pattern), s43-pdl at ad699fa (programmatic dependent launch of the decode chain: slower, removed), then
# test_gpu_families.py -k distill_step (7 passed, 56 s) and tests/modeling_seer/test_decode_gpu.py (10 passed) at
# c7ff6a1. Next: s44-first (32 layers with the dense rows replayed from a graph; the 16 x 32k profile), on an H200 if
# one comes (s43-h200 for its TMA sweep too).
#
# Session 44 (two H100 calls and one H200 call among ~8 refused starts, ~1000 s of the budget): s44-gate on an H100
# (the G-column gate query and one-warp top_blocks at <= 512 blocks: 16 x 32k gate share 16.8% -> 15.8%; both the
# defaults since cf1b800; s44-first's 32 layers 3.07x / 3.03x again, the dense rows replayed from a graph at flash's
# rate; its bench envelope nested too deep to come back), s44-defaults on an H200 at 851e47e (32 layers unshared
# 2.85x / 2.86x; test_gpu_decode 72 passed, test_decode_gpu 10 passed; the --fused sweep cut after 1 x 32k: one
# launch slower). Next: s44-fused-rest (the one-launch configs at 16 x 32k / 1 x 128k, ~80 s), then issue 15's
# H200 gap (~11 us a layer: the gate's ~18 us and the kernel's 70 us at 4 x 128k) if an idea comes first.
# Keep $OUT's files at most two folders deep (a step that calls another step nests a level).
#
# Session 45 (two H100 calls among ~9 refused starts): s45-first at 7b6543f measured two options of issue 15, top_blocks
# bisecting the row's finite values before its keys (level: within 0.5 us) and the decode kernel's last part of each
# pair merging the partials instead of the combine launch (slower everywhere; its 3 GPU tests failed); both removed
# since, so s45-first runs only at 7b6543f. gate_scores on float8 block keys: 3.5 us off at 16 x 32k (share 14.0%),
# 14 us at 16 x 128k (results/decode/h100_gate_s45_sweep.json). bench-decode base reproduced 3.07x / 3.03x. Then
# s45-keys8 at 15a6d7e: gate_scores on float8 / int8 keys with a scale per block, 16 x 32k share 15.5% -> 13.4% / 14.6%
# (results/decode/h100_gate_keys8_sweep.json); the CPU screen (decode_ppl_offline.py ,keys=f8 / i8) kept decode PPL
# within 0.06%. Next: the pooled-K cache storing float8 keys and scales (eager cache, graph state, prefill fill), then
# the decode-quality protocol, bench-decode's kernel rows (gate share) and the end to end with it.
#
# Session 46 (three H100 calls among ~6 refused starts): the pooled-K cache stores float8 / int8 gate keys
# (seer_decode_key_format, cb3d2ac). s46-keys8 (test_decode_gpu.py 12 passed; its bench envelope nested too deep), then
# s46-base and s46-bench model at e9b9262 on one machine: 16 x 32k gate share 15.8% -> 13.6% float8 / 14.2% int8,
# fused end to end 3.07x / 3.05x -> 3.10x / 3.07x (results/decode/h100_decode32_keys_f8.json). Next: stage, then
# s46-quality (the protocol's decode PPL with 8-bit keys: what making them the default needs), then s46-e2e on an H200.
# Session 47: s46-quality ran (H100: int8 keys the default since); next, on an H200: s47-first (the end to end with
# 16-bit and float8 keys; FORMATS="model i8" for the default int8 keys instead), then s47-skinny (is cuBLAS's decode
# GEMM a lever there?).
# Session 48 (~10 refused starts, then one H100 machine for three calls; a cold start took most of the budget): the
# decode kernel's selection patterns (decode_kernel_tma.py --layout: ~24 us a call plus the dense rate over the blocks
# read, the pattern indifferent), s46-e2e with int8 keys (3.07x / 3.06x), gate-long and gate-prior at DENSITIES=0.5
# (issue 17: the gate on the mixture ahead of both baselines at 0.5). Next, on an H200: s48-h200 (the --layout run and
# the int8-key end to end there), the decode kernel's GPU tests, then s47-skinny.
#
# Session 29: distill --gate-hidden-size / --q-pooling / --k-pooling exist now; gate-capacity measures them (issue 17's
# untried "gate capacity" direction) after gate-calib-coverage and decode-distill. Session 29 got no machine (every start
# refused); its CPU screen of wide / qmax (gate_quality.md section 11) gains <= 1% at 0.1. Next session: the same plan.
#
# STEP, in order of priority (minutes on one H200):
#   gate-gain      ~6  issue 17: the gain rule beside the coverage and the threshold, held-out calibration at 0.3 / 0.2
#                      / 0.1 / 0.05 and each bisected to the threshold's density (the knob target); GATES; needs staging
#   gate-prior     ~8  issue 17: gate-gain with the mean-pooled prior (seer_meanpool_prior=PRIOR, default 0.5), then the
#                      baselines at the same densities; GATES; needs staging
#   prior-topk     ~3  issue 17: top-k of the gate's scores with the mean-pooled prior (PRIOR) against the mean-pooled
#                      baseline at 0.1 / 0.05, every window; GATES; needs staging (first: cheapest issue-17 step)
#   gate-through   ~9  issue 17: gates distilled through the mean-pooled prior (--distill-prior PRIOR, default 0.5)
#                      beside plain gates, 250 steps each, both served with the prior, at 0.1 / 0.05; needs staging
#   gate-free      ~9  issue 17: free_blocks.py (the gate's softmax without the forced blocks) trained and applied to
#                      GATES' selection only, and the oracle at 0.1 / 0.05, 8k; needs staging
#   gate-capacity  ~9  issue 17: gates of twice the width (wide) and with Q max-pooled too (qmax) beside plain, 250
#                      steps each, knob / threshold / coverage at 0.1 at 8k; needs staging
#   gate-long      ~8  issue 17: distil STEPS (default 1200) of 8192 tokens, plain data (250 took 82 s); needs staging
#   density-profile ~8  issue 17: seer_density_profile (the knob spread over the layers as coverage 0.75 /
#                      0.9 spreads it on 4 train windows) at 8k perplexity beside the knob, the coverage
#                      rule and the threshold, then its 225-prompt passkey; carries GATES; needs staging
#   gate-calib-coverage ~5 issue 17: gate_quality.py --coverage with the carried gates (GATES): knob,
#                      threshold and coverage solved on 4 held-out train windows at 0.3 / 0.2 / 0.1 /
#                      0.05, the coverage bisected to the threshold's density (PPL ratio), then streaming
#                      and mean-pool at those densities; needs staging
#   decode-free    ~9  issue 15: decode gates distilled without the sink in their loss (the default since session 38;
#                      FORCED=1: with it, the loss up to session 37), 800 steps, then decode-prior's perplexity settings;
#                      needs staging (session 38, H100: results/decode/h100_quality_free_loss.json)
#   gate-select    ~3  issue 15: bmm + gate_top_blocks (one launch) vs gate_scores + top_blocks, 1/2/4-bit passes
#   prior-sweep    ~2  issue 15: prior_mix's variants (tl.dot vs broadcast, 64-256 blocks per program), graph-replayed
#   decode-quality ~6  issue 15's full protocol (300-step gates at 8k, decode perplexity of 16
#                      8192-token windows, dense / share=0.1 / budget=2048, passkey 75 prompts
#                      paired, sparse decode and sparse prefill + decode); decode perplexity
#                      now runs as teacher-forced graph-mode steps (at 7867506 the eager loop
#                      took 295 s for the dense setting alone); needs staging
#   decode-variants ~6 decode perplexity of one distillation's gates against the oracle (the
#                      step's true block mass) and streaming at share 0.1 / 0.2 / budget 2048, and
#                      with 2 local blocks always read; needs staging
#   decode-mass    ~9  decode perplexity and kept share of selection by predicted mass (mass=P,
#                      0.5 .. 0.9) against share 0.1 / 0.2 / budget 2048, one distillation's gates
#   decode-mass-oracle ~8 the same with the oracle's scores (the step's true block mass): is it the
#                      rule or the gate? (20-step gates: the oracle does not read them)
#   decode-retrieval ~9 gates distilled with retrieval-structured data (25%) and 256 decode rows
#                      per sequence: decode perplexity and passkey at share 0.1, gate and oracle
#   decode-all     ~9  tests-decode, bench-decode and decode-profile below in one call (fewer cold
#                      starts); no staging: send chunk0 with it, then chunk1, then decode-quality
#   tests-decode   ~4  the decode GPU tests, first after any change to the kernels: the new
#                      top_blocks selection kernel (bea7e4f, interpreter-tested only) and
#                      graph-mode decode with compiled layers (since 7867506)
#   bench-decode   ~2  issue 15: bench-decode with graph-mode rows (7867506: 2.32x / 2.56x fused at
#                      4 x 128k against >= 3x; graph steps select through top_blocks since bea7e4f)
#   decode-sweep   ~2  issue 15: a sparse layer's three kernels replayed, launch configs x programs per
#                      SM, top_blocks warps, old vs new gate logits (H200 at 9842fea: 108 -> 91 us
#                      per layer at 4 x 128k; results/decode/h200_step_sweep*.json)
#   radix-e2e      ~6  issue 15: decode GPU tests, top_blocks' selection passes (radix: 8 bits), then e2e-profile
#   tests-bench    ~6  issue 15: the decode kernel GPU tests, then bench-merged
#   bench-merged   ~8  issue 15: model decode GPU tests, bench-decode e2e (fused = compiled + merged projections), profile
#   radix-tests    ~4  issue 15: the decode GPU tests (radix top_blocks, decode_append, the model's), selection passes
#   skinny-gemm    ~4  issue 15: a Triton skinny GEMM (M <= 16, split-K in one launch) vs cuBLAS, decode shapes
#   bench-radix    ~5  issue 15: bench-decode at 128k with top_blocks by bisection and by radix select
#   e2e-profile    ~3  issue 15: one end-to-end graph step's kernels by group (GEMMs, decode kernel, gate,
#                      pointwise), dense and sparse, fused or not, and the projections alone
#   decode-profile ~1  issue 15: graph-replayed microseconds of each piece of a sparse layer's
#                      attention (logits, bias, top-k sorted/unsorted vs top_blocks, kernel,
#                      record, fill): keep top_blocks only if it beats torch.topk
#   tests-export   ~2  the GPU export test (cut by a time limit at 7867506; the families, model and
#                      fine-tuning GPU tests passed there: 14, 2, 6)
#   bench-kernels  ~5  the issue 16 table (8k / 32k / 128k, backward at 32k), then TTFT at 128k
#   tma-variants   ~5  issue 16: forward K/V through tensor descriptors (TMA) vs pointer loads, stage
#                      counts, dense tiles (H200 at fdc8d82: 0.84-0.91x; docs/experiments/tma_variants.md);
#                      TMA in the backward: tma-bwd below. Next: tma_dense64s5, the dense kernel in the
#                      sparse rows' 64x64 tile, against d1.0: how much of the sparse kernel's 1.17x over
#                      dense is the tile shape and how much the list walk
#   gate-passkey225 ~10 issue 17's passkey protocol at its size: 225 prompts (2k/4k/8k x 5 depths x 15),
#                      plain gates, knob and threshold at ~0.12, paired against dense (gate-passkey ran 75)
#   pair-variants  ~9  issue 16: sparse pair programs (FWD_OPTIONS["pair_rows"]: 128 query rows over the
#                      union of two blocks' lists; interpreter-tested only) against the row programs at
#                      8k-128k, on bench_kernels' i.i.d. masks and on gate-like column stripes; run the
#                      kernel tests first (test_pair_rows_long)
#   tma-bwd        ~8  issue 16: the TMA GPU tests, then the backward kernels' variants (BWD_OPTIONS:
#                      K/V in dQ, Q/dO in dK/dV through tensor descriptors; stage counts, tiles) at
#                      8k / 32k against SDPA flash and cuDNN backward
#   gate-calib     ~5  issue 17: the threshold calibrated on 4 held-out windows of train.jsonl for
#                      density 0.3 / 0.2 / 0.1 / 0.05 (the calibrated knob): achieved density on the
#                      eval windows and PPL beside the density knob at the same density
#   gate-passkey   ~6  issue 17: passkey of both gate sets, knob and threshold at ~0.12
#   tests-kernels  ~6  the kernel GPU tests in two processes at once (after any kernel change)
#   tests-models   ~7  families, real-model, fine-tuning and export GPU tests; needs staging
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
GATES=${GATES:-seer_outputs/pk/gates_plain_bf16.safetensors}
CELLS=${CELLS:-/tmp/seer/cells_layers.json}
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
  bench-decode)
    timeout 400 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 131072 --batches 1 16 \
      --e2e 4x131072 16x32768 --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 12 ;;
  decode-all)
    for s in tests-decode bench-decode decode-profile; do bash "$0" "$s" "${OUT%/*}"; done ;;
  prior-sweep)  # issue 15 (session 38): prior_mix's launch variants (tl.dot or broadcast, blocks per program) replayed
    # from CUDA graphs at 1 / 4 / 16 x 128k and 1 x 1M, then its GPU tests; no staging
    timeout 200 "$PY" docs/experiments/prior_mix_sweep.py --out "$OUT/prior_mix_sweep.json" > "$OUT/sweep.log" 2>&1
    echo "prior_mix_sweep: exit $?"; tail -n 5 "$OUT/sweep.log"
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_gpu_decode.py -k prior 2>&1 | tail -n 1 ;;
  gate-select)  # issue 15 (session 39): the gate's scoring and selection in one launch (gate_top_blocks) against the
    # two launches, selection passes of 1 / 2 / 4 key bits, the GPU tests, then bench-decode with each (graph_layer and
    # end to end; 32 layers on an H200, 16 on an H100); no staging
    timeout 150 "$PY" docs/experiments/gate_select_sweep.py --out "$OUT/gate_select_sweep.json" > "$OUT/sweep.log" 2>&1
    echo "gate_select_sweep: exit $?"; sed -n '/^# /,$p' "$OUT/sweep.log"
    grep -E "Error|error" "$OUT/sweep.log" | tail -n 3
    timeout 100 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      -k "top_blocks or gate_scores" 2>&1 | tail -n 4
    if nvidia-smi | grep -q H200; then E=(--e2e 4x131072); else E=(--e2e 4x131072 --layers 16); fi
    for V in one two; do
      A=(); [ $V = one ] && A=(--one-launch-gate)
      timeout 150 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 1 16 "${E[@]}" "${A[@]}" \
        --out "$OUT/decode_$V" > "$OUT/bench_decode_$V.log" 2>&1
      echo "bench_decode $V: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode_$V.log" | tail -n 9
    done ;;
  radix-e2e)  # radix-tests, then e2e-profile
    bash "$0" radix-tests "${OUT%/*}"; bash "$0" e2e-profile "${OUT%/*}" ;;
  radix-tests)  # issue 15 (sessions 40-41): the decode GPU tests (top_blocks by bisection and by radix select,
    # decode_append, the model's decode with share 1 reading every block unscored, the compiled graph step's one-launch
    # cache writes), then the selection passes (1 / 2 / 4 / 8 bits) at four shapes
    # (two runs: -k would filter the model's tests too)
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      -k "top_blocks or gate_scores or decode_append or decode_window" > "$OUT/tests.log" 2>&1
    echo "decode kernel GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/modeling_seer/test_decode_gpu.py > "$OUT/tests_model.log" 2>&1
    echo "decode model GPU tests: exit $?, $(tail -n 1 "$OUT/tests_model.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_model.log"
    timeout 100 "$PY" docs/experiments/gate_select_sweep.py --no-fused --out "$OUT/gate_select_sweep.json" \
      > "$OUT/sweep.log" 2>&1
    echo "gate_select_sweep: exit $?"; sed -n '/^# /,$p' "$OUT/sweep.log" ;;
  s43-32)  # issue 15 (session 43): the 8B shape's 32 layers end to end. On an H100 (80 GB) with --shared-kv (every layer's
    # KV cache one buffer, each layer's reads still from HBM); first the check that sharing does not change the time per
    # token: the profile at 16 layers without and with --shared-kv (merged_early, the defaults)
    for SH in "" "--shared-kv"; do
      timeout 90 "$PY" docs/experiments/decode_e2e_profile.py --layers 16 --gemm --variants merged_early $SH \
        --out "$OUT/e2e_profile16${SH:+_shared}.json" > "$OUT/e2e_profile16${SH:+_shared}.log" 2>&1
      echo "decode_e2e_profile 16 layers ${SH:-unshared}: exit $?"; sed -n '/^# variant/,/^# M/p' "$OUT/e2e_profile16${SH:+_shared}.log"
    done
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    timeout 360 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 16 --e2e 4x131072 16x32768 \
      --layers 32 $SH --out "$OUT/decode32" > "$OUT/bench_decode32.log" 2>&1
    echo "bench_decode (32 layers $SH): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode32.log" | tail -n 9 ;;
  s46-keys8)  # issue 15 (session 46): the pooled-K cache stores the gate's block keys in 8 bits
    # (seer_decode_key_format="f8" / "i8"): the model's decode GPU tests (graph replay = eager steps with 8-bit keys),
    # then bench-decode's kernel rows and the end to end at 32 layers with float8 keys (an H200 unshared, an H100 with
    # --shared-kv); s46-base runs the same with the model's dtype on the same machine
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/modeling_seer/test_decode_gpu.py \
      > "$OUT/tests_decode.log" 2>&1
    echo "test_decode_gpu: exit $?, $(tail -n 1 "$OUT/tests_decode.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_decode.log"
    bash "$0" s46-bench "$2" f8 ;;
  s46-quality)  # issue 15 (session 46): 8-bit gate keys at the decode-quality protocol (800-step decode gates as
    # session 38's, 16 windows of 8k, second half decoded): share 0.1 and budget 2048 with the keys in the model's
    # dtype, float8, int8 (STEPS=300: the shorter distillation of the protocol's first runs; SETTINGS: fewer
    # settings); needs staging
    timeout 560 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress --phases distill ppl \
      --steps "${STEPS:-800}" \
      --settings ${SETTINGS:-share=0.1 share=0.1,keys=f8 share=0.1,keys=i8 budget=2048 budget=2048,keys=f8 budget=2048,keys=i8} \
      --out "$OUT/dq" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; rm -f "$OUT/dq/gates_decode_bf16.safetensors"; grep "^ppl" "$OUT/decode_quality.log" ;;
  s48-h200)  # issue 15 (session 48), no staging, on an H200: the decode kernel's selection patterns and SDPA flash
    # (--layout: is the fixed part per call the H100's ~24 us there too?), then s46-e2e with the default int8 keys
    timeout 100 "$PY" docs/experiments/decode_kernel_tma.py --no-sweep --layout 0 --settings 4x131072 16x32768 \
      --out "$OUT/layout.json" > "$OUT/layout.log" 2>&1
    echo "decode_kernel_tma --layout: exit $?"; sed -n '/^# /,$p' "$OUT/layout.log"; grep -E "Error" "$OUT/layout.log" | tail -n 3
    FORMATS=${FORMATS:-i8} bash "$0" s46-e2e "$2" ;;
  s47-first)  # session 47, no staging: the decode kernel's GPU tests (acc453b changed its option check), then
    # s46-e2e (the 32-layer end to end with 16-bit and float8 gate keys; E2E narrows it)
    timeout 150 "$PY" -m pytest -q -x tests/kernels/test_block_sparse_decode.py > "$OUT/tests_decode.log" 2>&1
    echo "decode kernel GPU tests: exit $?"; tail -n 2 "$OUT/tests_decode.log"
    bash "$0" s46-e2e "$2" ;;
  s47-skinny)  # issue 15 (session 47): is cuBLAS's decode GEMM rate a lever on the H200? the skinny-GEMM screen
    # (session 41, H100: 1.00-1.15x a shape) at M = 4 on the merged decode shapes and the LM head
    timeout 300 "$PY" docs/experiments/skinny_gemm.py --m 4 --shapes qkv o gate_up down "lm head" \
      --out "$OUT/skinny_gemm.json" > "$OUT/skinny.log" 2>&1
    echo "skinny_gemm: exit $?"; sed -n '/^# /,$p' "$OUT/skinny.log"; grep -E "Error" "$OUT/skinny.log" | tail -n 3 ;;
  s46-e2e)  # issue 15 (session 46): the 32-layer end to end with 16-bit and float8 gate keys on one machine (an H200
    # unshared, an H100 with --shared-kv), one kernel row each (E2E: fewer settings); only the envelopes and logs come back
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    for F in ${FORMATS:-model f8}; do  # FORMATS: the key formats to run (i8: the model's default since session 47)
      timeout 160 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 --batches 16 --e2e ${E2E:-4x131072 16x32768} --layers 32 \
        $SH --key-format $F --out "$OUT/e2e_$F" > "$OUT/e2e_$F.log" 2>&1
      echo "bench_decode (32 layers $SH, keys $F): exit $?"; sed -n '/^end to end/,$p' "$OUT/e2e_$F.log"
      rm -f "$OUT/e2e_$F"/*.csv "$OUT/e2e_$F"/*.png
    done ;;
  s46-base)  # the same bench with the gate keys in the model's dtype and again with float8 keys (session 46's first
    # call lost the envelope: nested a folder too deep), then int8 keys' kernel rows
    bash "$0" s46-bench "$2" model
    bash "$0" s46-bench "$2" f8
    timeout 120 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 131072 --batches 1 4 16 --e2e --key-format i8 \
      --out "$OUT/decode_i8" > "$OUT/bench_decode_i8.log" 2>&1
    echo "bench_decode i8 kernel rows: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode_i8.log" | tail -n 12 ;;
  s46-bench)  # bench-decode with --key-format $3 (kernel rows at 1 / 4 / 16 x 32k / 128k, end to end at 32 layers)
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    timeout 330 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 131072 --batches 1 4 16 --e2e 4x131072 16x32768 \
      --layers 32 $SH --key-format "$3" --out "$OUT/decode32_$3" > "$OUT/bench_decode32_$3.log" 2>&1
    echo "bench_decode (32 layers $SH, keys $3): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode32_$3.log" | tail -n 16 ;;
  s45-keys8)  # issue 15 (session 45): gate_scores on 8-bit block keys with one scale per key row (float8 e4m3,
    # int8): their GPU tests, then one graph-replayed layer against 16-bit keys (gate_select_sweep.py)
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py -k "gate_scores" \
      > "$OUT/tests_keys8.log" 2>&1
    echo "test_gpu_decode -k gate_scores: exit $?, $(tail -n 1 "$OUT/tests_keys8.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/tests_keys8.log"
    timeout 120 "$PY" docs/experiments/gate_select_sweep.py --no-fused --bits 1 \
      --only two_b1_rot two_b1_rot_f8 two_b1_rot_i8 \
      --settings 1x32768 16x32768 1x131072 16x131072 4x131072 --out "$OUT/gate_keys8.json" > "$OUT/gate_keys8.log" 2>&1
    echo "gate_select_sweep: exit $?"; sed -n '/^# /,$p' "$OUT/gate_keys8.log"; grep -E "Error" "$OUT/gate_keys8.log" | tail -n 3 ;;
  s45-first)  # (ran at 7b6543f; its options were removed after) issue 15 (session 45): the value bisection in
    # top_blocks and the in-kernel merge of the decode
    # kernel's parts: their GPU tests, one graph-replayed layer (gate_select_sweep.py: the gate's share with each
    # selection; the kernel with and without the merge), then bench-decode's end to end at 32 layers without and with
    # both (an H200 unshared, an H100 with --shared-kv)
    timeout 100 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py -k "merge or top_blocks" \
      > "$OUT/tests_s45.log" 2>&1
    echo "test_gpu_decode -k merge/top_blocks: exit $?, $(tail -n 1 "$OUT/tests_s45.log")"
    grep -E "^(FAILED|ERROR)" "$OUT/tests_s45.log"
    timeout 110 "$PY" docs/experiments/gate_select_sweep.py --no-fused --bits 1 \
      --only two_b1_rot two_b1_rot_v two_b1_rot_f8 \
      --settings 1x32768 16x32768 1x131072 16x131072 4x131072 --out "$OUT/gate_value.json" > "$OUT/gate_value.log" 2>&1
    echo "gate_select_sweep: exit $?"; sed -n '/^# /,$p' "$OUT/gate_value.log"; grep -E "Error" "$OUT/gate_value.log" | tail -n 3
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    for V in base new; do
      if [ $V = new ]; then X="--value-search --merge-in-kernel"; else X=""; fi
      timeout 170 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 --batches 16 --e2e 4x131072 16x32768 \
        --layers 32 $SH $X --out "$OUT/decode32_$V" > "$OUT/bench_decode32_$V.log" 2>&1
      echo "bench_decode $V (32 layers $SH $X): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode32_$V.log" | tail -n 8
    done ;;
  s44-gate)  # issue 15 (session 44): the query's matmul making G columns, gate_scores the RoPE partners
    # (decode_gate.STEP_PARTNER_COLUMNS off) and top_blocks at 1 / 2 / 4 warps, against the default, in one
    # graph-replayed layer (gate_select_sweep.py); the gate kernels' GPU tests on both query widths; then s44-first
    timeout 100 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py -k "gate_scores or gate_top \
      or top_blocks" > "$OUT/tests_gate.log" 2>&1
    echo "test_gpu_decode -k gate: exit $?, $(tail -n 1 "$OUT/tests_gate.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_gate.log"
    timeout 150 "$PY" docs/experiments/gate_select_sweep.py --no-fused --bits 1 \
      --settings 1x32768 16x32768 1x131072 16x131072 4x131072 --out "$OUT/gate_rot.json" > "$OUT/gate_rot.log" 2>&1
    echo "gate_select_sweep: exit $?"; sed -n '/^# /,$p' "$OUT/gate_rot.log"; grep -E "Error" "$OUT/gate_rot.log" | tail -n 3
    bash "$0" s44-first "$OUT" ;;
  s44-defaults)  # issue 15 (session 44): after s44-gate, the G-column query and one-warp top_blocks at <= 512 blocks
    # are the defaults: bench-decode's kernel rows (the gate's share) and the end to end at 32 layers (an H200
    # unshared, an H100 with --shared-kv), the decode kernels' GPU tests, one-launch gate configs, the model's decode
    # GPU tests
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    timeout 200 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 131072 --batches 1 4 16 --e2e 4x131072 16x32768 \
      --layers 32 $SH --out "$OUT/decode32" > "$OUT/bench_decode32.log" 2>&1
    echo "bench_decode (32 layers $SH): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode32.log" | tail -n 20
    timeout 190 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py > "$OUT/tests_decode.log" 2>&1
    echo "test_gpu_decode: exit $?, $(tail -n 1 "$OUT/tests_decode.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_decode.log"
    timeout 80 "$PY" docs/experiments/gate_select_sweep.py --bits 1 --fused 64,4,1,8 64,4,1,16 32,4,1,16 \
      --settings 1x32768 16x32768 1x131072 --out "$OUT/gate_fused.json" > "$OUT/gate_fused.log" 2>&1
    echo "gate_select_sweep --fused: exit $?"; sed -n '/^# /,$p' "$OUT/gate_fused.log"; grep -E "Error" "$OUT/gate_fused.log" | tail -n 3
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/modeling_seer/test_decode_gpu.py > "$OUT/tests_model.log" 2>&1
    echo "test_decode_gpu: exit $?, $(tail -n 1 "$OUT/tests_model.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_model.log" ;;
  s44-fused-rest)  # issue 15 (next session): the one-launch gate configs where s44-defaults' call ran out of time
    timeout 100 "$PY" docs/experiments/gate_select_sweep.py --bits 1 --fused 64,4,1,8 64,4,1,16 32,4,1,16 \
      --settings 16x32768 1x131072 4x131072 --out "$OUT/gate_fused.json" > "$OUT/gate_fused.log" 2>&1
    echo "gate_select_sweep --fused: exit $?"; sed -n '/^# /,$p' "$OUT/gate_fused.log"; grep -E "Error" "$OUT/gate_fused.log" | tail -n 3 ;;
  s44-first)  # issue 15 (next session): bench-decode at the 8B shape's 32 layers (an H200 unshared, an H100 with
    # --shared-kv) with session 43's dense rows replayed from a graph (ours every block vs SDPA flash / cuDNN: the
    # end-to-end ratio's dense baseline), then the profile at 16 x 32k (the gate's kernels where its share misses)
    if nvidia-smi | grep -q H200; then SH=""; else SH="--shared-kv"; fi
    timeout 300 "$PY" -m seer_attn.eval.bench_decode --lengths 32768 131072 --batches 1 4 16 --e2e 4x131072 16x32768 \
      --layers 32 $SH --out "$OUT/decode32" > "$OUT/bench_decode32.log" 2>&1
    echo "bench_decode (32 layers $SH): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode32.log" | tail -n 16
    timeout 150 "$PY" docs/experiments/decode_e2e_profile.py --layers 16 --batch 16 --tokens 32768 --gemm \
      --variants merged_early --out "$OUT/e2e_profile_16x32k.json" > "$OUT/e2e_profile_16x32k.log" 2>&1
    echo "decode_e2e_profile 16 x 32k: exit $?"; sed -n '/^# variant/,/^# M/p' "$OUT/e2e_profile_16x32k.log" ;;
  s43-tests)  # issue 15 (session 43): the decode kernel GPU tests in full (both load paths) and the TMA tests of the
    # prefill kernels after 7d8d18c (s43-tma's run of them stopped at its time limit), then the decode kernel on caches
    # of S + 0 / 64 / 184 slots and three selection patterns (decode_kernel_tma.py --layout)
    timeout 250 "$PY" -m pytest -q -p no:cacheprovider -rfE --durations=5 tests/kernels/test_gpu_decode.py > "$OUT/tests_decode.log" 2>&1
    echo "test_gpu_decode: exit $?, $(tail -n 1 "$OUT/tests_decode.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_decode.log"
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_kernels.py -k tma > "$OUT/tests_tma.log" 2>&1
    echo "test_gpu_kernels -k tma: exit $?, $(tail -n 1 "$OUT/tests_tma.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_tma.log"
    timeout 150 "$PY" docs/experiments/decode_kernel_tma.py --no-sweep --layout 0 64 184 \
      --settings 4x131072 16x32768 1x131072 16x131072 --out "$OUT/layout.json" > "$OUT/layout.log" 2>&1
    echo "decode_kernel_tma --layout: exit $?"; sed -n '/^B x cache | slots/,$p' "$OUT/layout.log"; grep -E "Error" "$OUT/layout.log" | tail -n 3 ;;
  s43-h200-lean)  # issue 15 (session 43, little budget left): bench-decode at the 8B shape's 32 layers on an H200,
    # unshared (end to end 4 x 128k and 16 x 32k; kernel rows at 16 x 128k)
    if nvidia-smi | grep -q H200; then L=32; SH=""; else L=32; SH="--shared-kv"; fi
    timeout 220 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 16 --e2e 4x131072 16x32768 \
      --layers $L $SH --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode ($L layers $SH): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 6 ;;
  s43-h200)  # issue 15 (session 43, an H200 for the 32-layer shape that does not fit an H100): bench-decode's rows
    # (kernel at 1 / 16 x 128k, end to end 4 x 128k and 16 x 32k), the TMA sweep at 128k, then the profile of
    # merged_early against merged_early_tma at the sweep's best TMA launch for 4 x 128k
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 250 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 1 16 --e2e 4x131072 16x32768 \
      --layers $L --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode ($L layers): exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 9
    timeout 100 "$PY" docs/experiments/decode_kernel_tma.py --settings 4x131072 16x131072 1x131072 --stages 2 3 4 \
      --warps 4 --per-sm 2 3 4 --layout 0 64 --out "$OUT/tma_sweep.json" > "$OUT/tma_sweep.log" 2>&1
    echo "decode_kernel_tma: exit $?"; sed -n '/^# /,$p' "$OUT/tma_sweep.log"; grep -E "Error" "$OUT/tma_sweep.log" | tail -n 3
    CFG=$("$PY" -c "import json,sys; r=[r for r in json.load(open(sys.argv[1]))['rows'] if r['B']==4][0]['tma_best']; \
print(r['config'][1], r['config'][2], r['per_sm'])" "$OUT/tma_sweep.json" 2>/dev/null || echo "4 2 4")
    timeout 200 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged_early merged_early_tma \
      --tma-config $CFG --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile (tma $CFG): exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  s43-tma)  # issue 15 (session 43): the decode kernel's K/V blocks through tensor descriptors (DECODE_OPTIONS["tma"]):
    # its GPU tests (both load paths) and the prefill TMA tests (the TMA check moved to kernel_utils), the launch
    # sweep (decode_kernel_tma.py), then the profile of merged_early against merged_early_tma at the sweep's best
    # TMA launch for 4 x 128k
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py tests/kernels/test_gpu_kernels.py \
      -k "sparse_vs_reference or all_blocks_vs_sdpa or batch16 or split_counts or tma" > "$OUT/tests.log" 2>&1
    echo "decode + TMA GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    timeout 220 "$PY" docs/experiments/decode_kernel_tma.py --out "$OUT/tma_sweep.json" > "$OUT/tma_sweep.log" 2>&1
    echo "decode_kernel_tma: exit $?"; sed -n '/^# /,$p' "$OUT/tma_sweep.log"; grep -E "Error" "$OUT/tma_sweep.log" | tail -n 3
    CFG=$("$PY" -c "import json,sys; r=[r for r in json.load(open(sys.argv[1]))['rows'] if r['B']==4][0]['tma_best']; \
print(r['config'][1], r['config'][2], r['per_sm'])" "$OUT/tma_sweep.json" 2>/dev/null || echo "4 3 4")
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 160 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged_early merged_early_tma \
      --tma-config $CFG --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile (tma $CFG): exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  s42-lean)  # issue 15 (session 42, little budget left): the decode GPU test files, then the profile of merged against
    # merged_early (its wall ratio dense / sparse is bench-decode's fused speed-up to ~1%: 2.93x both in session 41)
    timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      tests/modeling_seer/test_decode_gpu.py > "$OUT/tests.log" 2>&1
    echo "decode GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 130 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged merged_early \
      --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  s42-one)  # issue 15 (session 42, one call): the decode GPU test files, bench-decode's end-to-end rows (both
    # session-41 options on: the defaults since session 42), then the profile of merged against merged_early
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      tests/modeling_seer/test_decode_gpu.py > "$OUT/tests.log" 2>&1
    echo "decode GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 200 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 16 --e2e 4x131072 16x32768 \
      --layers $L --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 9
    timeout 120 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged merged_early \
      --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  s42-first)  # issue 15 (session 42): every decode GPU test file (session 41 changed the kernels' shared backend
    # check and the window masks; the prefill ops' own check went to it too), then early-lean's profile of merged against merged_early
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      tests/modeling_seer/test_decode_gpu.py tests/modeling_seer/test_gpu_families.py > "$OUT/tests.log" 2>&1
    echo "decode GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 150 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged merged_early \
      --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  early-lean)  # issue 15 (session 41): the selection kernels' GPU tests (early stop, window), then the profile of
    # merged against merged_early (both options on)
    timeout 80 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      -k "top_blocks or decode_window" > "$OUT/tests.log" 2>&1
    echo "decode kernel GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 110 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants merged merged_early \
      --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  tests-bench-lean)  # issue 15 (session 41): the selection kernels' GPU tests, then bench-decode end to end at 4 x 128k
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      -k "top_blocks or decode_window or decode_append" > "$OUT/tests.log" 2>&1
    echo "decode kernel GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 130 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 16 --e2e 4x131072 --layers $L \
      --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 6 ;;
  tests-bench)  # issue 15 (session 41): the decode kernel GPU tests (selection, append, window), then bench-merged
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_decode.py \
      -k "top_blocks or gate_scores or decode_append or decode_window" > "$OUT/tests.log" 2>&1
    echo "decode kernel GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    bash "$0" bench-merged "${OUT%/*}" ;;
  bench-merged)  # issue 15 (session 41): the model's decode GPU tests (one-launch cache writes), then bench-decode's
    # end-to-end rows (fused: seer_compile_pointwise + seer_merge_projections; 32 layers on an H200, 16 on an H100),
    # then the profile of fused and merged
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/modeling_seer/test_decode_gpu.py > "$OUT/tests_model.log" 2>&1
    echo "decode model GPU tests: exit $?, $(tail -n 1 "$OUT/tests_model.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests_model.log"
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 240 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 1 16 --e2e 4x131072 16x32768 \
      --layers $L --out "$OUT/decode" > "$OUT/bench_decode.log" 2>&1
    echo "bench_decode: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode.log" | tail -n 9
    timeout 150 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm --variants fused merged merged_early \
      --out "$OUT/e2e_profile.json" > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  skinny-gemm)  # issue 15 (session 41): a Triton skinny GEMM (split-K finished in one launch) against cuBLAS at the
    # decode projections' shapes, M 4 / 16, best config per shape
    timeout 400 "$PY" docs/experiments/skinny_gemm.py --out "$OUT/skinny_gemm.json" > "$OUT/skinny.log" 2>&1
    echo "skinny_gemm: exit $?"; sed -n '/^# /,$p' "$OUT/skinny.log"; grep -E "Error" "$OUT/skinny.log" | tail -n 3 ;;
  bench-radix)  # issue 15 (session 40): bench-decode at 128k (B 1 / 16; end to end 4 x 128k, 32 layers on an H200, 16
    # on an H100) with top_blocks by bisection, then by radix select; the dense row reads every block unscored
    if nvidia-smi | grep -q H200; then E=(--e2e 4x131072); else E=(--e2e 4x131072 --layers 16); fi
    for BITS in 1 8; do
      timeout 200 "$PY" -m seer_attn.eval.bench_decode --lengths 131072 --batches 1 16 "${E[@]}" \
        --top-blocks-bits $BITS --out "$OUT/decode_b$BITS" > "$OUT/bench_decode_b$BITS.log" 2>&1
      echo "bench_decode bits $BITS: exit $?"; sed -n '/^# /,$p' "$OUT/bench_decode_b$BITS.log" | tail -n 9
    done ;;
  e2e-profile)  # issue 15 (session 40): the end-to-end graph step's GPU kernels by group, dense and sparse, with and
    # without the fused pointwise work, and the projections alone (M 1 / 4 / 16); 32 layers on an H200, 16 on an H100
    if nvidia-smi | grep -q H200; then L=32; else L=16; fi
    timeout 300 "$PY" docs/experiments/decode_e2e_profile.py --layers $L --gemm 1 4 16 --out "$OUT/e2e_profile.json" \
      > "$OUT/e2e_profile.log" 2>&1
    echo "decode_e2e_profile: exit $?"; sed -n '/^# /,$p' "$OUT/e2e_profile.log"; grep -E "Error" "$OUT/e2e_profile.log" | tail -n 3 ;;
  decode-sweep)
    timeout 300 "$PY" docs/experiments/decode_step_sweep.py --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
    echo "decode_step_sweep: exit $?"; tail -n 7 "$OUT/sweep.log" ;;
  decode-profile)
    timeout 200 "$PY" docs/experiments/decode_gate_profile.py > "$OUT/profile.log" 2>&1
    echo "decode_gate_profile: exit $?"; tail -n 8 "$OUT/profile.log" ;;
  tests-decode) PY=$PY bash docs/experiments/gpu_tests.sh decode "$OUT" ;;
  bench-kernels)
    timeout 330 "$PY" -m seer_attn.eval.bench_kernels --lengths 8192 32768 131072 --bwd-lengths 32768 \
      --out "$OUT/kernels" > "$OUT/kernels.log" 2>&1
    echo "bench_kernels: exit $?"; tail -n 12 "$OUT/kernels.log"
    timeout 200 "$PY" -m seer_attn.eval.bench_ttft --lengths 131072 --out "$OUT/ttft" > "$OUT/ttft.log" 2>&1
    echo "bench_ttft: exit $?"; tail -n 8 "$OUT/ttft.log" ;;
  tma-variants)
    timeout 420 "$PY" docs/experiments/tma_variants.py --variants base tma tma_dense64s5 tma_s6 \
      --out "$OUT/tma" > "$OUT/tma.log" 2>&1
    echo "tma_variants: exit $?"; sed -n '/^# /,$p' "$OUT/tma.log" ;;
  tma-bwd)
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/kernels/test_gpu_kernels.py -k "tma_loads or tma_backward" > "$OUT/tests.log" 2>&1
    echo "TMA GPU tests: exit $?, $(tail -n 1 "$OUT/tests.log")"; grep -E "^(FAILED|ERROR)" "$OUT/tests.log"
    timeout 420 "$PY" docs/experiments/tma_variants.py --backward --lengths 8192 32768 \
      --profile 8192:dense 32768:dense 32768:d0.1 --out "$OUT/tma_bwd" > "$OUT/tma_bwd.log" 2>&1
    echo "tma_variants --backward: exit $?"; sed -n '/^# /,$p' "$OUT/tma_bwd.log"; grep -E "^error" "$OUT/tma_bwd.log" ;;
  pair-variants)
    for M in random stripes; do
      timeout 280 "$PY" docs/experiments/tma_variants.py --variants base tma pair pair_s3 pair_s5 --masks $M \
        --densities 1.0 0.5 0.1 --profile 32768:d0.1 --out "$OUT/pair_$M" > "$OUT/pair_$M.log" 2>&1
      echo "tma_variants --masks $M: exit $?"; sed -n '/^# /,$p' "$OUT/pair_$M.log"; grep -E "^error" "$OUT/pair_$M.log"
    done ;;
  tests-export)
    timeout 110 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/hub_cards/test_export.py -k gpu > "$OUT/export.log" 2>&1
    echo "export: exit $?, $(tail -n 1 "$OUT/export.log")" ;;
  tests-models) PY=$PY bash docs/experiments/gpu_tests.sh models "$OUT" ;;
  decode-quality)
    timeout 560 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress \
      --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 14 "$OUT/decode_quality.log" ;;
  decode-variants)
    timeout 500 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress --phases distill ppl \
      --settings share=0.1 share=0.1,oracle share=0.1,streaming share=0.1,local=2 share=0.2 share=0.2,oracle \
      budget=2048,oracle --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; cp "$OUT/decode_quality/gates_decode_bf16.safetensors" /tmp/seer/gates_plain.safetensors
    tail -n 12 "$OUT/decode_quality.log" ;;
  decode-mass)
    timeout 570 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress --phases distill ppl \
      --settings share=0.1 share=0.2 budget=2048 mass=0.5 mass=0.6 mass=0.7 mass=0.8 mass=0.9 \
      --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; cp "$OUT/decode_quality/gates_decode_bf16.safetensors" /tmp/seer/gates_mass.safetensors
    tail -n 14 "$OUT/decode_quality.log" ;;
  decode-mass-oracle)
    timeout 570 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress --phases distill ppl \
      --steps 20 --settings share=0.1,oracle mass=0.6,oracle mass=0.7,oracle mass=0.8,oracle mass=0.9,oracle \
      --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 10 "$OUT/decode_quality.log" ;;
  decode-retrieval)
    timeout 560 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress \
      --phases distill ppl passkey --retrieval-mix 0.25 --decode-rows 256 --settings share=0.1 share=0.1,oracle \
      --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 12 "$OUT/decode_quality.log" ;;
  gate-calib)
    timeout 560 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --phases ppl --calib-from train --budget-s 480 --out "$OUT" > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 22 "$OUT/gate_quality.log" ;;
  gate-passkey)
    timeout 560 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain retrieval \
      --phases passkey --passkey-settings gate:threshold=0.03 --budget-s 480 --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 8 "$OUT/gate_quality.log" ;;
  gate-passkey225)
    timeout 580 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --phases passkey --passkey-settings gate:threshold=0.03 --passkey-samples 15 --budget-s 540 --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 8 "$OUT/gate_quality.log" ;;
  gate-long)  # issue 17's "longer distillation": STEPS (default 1200, ~6.5 min) of 8192 tokens, plain data; the bf16
    # gates to OUT and to /tmp/seer/gates_long.safetensors for the next steps (GATES=/tmp/seer/gates_long.safetensors)
    timeout 570 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --steps "${STEPS:-1200}" --phases cost --budget-s 540 --out "$OUT" > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; cp "$OUT/gates_plain_bf16.safetensors" /tmp/seer/gates_long.safetensors
    "$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['cost'])" "$OUT/gate_quality.json" ;;
  gate-calib-coverage)  # LIMIT: seconds (default 570; less in a call that also stages)
    timeout "${LIMIT:-570}" "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --gates plain="$GATES" --phases ppl baselines --coverage --calib-from train --budget-s "${BUDGET:-500}" --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 30 "$OUT/gate_quality.log" ;;
  gate-gain)  # issue 17: the gain rule (session 31) beside the coverage and the threshold at the knob target's protocol
    # (held-out calibration at 0.3 / 0.2 / 0.1 / 0.05, each rule bisected to the threshold's density); GATES: the 1200-step gates
    timeout "${LIMIT:-570}" "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --gates plain="$GATES" --phases ppl --coverage --gain --calib-from train --budget-s "${BUDGET:-500}" --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 40 "$OUT/gate_quality.log" ;;
  gate-prior)  # issue 17: gate-gain's protocol with the mean-pooled prior on the gate's scores (session 32,
    # seer_meanpool_prior=PRIOR, default 0.5), then streaming and mean-pool at the same densities; GATES; DENSITIES and
    # PHASES (default "ppl baselines") narrow it
    timeout "${LIMIT:-570}" "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain \
      --gates plain="$GATES" --phases ${PHASES:-ppl baselines} --coverage --gain --meanpool-prior "${PRIOR:-0.5}" \
      --densities ${DENSITIES:-0.3 0.2 0.1 0.05} --calib-from train --budget-s "${BUDGET:-500}" --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 40 "$OUT/gate_quality.log" ;;
  prior-topk)  # issue 17: top-k (nz_ratio) of the gate's scores with and without the mean-pooled prior (PRIOR, default
    # 0.5; and 2/3 at 0.05) against the mean-pooled baseline's top-k at 0.1 / 0.05, every window (meanpool_prior.py
    # --gpu, the CPU's section 15 screen at the issue's protocol); GATES; needs staging
    timeout 570 "$PY" docs/experiments/meanpool_prior.py "$GATES" --gpu --windows 0 --model "$GGUF" \
      --eval "$CORPORA/eval.jsonl" gate:nz_ratio=0.1 gate:nz_ratio=0.05 "gate:nz_ratio=0.1:prior=${PRIOR:-0.5}" \
      "gate:nz_ratio=0.05:prior=${PRIOR:-0.5}" meanpool:nz_ratio=0.1 meanpool:nz_ratio=0.05 \
      gate:nz_ratio=0.05:prior=0.667 --out "$OUT/prior_topk.json" > "$OUT/prior_topk.log" 2>&1
    echo "meanpool_prior: exit $?"; grep -v "Convert\|Loading" "$OUT/prior_topk.log" | tail -n 12 ;;
  gate-through)  # issue 17: plain gates and gates distilled through the mean-pooled prior (seer_distill_prior, session
    # 33, share PRIOR, default 0.5), STEPS (default 250) each at 8192 tokens, both served with that prior: knob,
    # threshold, coverage and gain at 0.1 / 0.05 (held-out calibration); needs staging
    timeout 570 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain through \
      --steps "${STEPS:-250}" --meanpool-prior "${PRIOR:-0.5}" --phases ppl --densities 0.1 0.05 --coverage --gain \
      --calib-from train --budget-s 470 --out "$OUT" > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 30 "$OUT/gate_quality.log" ;;
  gate-capacity)  # issue 17's "gate capacity": plain, wide (width 256) and qmax (Q pooled avg+max) gates, STEPS (default
    # 250) each at 8192 tokens, then the knob and the threshold at 0.1 (gate_quality.py's ppl phase); needs staging
    timeout 570 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain wide qmax \
      --steps "${STEPS:-250}" --phases ppl --densities 0.1 --coverage --budget-s 470 --out "$OUT" \
      > "$OUT/gate_quality.log" 2>&1
    echo "gate_quality: exit $?"; tail -n 16 "$OUT/gate_quality.log" ;;
  gate-free)  # issue 17: the gate scoring only the blocks the keep rules leave to it (free_blocks.py), 250 steps of 8192
    # tokens, beside the paper's loss with the same selection change and the oracle at 0.1 / 0.05; needs staging, GATES
    timeout 250 "$PY" docs/experiments/free_blocks.py train --model "$GGUF" "${DATA[@]}" --variants plain \
      --phases ppl --densities 0.1 0.05 --coverage --budget-s 200 --out "$OUT/train" > "$OUT/train.log" 2>&1
    echo "free train: exit $?"; tail -n 14 "$OUT/train.log"
    timeout 150 "$PY" docs/experiments/free_blocks.py infer --model "$GGUF" "${DATA[@]}" --variants plain \
      --gates plain="$GATES" --phases ppl --densities 0.1 0.05 --coverage --budget-s 120 --out "$OUT/infer" \
      > "$OUT/infer.log" 2>&1
    echo "free infer: exit $?"; tail -n 14 "$OUT/infer.log"
    timeout 150 "$PY" docs/experiments/gate_quality.py --model "$GGUF" "${DATA[@]}" --variants plain --gates plain="$GATES" \
      --phases baselines --oracle --densities 0.1 0.05 --budget-s 120 --out "$OUT/oracle" > "$OUT/oracle.log" 2>&1
    echo "oracle: exit $?"; tail -n 8 "$OUT/oracle.log" ;;
  decode-prior)  # issue 15: the mean-pooled decode prior (seer_decode_meanpool_prior) beside the decode gate alone and
    # the oracle, with carried decode gates (DGATES: decode-distill's 800-step file), then the decode GPU tests
    timeout "${LIMIT:-400}" "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress \
      --gates "$DGATES" --phases ${PHASES:-ppl} --settings ${SETTINGS:-budget=2048 budget=2048,prior=0.3 \
      budget=2048,prior=0.5 budget=2048,prior=0.7 budget=2048,prior=1 budget=2048,oracle share=0.1 share=0.1,prior=0.5 \
      share=0.1,prior=1 share=0.2 share=0.2,prior=0.5 share=0.2,prior=1} --out "$OUT/decode_quality" \
      > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 22 "$OUT/decode_quality.log"
    [ "${TESTS:-1}" != 0 ] && PY=$PY bash docs/experiments/gpu_tests.sh decode "$OUT/tests" && cat "$OUT/tests/summary.txt" ;;
  decode-free)  # issue 15 (sessions 37-38): decode gates distilled without the sink in their loss
    # (seer_decode_distill_forced=False, the default since session 38; FORCED=1 passes --forced-loss for the loss up to
    # session 37), STEPS (default 800) as decode-distill, then decode perplexity at decode-prior's protocol
    timeout "${LIMIT:-560}" "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress \
      ${FORCED:+--forced-loss} --steps "${STEPS:-800}" --phases distill ppl --settings ${SETTINGS:-budget=2048 \
      budget=2048,prior=0.7 share=0.1 share=0.1,prior=0.5 share=0.2} --out "$OUT/decode_quality" \
      > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 12 "$OUT/decode_quality.log"
    cp "$OUT"/decode_quality/*.json "$OUT"/ ;;  # files come back at most 2 folders down
  decode-distill)  # decode gates (with prefill gates) for the CPU's offline decode evaluator (decode_ppl_offline.py
    # --gates ... ,gate): STEPS (default 800, ~200 s on the H200) at 8192 tokens, the decode-quality run's defaults
    timeout 300 "$PY" -m seer_attn.eval.decode_quality --model "$GGUF" "${DATA[@]}" --no-progress --phases distill \
      --steps "${STEPS:-800}" --out "$OUT/decode_quality" > "$OUT/decode_quality.log" 2>&1
    echo "decode_quality: exit $?"; tail -n 3 "$OUT/decode_quality.log"
    # files come back at most 2 folders down and 16 MiB each (17.7 MB here): parts beside the log, `cat` them back
    split -b 15M "$OUT/decode_quality/gates_decode_bf16.safetensors" "$OUT/gates_decode_bf16.part" && ls -la "$OUT" ;;
  density-ppl)  # density-profile's 8k perplexity half alone, fewer settings (a call that also runs decode-distill)
    timeout "${LIMIT:-300}" "$PY" docs/experiments/dense_layers_ppl.py "$GATES" --eval "$CORPORA/eval.jsonl" --length 8192 \
      --windows 0 --profile-from "$CORPORA/train.jsonl" --settings density=0.1 profile=0.75,density=0.1 coverage=0.75 \
      density=0.12 profile=0.75,density=0.12 threshold=0.02 --out "$OUT/ppl_profile_8k.json" 2>&1 | grep -v Warning ;;
  density-profile)  # the density knob spread over the layers as the coverage rule spreads it (seer_density_profile,
    # solved on 4 train windows at 8k) against the plain knob, the coverage rule and the threshold at 8k
    "$PY" docs/experiments/dense_layers_ppl.py "$GATES" --eval "$CORPORA/eval.jsonl" --length 8192 --windows 0 \
      --profile-from "$CORPORA/train.jsonl" --settings density=0.1 profile=0.75,density=0.1 density=0.12 \
      profile=0.75,density=0.12 profile=0.9,density=0.12 density=0.2 profile=0.75,density=0.2 threshold=0.02 \
      coverage=0.75 --out "$OUT/ppl_profile_8k.json" 2>&1 | grep -v Warning
    "$PY" docs/experiments/passkey_cells.py "$GATES" --lengths 2048 4096 8192 --depths 0 0.25 0.5 0.75 1.0 \
      --samples 15 --profile-from "$CORPORA/train.jsonl" --settings profile=0.75 profile=0.75,density=0.15 \
      --out "$OUT/passkey225_profile.json" 2>&1 | grep -v Warning ;;
  dense-layers)  # GATES: the 225-run's gates (carried); cells first, then 8k perplexity of the same settings
    "$PY" docs/experiments/passkey_cells.py "$GATES" --lengths 4096 --depths 0.5 0.75 1.0 --samples 15 \
      --settings knob,dense=0-0 knob,dense=0-1 knob,dense=1-3 knob,early=0-3:0.5 knob,early=0-3:0.3 \
      knob,early=0-1:0.5 oracle_mass knob,dense=0-1,density=0.08 knob,dense=0-3,density=0.08 \
      --out "$OUT/cells_layers.json" 2>&1 | tee "$OUT/cells.log" | grep -v Warning
    cp "$OUT/cells_layers.json" "$CELLS"  # for dense-layers225 (OUT is fresh in every device call)
    "$PY" docs/experiments/dense_layers_ppl.py "$GATES" --eval "$CORPORA/eval.jsonl" --length 8192 --windows 0 \
      --settings density=0.12 density=0.2 dense=0-0,density=0.1 dense=0-1,density=0.08 dense=0-1,density=0.1 \
      early=0-3:0.5,density=0.1 early=0-3:0.3,density=0.1 dense=0-3,density=0.08 oracle,density=0.12 \
      --out "$OUT/ppl_layers_8k.json" 2>&1 | tee "$OUT/ppl.log" | grep -v Warning ;;
  dense-layers225)  # the 225 prompts under the two cells settings with the fewest net losses (CELLS: their json)
    mapfile -t PICK < <("$PY" -c "import json,sys; r=[x for x in json.load(open(sys.argv[1]))['rows'] if 'vs_dense' in x]
r.sort(key=lambda x: (x['vs_dense']['lost'] - x['vs_dense']['gained'], x['density'])); print(*[x['setting'] for x in r[:2]], sep='\\n')" "$CELLS")
    echo "settings: ${PICK[*]}"
    timeout 570 "$PY" docs/experiments/passkey_cells.py "$GATES" --lengths 2048 4096 8192 --depths 0 0.25 0.5 0.75 1.0 \
      --samples 15 --settings "${PICK[@]}" --out "$OUT/passkey225_layers.json" 2>&1 | grep -v Warning ;;
  passkey225-cells)  # issue 17's 225 prompts under SETTINGS (passkey_cells.py parts, e.g. "knob,profile=0.9,prior=0.5"),
    # paired with session 35's H100 bf16 dense answers (--dense-from; run it on an H100); GATES: the 1200-step gates
    timeout "${LIMIT:-560}" "$PY" docs/experiments/passkey_cells.py "$GATES" --lengths 2048 4096 8192 \
      --depths 0 0.25 0.5 0.75 1.0 --samples 15 --settings $SETTINGS --profile-from "$CORPORA/train.jsonl" \
      --dense-from results/quality/h100_prior_passkey225_8k.json --out "$OUT/passkey225_cells.json" 2>&1 | grep -v Warning ;;
  coverage-layers)  # the coverage rule (per row, fewest blocks holding C of the gate's probability) on the
    # 4k cells, what brings back the 8k depth-0.75 prompts, and 8k perplexity with the per-layer density
    PK=(docs/experiments/passkey_cells.py "$GATES" --samples 15)
    "$PY" "${PK[@]}" --lengths 4096 --depths 0.5 0.75 1.0 --settings coverage=0.8 coverage=0.9 coverage=0.95 \
      knob,early=0-0:0.5 --out "$OUT/cells_coverage_4k.json" 2>&1 | grep -v Warning
    "$PY" "${PK[@]}" --lengths 8192 --depths 0.75 --settings knob knob,dense=0-14 knob,dense=0-0 coverage=0.9 \
      density=0.3 --out "$OUT/cells_8k.json" 2>&1 | grep -v Warning
    "$PY" docs/experiments/dense_layers_ppl.py "$GATES" --eval "$CORPORA/eval.jsonl" --length 8192 --windows 0 \
      --settings density=0.1 coverage=0.8 coverage=0.9 coverage=0.95 early=0-0:0.5,density=0.1 \
      early=0-0:0.5,density=0.12 --out "$OUT/ppl_coverage_8k.json" 2>&1 | grep -v Warning ;;
  passkey225-fp32)  # the protocol's noise floor: dense and the best layer setting in float32, 225 prompts
    timeout 570 "$PY" docs/experiments/passkey_cells.py "$GATES" --lengths 2048 4096 8192 --depths 0 0.25 0.5 0.75 \
      1.0 --samples 15 --dtype fp32 --settings knob,early=0-1:0.5 --out "$OUT/passkey225_fp32.json" 2>&1 \
      | grep -v Warning ;;
  *) echo "unknown step $STEP"; exit 2 ;;
esac
