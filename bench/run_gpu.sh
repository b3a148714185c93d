#!/usr/bin/env bash
# One call on the lent GPU: the CUDA-marked tests, the benchmarks at real sizes and one
# profile, then a summary table (printed last: only the tail of the output comes back).
#
# From the repository root, after ../shared/device/prepare.sh (see its README for the wheel
# prefix that makes segment_anything, sam2, ... importable; nothing else is pip-installed):
#   bash bench/run_gpu.sh           # all: bench tests cuda-tests accuracy profile bench-tail
#   bash bench/run_gpu.sh bench profile     # a selection
# Everything runs as `python -m ...` from the repository root. The whole script keeps to a
# deadline (FASTSAM_RUNNER_DEADLINE seconds, default 540: under the device tool's 600 s per
# command): every step runs under `timeout` with what is left, a step that would start with
# too little time left is skipped (and listed so), and the logs always come back. The bench
# stages run one suite file per pytest process, most wanted first ("bench": the rel-pos
# kernel, the image encoder with its int8 / 2:4 cases, the int8 kernels, video, memory
# attention, SAM 2 image; "bench-tail", after the accuracy report and the profile: prompts,
# AMG, end to end, the long video, frame loading), so an overrunning suite loses only its own
# results; the parts are merged into one file. The compiled video against sam2's own compiled
# predictor (minutes of compilation; pytest-benchmark writes its file only at the end, so a
# run stopped at the deadline returns nothing) is not in the default list: give it a call of
# its own, FASTSAM_RUNNER_BENCH_TAIL=bench/test_bench_video_compiled.py bash bench/run_gpu.sh
# bench-tail.
# At most 8 files come back under $OUT, none deeper than $OUT/a/b/file:
#   $OUT/baselines/<platform>/0001_baseline.json  the bench results (pytest-benchmark file:
#        commit it under bench/baselines/<device>/<platform>/ as the gate's baseline)
#   $OUT/tuned-rel_pos_attention.json   the kernel's measured launch choices (to ship in
#        fastsam_core/kernels/tuned/rel_pos_attention.json under the GPU's name)
#   $OUT/tuned-int8_matmul.json, $OUT/tuned-int8_fusion.json   the int8 linears' measured
#        matmul backends and tiles, the fused-or-separate choices of the int8 MLPs and of the
#        LayerNorms feeding an int8 qkv (likewise)
#   $OUT/accuracy-<model>-cuda.json   `fastsam accuracy` at real size (random weights; bf16,
#        int8, 2:4 against fp32: mask IoU and per-layer SQNR), to commit under bench/results/
#   $OUT/profile-<name>.md, $OUT/profile-<name>.trace.json.gz
#   $OUT/logs.tar.gz                    every step's full log
# Overrides: PYTHON (default python3), FASTSAM_RUNNER_BENCH and FASTSAM_RUNNER_BENCH_TAIL
# (bench files of the two stages, in order; defaults below), FASTSAM_RUNNER_ACCURACY
# (model, default vit_h), FASTSAM_RUNNER_PROFILE (profile arguments, default "--model vit_h
# --stage image_encoder --batch 8"), FASTSAM_RUNNER_DEADLINE (seconds),
# FASTSAM_RUNNER_MIN_STEP (seconds, default 20), FASTSAM_RUNNER_RESERVE (seconds, default 15),
# FASTSAM_RUNNER_TESTS_MAX (seconds, default 180: the most the "tests" stage may take, so that
# compiling every kernel variant of the kernel and op tests cannot starve the benchmarks; its
# CUDA-marked tests, bf16 and the real shapes, run first).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fastsam-gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/logs" "$WORK/bench"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTSAM_CACHE_DIR="$WORK/cache"  # a cold start: the tuning is measured in this run
DEADLINE=${FASTSAM_RUNNER_DEADLINE:-540}
RESERVE=${FASTSAM_RUNNER_RESERVE:-15}  # seconds kept for merging, packing and the summary
MIN_STEP=${FASTSAM_RUNNER_MIN_STEP:-20}  # a step is not started with less than this left
TESTS_MAX=${FASTSAM_RUNNER_TESTS_MAX:-180}
BENCH=${FASTSAM_RUNNER_BENCH:-"bench/test_bench_attention.py bench/test_bench_image_encoder.py
  bench/test_bench_int8_mlp.py bench/test_bench_int8_matmul.py
  bench/test_bench_layer_norm_quant.py bench/test_bench_video.py
  bench/test_bench_memory_attention.py bench/test_bench_sam2_image.py"}
BENCH_TAIL=${FASTSAM_RUNNER_BENCH_TAIL:-"bench/test_bench_prompt.py bench/test_bench_amg.py
  bench/test_bench_end_to_end.py bench/test_bench_video_memory.py
  bench/test_bench_video_frames.py"}
# the benchmarks first (the issues' measurements: a kernel launch is only chosen after its
# output matched the reference, and the attention bench fails where the kernel did not run),
# then the kernel and op suites, then the CUDA tests of the models and pipelines (real-size
# float64 references, torch.compile of whole encoders)
stages=${*:-bench tests cuda-tests accuracy profile bench-tail}
status=0
summary=()

run() {  # run NAME COMMAND...: log to $WORK/logs/NAME.log, within the deadline (and
  # within UNTIL, a time in $SECONDS, when set)
  local name=$1
  shift
  local left=$((DEADLINE - SECONDS - RESERVE)) limit="the deadline"
  if [ -n "${UNTIL:-}" ] && [ $((UNTIL - SECONDS)) -lt "$left" ]; then
    left=$((UNTIL - SECONDS)) limit="its stage's time cap"
  fi
  if [ "$left" -lt "$MIN_STEP" ]; then
    summary+=("$(printf '%-22s skipped: %ss left before %s' "$name" "$left" "$limit")")
    status=1
    return 0
  fi
  local start=$SECONDS
  echo "== $name (${left}s left): $*"
  # STOP=INT (the test steps): pytest stopped at the limit still prints the failures it met
  # (SIGTERM leaves an "F" without a name); not for the benchmarks, whose interrupted case
  # would be saved half-measured
  timeout -s "${STOP:-TERM}" --kill-after=5 "$left" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  local last
  last=$(tail -n 1 "$WORK/logs/$name.log" | cut -c1-70)
  [ "$rc" -eq 124 ] && last="stopped at $limit; $last"
  [ "$rc" -eq 137 ] && last="killed ($limit or memory); $last"
  summary+=("$(printf '%-22s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - start)) "$last")")
  [ "$rc" -eq 0 ] || status=1
  return 0
}

"$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name() if torch.cuda.is_available() else '', 'python', sys.version.split()[0])" \
  | tee "$WORK/logs/env.log"
git rev-parse HEAD >> "$WORK/logs/env.log" 2>/dev/null

for stage in $stages; do
  case $stage in
    tests)
      # the kernel and op suites whole, within TESTS_MAX: on a GPU they run the compiled
      # kernels (fp32 "ieee", fp16, bf16) instead of the interpreter; the CUDA-marked ones
      # (bf16, the real shapes, every tuning candidate) first
      tests_until=$((SECONDS + TESTS_MAX))
      STOP=INT UNTIL=$tests_until run tests_cuda "$PY" -m pytest -m cuda tests/kernels \
        tests/ops -q -p no:cacheprovider -rs
      STOP=INT UNTIL=$tests_until run tests "$PY" -m pytest -m "not cuda" tests/kernels \
        tests/ops -q -p no:cacheprovider -rs ;;
    cuda-tests)
      STOP=INT run cuda_tests "$PY" -m pytest -m cuda tests -q -p no:cacheprovider -rs \
        --deselect tests/kernels --deselect tests/ops ;;
    bench|bench-tail)
      files=$BENCH
      [ "$stage" = bench-tail ] && files=$BENCH_TAIL
      for file in $files; do
        name=$(basename "$file" .py)
        run "${name#test_}" "$PY" -m pytest "$file" --benchmark-only -q -p no:cacheprovider \
          --benchmark-json="$WORK/bench/$name.json"
      done ;;
    accuracy)
      model=${FASTSAM_RUNNER_ACCURACY:-vit_h}
      run accuracy "$PY" -m fastsam_core accuracy --model "$model" --scenes 2 \
        --out "$OUT/accuracy-$model-cuda.json" ;;
    profile)
      run profile "$PY" -m fastsam_core profile \
        ${FASTSAM_RUNNER_PROFILE:---model vit_h --stage image_encoder --batch 8} \
        --out "$WORK/profile"
      for f in "$WORK"/profile/*; do [ -e "$f" ] && cp "$f" "$OUT/profile-$(basename "$f")"; done ;;
    *)
      echo "unknown stage $stage (tests, bench, cuda-tests, accuracy, profile, bench-tail)"
      status=2 ;;
  esac
done

parts=$(ls "$WORK"/bench/*.json 2>/dev/null)
if [ -n "$parts" ]; then
  "$PY" -c "import sys; from pathlib import Path
from pytest_benchmark.utils import get_machine_id
from fastsam_core.gate import merge_results
out = Path(sys.argv[1]) / 'baselines' / get_machine_id() / '0001_baseline.json'
print('merged', merge_results([Path(p) for p in sys.argv[2:]], out), 'cases into', out)" \
    "$OUT" $parts >> "$WORK/logs/env.log" 2>&1 || { status=1; summary+=("merge failed: env.log"); }
fi
for tuned in rel_pos_attention int8_matmul int8_fusion; do
  [ -f "$FASTSAM_CACHE_DIR/$tuned.json" ] && cp "$FASTSAM_CACHE_DIR/$tuned.json" "$OUT/tuned-$tuned.json"
done
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo
echo "== stages (deadline ${DEADLINE}s, ${SECONDS}s used)"
printf '%s\n' "${summary[@]}"
result=$(ls "$OUT"/baselines/*/*.json 2>/dev/null | tail -n 1)
if [ -n "$result" ]; then
  echo
  echo "== benchmarks ($result)"
  "$PY" -m fastsam_core summarize "$result"
fi
exit $status
