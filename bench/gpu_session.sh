# One device call that produces everything the reports need (run from the repo root on the H100):
#   the fast-model GPU tests, bench (layer prefill/decode, model decode: momtune vs fla vs
#   reference), GPU searches, export of the tuned library. Results land in $OUT.
source bench/device_setup.sh
: "${TRIALS:=12}" "${SEARCH_S:=45}"
DB=sqlite:///$OUT/momtune-h100.db
set -o pipefail
timeout 90 python3 -m pytest -q -m gpu tests/model -p no:cacheprovider 2>&1 | tail -4
timeout 200 momtune bench --presets mom-340m --what layer_prefill layer_decode model_decode \
  --prefill 8x2048 --batches 1 32 --impls momtune fla reference --out $OUT/bench-h100.json > $OUT/bench.log 2>&1
tail -22 $OUT/bench.log
for t in recurrence:mom-340m-prefill:$SEARCH_S decode:decode:20; do
  IFS=: read name set secs <<< "$t"
  timeout 170 momtune search --template $name --shapes $set --trials $TRIALS --timeout $secs \
    --storage $DB --workers 16 >> $OUT/search.log 2>&1
  tail -12 $OUT/search.log
done
momtune export --storage $DB --out $OUT/library-h100.json 2>&1 | tail -3
