# The H100 runs that the open issues still need, in stages that each fit one device call
# (< 10 min). Run from the repo root on the device, carrying .whl and .bench:
#   bash bench/gpu_session.sh tests      # every GPU-marked test (kernels, fast model, fla parity)
#   bash bench/gpu_session.sh bench      # momtune bench: layer prefill/decode, model decode vs fla/reference
#   bash bench/gpu_session.sh search     # Optuna (TPE) on the mom-340m prefill and decode shape sets
#   bash bench/gpu_session.sh sampler    # exhaustive vs TPE (<= 20% of the space) vs random, reduced space
#   bash bench/gpu_session.sh report     # export the library, verify it, build the report
# The study database lives in .bench/momtune-h100.db (carried back and forth) and is copied to $OUT.
source bench/device_setup.sh
mkdir -p .bench
DB=sqlite:///$PWD/.bench/momtune-h100.db
set -o pipefail
case "${1:-}" in
  tests)
    timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee $OUT/gpu-tests.log | tail -15 ;;
  bench)
    timeout 280 momtune bench --presets mom-340m --prefill 8x2048 1x4096 --batches 1 8 32 128 \
      --out $OUT/bench-340m.json > $OUT/bench-340m.log 2>&1; tail -30 $OUT/bench-340m.log
    timeout 250 momtune bench --presets mom-1.3b --prefill 8x2048 --batches 1 32 --impls momtune fla \
      --out $OUT/bench-1.3b.json > $OUT/bench-1.3b.log 2>&1; tail -12 $OUT/bench-1.3b.log ;;
  search)
    for t in recurrence:mom-340m-prefill:24:150 decode:decode:16:40 merge:mom-340m-prefill:8:30 \
             conv:mom-340m-prefill:8:30 routing:mom-340m-prefill:8:20; do
      IFS=: read name set trials secs <<< "$t"
      timeout 200 momtune search --template $name --shapes $set --trials $trials --timeout $secs \
        --storage $DB --workers 16 >> $OUT/search.log 2>&1; tail -10 $OUT/search.log
    done ;;
  sampler)
    for s in grid:56 tpe:11 random:11; do
      IFS=: read sampler trials <<< "$s"
      timeout 180 momtune search --template recurrence --shapes mom-340m-B8 --space-dir bench/spaces \
        --sampler $sampler --trials $trials --study ${sampler/grid/exhaustive} --storage $DB --workers 16 \
        >> $OUT/sampler.log 2>&1; tail -6 $OUT/sampler.log
    done ;;
  report)
    momtune export --storage $DB --out $OUT/library-h100.json 2>&1 | tail -3
    momtune verify $OUT/library-h100.json 2>&1 | tail -15
    momtune report --storage $DB --library $OUT/library-h100.json --bench .bench/bench-*.json \
      --out /tmp/report 2>&1 | tail -5
    tar czf $OUT/report.tgz -C /tmp report ;;  # at most 8 files come back: the report as one archive
  *) echo "usage: bash bench/gpu_session.sh tests|bench|search|sampler|report"; exit 2 ;;
esac
cp .bench/momtune-h100.db $OUT/ 2>/dev/null || true
