#!/usr/bin/env bash
# One call on the lent GPU: the CUDA-marked tests, the benchmarks at real sizes and one
# profile, then a summary table (printed last: only the tail of the output comes back).
#
# From the repository root, after ../shared/device/prepare.sh (see its README for the wheel
# prefix that makes segment_anything, sam2, ... importable; nothing else is pip-installed):
#   bash bench/run_gpu.sh                   # all stages: tests bench profile
#   bash bench/run_gpu.sh bench profile     # a selection
# Everything runs as `python -m ...` from the repository root. At most 8 files come back
# under $OUT, none deeper than $OUT/a/b/file:
#   $OUT/baselines/<platform>/0001_baseline.json  the bench results (pytest-benchmark file:
#        commit it under bench/baselines/<device>/<platform>/ as the gate's baseline)
#   $OUT/tuned-rel_pos_attention.json   the kernel's measured launch choices (to ship in
#        fastsam_core/kernels/tuned/rel_pos_attention.json under the GPU's name)
#   $OUT/tuned-int8_matmul.json   the int8 linears' measured backend choices (likewise)
#   $OUT/profile-<name>.md, $OUT/profile-<name>.trace.json.gz
#   $OUT/logs.tar.gz                    every stage's full log
# Overrides: PYTHON (default python3), FASTSAM_RUNNER_BENCH (bench paths, default "bench"), FASTSAM_RUNNER_PROFILE
# (profile arguments, default "--model vit_h --stage image_encoder --batch 8").
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/fastsam-gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT" "$WORK/logs"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export FASTSAM_CACHE_DIR="$WORK/cache"  # a cold start: the tuning is measured in this run
stages=${*:-tests bench profile}
status=0
summary=()

run() {  # run NAME COMMAND...: log to $WORK/logs/NAME.log, remember the outcome
  local name=$1
  shift
  local start=$SECONDS
  echo "== $name: $*"
  "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-8s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - start)) \
    "$(tail -n 1 "$WORK/logs/$name.log" | cut -c1-90)")")
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
      # CUDA-marked tests, plus the kernel and op suites whole: on a GPU they run the
      # compiled kernels (fp32 "ieee", fp16, bf16) instead of the interpreter
      run tests "$PY" -m pytest tests/kernels tests/ops -q -p no:cacheprovider -rs
      run cuda_tests "$PY" -m pytest -m cuda tests -q -p no:cacheprovider -rs \
        --deselect tests/kernels --deselect tests/ops ;;
    bench)
      run bench "$PY" -m pytest ${FASTSAM_RUNNER_BENCH:-bench} --benchmark-only -q \
        -p no:cacheprovider --benchmark-storage="file://$OUT/baselines" \
        --benchmark-save=baseline ;;
    profile)
      run profile "$PY" -m fastsam_core profile \
        ${FASTSAM_RUNNER_PROFILE:---model vit_h --stage image_encoder --batch 8} \
        --out "$WORK/profile"
      for f in "$WORK"/profile/*; do [ -e "$f" ] && cp "$f" "$OUT/profile-$(basename "$f")"; done ;;
    *)
      echo "unknown stage $stage (tests, bench, profile)"; status=2 ;;
  esac
done

for tuned in rel_pos_attention int8_matmul; do
  [ -f "$FASTSAM_CACHE_DIR/$tuned.json" ] && cp "$FASTSAM_CACHE_DIR/$tuned.json" "$OUT/tuned-$tuned.json"
done
tar czf "$OUT/logs.tar.gz" -C "$WORK" logs
echo
echo "== stages"
printf '%s\n' "${summary[@]}"
result=$(ls "$OUT"/baselines/*/*.json 2>/dev/null | tail -n 1)
if [ -n "$result" ]; then
  echo
  echo "== benchmarks ($result)"
  "$PY" -m fastsam_core summarize "$result"
fi
exit $status
