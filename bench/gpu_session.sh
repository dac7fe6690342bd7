# One device call that produces everything the reports need (run from the repo root on the H100):
#   bench (layer prefill/decode, model decode: momtune vs fla vs reference), GPU searches,
#   export of the tuned library. Results land in $OUT (sqlite db, library, bench json, logs).
# Budget knobs: SEARCH_S (seconds per study), TRIALS.
source bench/device_setup.sh
: "${TRIALS:=16}" "${SEARCH_S:=60}"
DB=sqlite:///$OUT/momtune-h100.db
set -o pipefail
timeout 200 momtune bench --presets mom-340m --what layer_prefill layer_decode model_decode \
  --prefill 8x2048 --batches 1 32 --impls momtune fla reference --out $OUT/bench-h100.json 2>&1 | tee $OUT/bench.log | tail -25
for t in recurrence:mom-340m-prefill decode:decode merge:mom-340m-prefill conv:mom-340m-prefill; do
  timeout 150 momtune search --template ${t%%:*} --shapes ${t##*:} --trials $TRIALS --timeout $SEARCH_S \
    --storage $DB --workers 16 2>&1 | tee -a $OUT/search.log | tail -6
done
momtune export --storage $DB --out $OUT/library-h100.json 2>&1 | tail -3
