# The H100 runs the open issues need, as stages that can be chained in one device call (each
# device call is at most 10 min; every stage caps itself with `timeout`). Run from the repo root
# on the device, carrying .whl and .bench (the study database and Triton's kernel cache):
#   bash bench/gpu_session.sh tests               # `pytest -m gpu`, run 1: tests/engine, tests/kernels (<10 min)
#   bash bench/gpu_session.sh smoke tests2        # GPU smoke, then run 2: tests/model, tests/bench  (<10 min)
#   bash bench/gpu_session.sh demo                # momtune.apply on fla's MomForCausalLM: tokens, ms/token
#   bash bench/gpu_session.sh bench340            # momtune bench on mom-340m
#   bash bench/gpu_session.sh tune                # TPE on every template + exhaustive/TPE/random  (~9 min)
#   bash bench/gpu_session.sh finish              # mom-1.3b and LM bench, export + verify,
#                                                 # recurrence STATES split, layer profile       (~9 min)
#   bash bench/gpu_session.sh search / sampler    # longer versions of tune's two halves
#   bash bench/gpu_session.sh effort              # --effort quick on the recurrence (pattern search)
#   bash bench/gpu_session.sh library1            # H200 library: recurrence, merge, conv, decode (~7 min)
#   bash bench/gpu_session.sh library2            # H200 library: routing, norm, swiglu, both sets (~8 min)
#   bash bench/gpu_session.sh library3            # H200 library: the backward templates (~6 min)
#   bash bench/gpu_session.sh exhaustive          # the reduced recurrence space, every config, 3 shapes (~4 min)
#   bash bench/gpu_session.sh diagrec             # recurrence configs that fault: which kernel (<7 min)
#   bash bench/gpu_session.sh h128 recbench       # momtune tuned at head 128, then the recurrence alone:
#                                                 # momtune vs fla vs FlashInfer (<7 min each)
#   bash bench/gpu_session.sh trainprof           # profile of a layer's training step + layer_train bench
#   bash bench/gpu_session.sh trainstep           # training step: new kernels' GPU tests, profile, layer_train
#   bash bench/gpu_session.sh train               # layer training step vs reference/fla + GPU training tests
#   bash bench/gpu_session.sh mutants             # the gate's mutant suite on the GPU, every template (<7 min)
#   bash bench/gpu_session.sh trainrun            # 300 steps of associative recall, kernels vs reference (<7 min)
#   bash bench/gpu_session.sh shiplib             # export the quick/ studies (<1 min)
#   bash bench/gpu_session.sh verify              # verify the shipped library, a template at a time (VERIFY_TEMPLATES)
#   bash bench/gpu_session.sh projection          # all-memories projection GEMM vs routed rows (<2 min)
#   bash bench/gpu_session.sh backward            # norm_bwd, swiglu_bwd vs PyTorch autograd (<2 min)
#   bash bench/gpu_session.sh multigpu            # one GPU vs all (x2 machine): the same sweep, wall time
#   bash bench/gpu_session.sh chunkbwd            # recurrence backward's chunk kernels: GPU tests, bench (<5 min)
#   bash bench/gpu_session.sh report              # export, verify and build the report on the device
# The study database is $OUT/momtune-h100.db (seeded from a carried .bench/momtune-h100.db, else
# from the newest docs/perf/data/momtune-h200-*.db.gz), next to every log and JSON file; copy it
# back to .bench/ before the next call, and commit it gzipped to docs/perf/data at the session's end. The report can be rebuilt anywhere from those files:
#   momtune report --storage sqlite:///.bench/momtune-h100.db --library .bench/library-h100.json \
#     --bench .bench/bench-*.json --out reports/h100-DATE
source bench/device_setup.sh
mkdir -p .bench
# resume the newest committed study database (docs/perf/data/momtune-h200-DATE-sN.db.gz: a session's
# studies, committed at its end since session 13; the ignored .bench of an earlier checkout was lost
# with it) unless a newer one was carried; else the committed H100 report's
if [ ! -f .bench/momtune-h100.db ]; then
  latest=$(ls docs/perf/data/momtune-h200-*.db.gz 2>/dev/null | sort -V | tail -1)
  if [ -n "$latest" ]; then gunzip -c "$latest" > .bench/momtune-h100.db && echo "study database: $latest"
  else cp reports/h100-2026-11-26/data/momtune-h100.db .bench/ 2>/dev/null || true; fi
fi
# The database is written under $OUT itself: a call cut off by its time limit still brings back
# every finished trial (a copy made at the end of a stage would be lost with the machine).
cp .bench/momtune-h100.db $OUT/ 2>/dev/null || true
DB=sqlite:///$OUT/momtune-h100.db
# Triton's kernel cache travels between calls and sessions: .bench/triton-cache.tgz.* (carried
# with .bench) is unpacked here, and the cache comes back as $OUT/triton-cache.tgz.NN (up to 3
# pieces of 15 MB: returned files are at most 16 MiB, a call carries 64 MiB in all) at the end:
# a cold machine then compiles only kernels whose source changed (the GPU tests spent most of
# their cold minutes compiling, fla's autotuning included). Copy the pieces to .bench/ (replacing
# the old ones) before the next call.
export TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p $TRITON_CACHE_DIR
if ls .bench/triton-cache.tgz.* >/dev/null 2>&1; then
  cat .bench/triton-cache.tgz.* | tar xzf - -C /tmp && echo "triton cache: $(ls $TRITON_CACHE_DIR | wc -l) entries carried"
fi
save_cache() {
  tar czf /tmp/triton-cache.tgz -C /tmp triton-cache
  local size=$(stat -c %s /tmp/triton-cache.tgz)
  if [ "$size" -le 45000000 ]; then
    (cd /tmp && rm -f triton-cache.tgz.* && split -b 15000000 -d triton-cache.tgz triton-cache.tgz. && cp triton-cache.tgz.* $OUT/)
    echo "triton cache: $size B back in $(ls /tmp/triton-cache.tgz.* | wc -l) pieces"
  else echo "triton cache: $size B, too large to bring back"; fi
}
set -o pipefail

search() {  # search NAME SET TRIALS SECONDS [extra args]: one TPE search, capped
  local name=$1 set=$2 trials=$3 secs=$4; shift 4
  timeout $((secs * 4 + 60)) momtune search --template $name --shapes $set --trials $trials --timeout $secs \
    --storage $DB --workers 16 "$@" >> $OUT/search.log 2>&1
  echo "search $name $set: rc $?"; grep -E "winner|stopped|error" $OUT/search.log | tail -4
}

stage() {
  echo "=== stage $1 ($(date +%T))"
  case "$1" in
    smoke)  # every template, the fast layer and the fast LM against the references (make gpu-smoke)
      timeout ${SMOKE_CAP:-240} python3 bench/gpu_smoke.py --out $OUT/gpu-smoke.json > $OUT/gpu-smoke.log 2>&1
      echo "smoke: rc $?"; tail -18 $OUT/gpu-smoke.log ;;
    tests)  # `pytest -m gpu`, first of two runs: the kernels and the engine (every template and its gate)
      # SIGINT at the cap: pytest still prints its failures and durations
      timeout -s INT -k 30 ${TESTS_CAP:-560} python3 -m pytest -v -m gpu -s -p no:cacheprovider -rfE --tb=short --durations=15 \
        --junitxml=$OUT/gpu-tests.xml tests/engine tests/kernels > $OUT/gpu-tests.log 2>&1
      echo "pytest -m gpu (tests/engine, tests/kernels): rc $?"; grep -E "FAILED|ERROR|passed|failed" $OUT/gpu-tests.log | tail -25 ;;
    tests2|benchsuite)  # `pytest -m gpu`, second run: the model and the fla benchmark suite (fla autotunes on first use)
      timeout -s INT -k 30 ${BENCH_CAP:-560} python3 -m pytest -v -m gpu -s -p no:cacheprovider -rfE --tb=short --durations=15 \
        tests/model tests/bench --junitxml=$OUT/gpu-tests2.xml --benchmark-json $OUT/bench-pytest.json > $OUT/gpu-tests2.log 2>&1
      echo "pytest -m gpu (tests/model, tests/bench): rc $?"; grep -E "FAILED|ERROR|passed|failed" $OUT/gpu-tests2.log | tail -25 ;;
    demo)  # issue 13: fla's MomForCausalLM made fast with momtune.apply, HF generate, time per token
      timeout 150 python3 bench/gpu_apply_demo.py --out $OUT/apply-demo-fp32.json > $OUT/apply-demo.log 2>&1
      echo "apply demo fp32: rc $?"
      timeout 170 python3 bench/gpu_apply_demo.py --dtype bfloat16 --layers 8 --budget 30 --out $OUT/apply-demo-bf16.json \
        >> $OUT/apply-demo.log 2>&1; echo "apply demo bf16: rc $?"; tail -14 $OUT/apply-demo.log ;;
    projection)  # issue 12, item 3: the projection for every memory vs the routed rows only (grouped GEMM)
      timeout 150 python3 bench/gpu_projection.py --out $OUT/projection.json > $OUT/projection.log 2>&1
      echo "projection: rc $?"; tail -26 $OUT/projection.log ;;
    backward)  # issue 14: norm_bwd and swiglu_bwd against PyTorch autograd of the same ops (bf16)
      timeout 120 python3 bench/gpu_backward.py --out $OUT/backward.json > $OUT/backward.log 2>&1
      echo "backward: rc $?"; tail -12 $OUT/backward.log ;;
    chunkbwd)  # issue 14: the recurrence backward's chunk-local work on Triton kernels (chunk_bwd.py): its
      # GPU tests and the layer's bf16 training step, then old (PyTorch chunk work) vs new, and the sweep
      timeout -s INT -k 20 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
        tests/kernels/test_recurrence_chunk_bwd.py tests/kernels/test_recurrence_scan.py \
        "tests/model/test_fast_model.py::test_gpu_layer_training_step_bf16_matches_float64_reference" \
        > $OUT/gpu-chunkbwd-tests.log 2>&1
      echo "pytest -m gpu (chunk backward): rc $?"; tail -4 $OUT/gpu-chunkbwd-tests.log
      timeout 200 python3 bench/gpu_chunk_bwd.py --sweep --out $OUT/chunk-bwd.json > $OUT/chunk-bwd.log 2>&1
      echo "chunk backward bench: rc $?"; tail -30 $OUT/chunk-bwd.log ;;
    trainstep)  # issue 14: the training step after session 12's glue work (q, k normalisation kernels, the
      # projection's blocks, K blocks of 64): their GPU tests, the chunk backward old vs new, the step's profile
      # and layer_train (momtune only: the reference's rows are in bench-train of `train`/`trainprof`)
      timeout -s INT -k 20 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short tests/kernels/test_qk_norm.py \
        tests/kernels/test_recurrence_state_bwd.py \
        tests/kernels/test_recurrence_chunk_bwd.py::test_gpu_chunk_backward_at_the_model_shape \
        "tests/model/test_fast_model.py::test_gpu_layer_training_step_bf16_matches_float64_reference" \
        > $OUT/gpu-trainstep-tests.log 2>&1
      echo "pytest -m gpu (training step): rc $?"; tail -4 $OUT/gpu-trainstep-tests.log
      timeout 100 python3 bench/gpu_chunk_bwd.py --sweep --out $OUT/chunk-bwd.json > $OUT/chunk-bwd.log 2>&1
      echo "chunk backward bench: rc $?"; grep -v "^ *sweep" $OUT/chunk-bwd.log | tail -12; grep "sweep" $OUT/chunk-bwd.log | cut -c1-150
      # B1 T4096 (5 long segments) got 13% slower in session 13 after the 3-stage default: its own sweep
      timeout 80 python3 bench/gpu_chunk_bwd.py --batch 1 --seq 4096 --sweep > $OUT/chunk-bwd-b1.log 2>&1
      echo "chunk backward bench B1 T4096: rc $?"; grep -E "new total|sweep" $OUT/chunk-bwd-b1.log | cut -c1-150
      OUT=$OUT timeout 60 python3 bench/gpu_profile_layer.py --train --impls momtune --top 16 > $OUT/profile-train.log 2>&1
      echo "profile train: rc $?"; grep -A18 "^momtune" $OUT/profile-train.log | cut -c1-120
      timeout 90 momtune bench --presets mom-340m --what layer_train --prefill 8x2048 1x4096 \
        --impls momtune --out $OUT/bench-train.json > $OUT/bench-train.log 2>&1
      echo "bench layer_train: rc $?"; grep -a "layer_train mom" $OUT/bench-train.log ;;
    train)  # issue 14: a layer's training step (forward + backward) on the kernels vs the reference
      # backend vs fla (whose chunk backward refuses Triton < 3.7.1 on Hopper: its row says so), and the
      # GPU training tests (backward templates in bf16, the bench's layer_train rows)
      timeout 240 momtune bench --presets mom-340m --what layer_train --prefill 8x2048 1x4096 \
        --impls momtune reference fla --out $OUT/bench-train.json > $OUT/bench-train.log 2>&1
      echo "bench layer_train: rc $?"; tail -12 $OUT/bench-train.log
      timeout 130 momtune bench --presets mom-340m --what model_train --prefill 4x1024 --layers 4 \
        --impls momtune reference --out $OUT/bench-model-train.json > $OUT/bench-model-train.log 2>&1
      echo "bench model_train: rc $?"; tail -6 $OUT/bench-model-train.log
      timeout -s INT -k 20 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
        tests/kernels/test_backward_templates.py tests/kernels/test_recurrence_scan.py tests/kernels/test_recurrence_chunk_bwd.py tests/bench/test_bench_train.py tests/bench/test_bench_recurrence.py \
        "tests/model/test_fast_model.py::test_gpu_layer_training_step_bf16_matches_float64_reference" > $OUT/gpu-train-tests.log 2>&1
      echo "pytest -m gpu (training): rc $?"; tail -4 $OUT/gpu-train-tests.log ;;
    mutants)  # issue 11, item 1: the gate's mutant suite on the GPU (bf16, each template's first model
      # shape), every template: session 5 ran the forward templates' 47; the backward templates' are new
      timeout -s INT -k 20 420 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short \
        tests/engine/test_gate_mutants.py > $OUT/gpu-gate-mutants.log 2>&1
      echo "pytest -m gpu (gate mutants): rc $?"; tail -6 $OUT/gpu-gate-mutants.log ;;
    trainrun)  # issue 14, item 3: a small MoM LM learns associative recall on the kernels and on the
      # reference (same init, same batches), loss curves compared against a nudged reference's drift
      timeout 420 python3 bench/gpu_train_run.py --steps 300 --out $OUT/train-run.json --plot $OUT/train-run.png \
        > $OUT/train-run.log 2>&1; echo "train run: rc $?"; tail -5 $OUT/train-run.log ;;
    bench340)
      timeout 230 momtune bench --presets mom-340m --prefill 8x2048 1x4096 --batches 1 8 32 128 \
        --out $OUT/bench-340m.json > $OUT/bench-340m.log 2>&1; echo "bench rc $?"; tail -45 $OUT/bench-340m.log ;;
    tune)  # the shortest useful tuning pass: slow compiles (> 30 s) are recorded as timeouts
      search recurrence mom-340m-prefill 40 35 --trial-timeout 30
      search merge mom-340m-prefill 12 8
      search conv mom-340m-prefill 12 8
      search routing mom-340m-prefill 10 6
      search decode decode 24 10
      search norm mom-340m-prefill 10 5
      search swiglu mom-340m-prefill 10 5
      for s in grid:112:0:100 tpe:22:0:40 random:22:0:40; do
        IFS=: read sampler trials seed secs <<< "$s"
        local study=$sampler-s$seed; [ $sampler = grid ] && study=exhaustive
        timeout $((secs + 40)) momtune search --template recurrence --shapes mom-340m-B8 --space-dir bench/spaces \
          --sampler $sampler --seed $seed --no-transfer --trials $trials --timeout $secs --trial-timeout 30 --study $study \
          --storage $DB --workers 16 >> $OUT/sampler.log 2>&1
        echo "sampler $study: rc $?"; grep -E "winner" $OUT/sampler.log | tail -1
      done ;;
    search)
      search recurrence mom-340m-prefill 40 50
      search decode decode 24 15
      search merge mom-340m-prefill 12 10
      search conv mom-340m-prefill 12 10
      search routing mom-340m-prefill 10 8 ;;
    sampler)  # ground truth = every config of the reduced 112-config space (both state layouts); TPE, random,
      # pattern at 22 (<= 20%). Session 11's sweep at N 49152 (this kernel version) resumes with nothing to
      # do; the studies of session 10 measured another kernel version and stay as they are (the new ones
      # are versioned name@hash by momtune search). pattern2-sN: the pattern search with repaired moves
      # and batches of 2 (session 10's pattern-sN asked its 11 configs as one blind batch).
      # SAMPLER_RUNS picks the runs.
      for s in ${SAMPLER_RUNS:-grid:112:0 tpe:22:0 tpe:22:1 tpe:22:2 random:22:0 random:22:1 random:22:2 \
               pattern:22:0 pattern:22:1 pattern:22:2}; do
        IFS=: read sampler trials seed <<< "$s"
        local study=$sampler-s$seed; [ $sampler = grid ] && study=exhaustive; [ $sampler = pattern ] && study=pattern2-s$seed
        # the sweep compiles all 112 configs on a cold machine (session 13: cut at 94 by 150 s)
        timeout $([ $sampler = grid ] && echo 300 || echo 150) momtune search --template recurrence \
          --shapes mom-340m-B8 --space-dir bench/spaces \
          --sampler $sampler --seed $seed --no-transfer --trials $trials --study $study --storage $DB --workers 16 \
          >> $OUT/sampler.log 2>&1
        echo "sampler $study: rc $?"; grep -E "winner" $OUT/sampler.log | tail -1
      done
      # each study's winner looked up in the exhaustive sweep of the same kernel version (the latest)
      python3 bench/sampler_replay.py --storage $DB --study "exhaustive/recurrence:nvidia-h200:N49152-S40-H4-K256-V256-bfloat16*" \
        --measured tpe random pattern2 2>&1 | tee -a $OUT/sampler.log ;;
    multigpu)  # issue 11, item 5: the same exhaustive sweep (reduced space, 112 configs, N 49152) on one GPU
      # and on every GPU of the machine (--devices 0, then all), each with its own empty Triton cache so
      # that both compile everything; wall time and configs per minute at equal trials (16 compile workers)
      local n=$(python3 -c "import torch; print(torch.cuda.device_count())")
      for d in 0 all; do
        local t0=$(date +%s.%N)
        TRITON_CACHE_DIR=/tmp/triton-cache-mgpu-$d timeout 280 momtune search --template recurrence \
          --shapes mom-340m-B8 --space-dir bench/spaces --sampler grid --trials 112 --no-transfer \
          --study mgpu-$d-of-$n --storage $DB --workers 16 --devices $d > $OUT/multigpu-$d.log 2>&1
        local rc=$?; local t1=$(date +%s.%N)
        echo "devices $d of $n: rc $rc, wall $(python3 -c "print(f'{$t1-$t0:.1f}')") s"
        grep -a -E "per minute|winner|first result" $OUT/multigpu-$d.log | cut -c1-200 | tail -4
      done ;;
    recbench)  # issue 12: the recurrence alone, momtune (tuned library) vs fla vs FlashInfer, every shape
      # set and two head-128 shapes (the only head size FlashInfer's gated-delta prefill takes; MoM's is
      # 256), one run, floors from this GPU's measured peaks. FlashInfer comes from .peers-stage (the
      # pieces .peers/part-k carried by the calls before, see bench/peers_split.sh), else it is left out.
      local impls="momtune fla"
      if ! python3 -c "import flashinfer" 2>/dev/null && ls .peers-stage/peers.tar.* >/dev/null 2>&1; then
        cat .peers-stage/peers.tar.* | tar xf - -C /tmp && python3 -m pip install -q --no-index --no-deps \
          --no-compile --target /tmp/site /tmp/peers/*.whl 2>&1 | grep -v "already exists" | tail -3
      fi
      # nvidia-cutlass-dsl puts its packages (cutlass, cutlass.cute) in dsl_packages/ through a .pth
      # file, which a --target install does not run: the folder goes on the path here (session 11's
      # FlashInfer rows failed with "No module named 'cutlass'", then 'cutlass.cute': the payload is
      # split over nvidia-cutlass-dsl-libs-base, -libs-core and -libs-cu13, all three carried now)
      [ -d /tmp/site/nvidia_cutlass_dsl/dsl_packages ] && export PYTHONPATH=/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH
      python3 -c "import cutlass.cute" 2>&1 | tail -1
      python3 -c "import flashinfer; print('flashinfer', flashinfer.__version__)" 2>&1 | tail -1 && impls="$impls flashinfer"
      timeout 420 momtune bench --what recurrence --presets mom-340m mom-1.3b \
        --recurrence-sets mom-340m-prefill mom-1.3b-prefill fla-varlen N32768-S8-H16-K128-V128 N131072-S32-H16-K128-V128 \
        --impls $impls \
        --out $OUT/bench-recurrence.json > $OUT/bench-recurrence.log 2>&1
      echo "bench recurrence: rc $?"; grep -a "^  recurrence " $OUT/bench-recurrence.log | cut -c1-160 ;;
    h128)  # issue 12: momtune tuned at head size 128 (the reduced space's every config, bench/spaces) so
      # that recbench's FlashInfer comparison runs a tuned config there; merged into the shipped library
      timeout 420 momtune search --template recurrence --shapes gdn-h128 --space-dir bench/spaces --sampler grid \
        --trials 112 --no-transfer --study exhaustive --storage $DB --workers 16 -q > $OUT/h128.log 2>&1
      echo "h128 sweep: rc $?"; grep -a -E "winner|per minute" $OUT/h128.log | cut -c1-200 | tail -6
      SHIP_TEMPLATES=recurrence stage shiplib ;;
    diagrec)  # which recurrence configs fail and in which kernel (BT 64, BV 32: session 10's failures)
      timeout 400 python3 bench/gpu_diag_recurrence.py > $OUT/diag-recurrence.log 2>&1; echo "diag recurrence: rc $?"
      cut -c1-300 $OUT/diag-recurrence.log | tail -16 ;;
    trainprof)  # issue 14: where a layer's training step goes (torch.profiler), then the step's bench rows
      OUT=$OUT timeout 200 python3 bench/gpu_profile_layer.py --train --impls momtune --top 20 > $OUT/profile-train.log 2>&1
      echo "profile train: rc $?"; grep -A22 "^momtune" $OUT/profile-train.log | cut -c1-150
      timeout 200 momtune bench --presets mom-340m --what layer_train --prefill 8x2048 1x4096 \
        --impls momtune reference --out $OUT/bench-train.json > $OUT/bench-train.log 2>&1
      echo "bench layer_train: rc $?"; grep -a "layer_train mom" $OUT/bench-train.log ;;
    exhaustive)  # every config of the reduced recurrence space at every mom-340m prefill shape (N 49152
      # resumes the sampler comparison's sweep); then `shiplib` takes each shape's better study
      # (112 configs: both state layouts; EXH_SHAPES picks a set, EXH_CAP the seconds: a cut sweep resumes)
      timeout ${EXH_CAP:-450} momtune search --template recurrence --shapes ${EXH_SHAPES:-mom-340m-prefill} \
        --space-dir bench/spaces --sampler grid --trials 112 --study exhaustive --storage $DB --workers 16 \
        >> $OUT/exhaustive.log 2>&1
      echo "exhaustive: rc $?"; grep -a "^│ exh" $OUT/exhaustive.log | cut -c1-220 ;;
    library1|library2|library3)  # issue 11, item 6: every template's H200 library, --effort quick (pattern
      # search), studies named quick/... (the recurrence resumes the effort stage's); then `shiplib`.
      # library3: the backward templates (issue 14) on the mom-340m prefill shapes, the recurrence's
      # first (60 s a shape: its float64 autograd reference takes seconds at N 196608)
      # (session 9 searched the recurrence and decode, whose sources have not changed since: LIBRARY_FULL=1
      # searches them again in library1; the short ops were re-timed as graphs after session 9)
      # LIBRARY_RUNS="template:set:seconds ..." (one template an entry) replaces a stage's runs
      if [ -n "${LIBRARY_RUNS:-}" ]; then
        local runs=($LIBRARY_RUNS)
      elif [ $1 = library1 ] && [ -n "${LIBRARY_FULL:-}" ]; then
        local runs=("recurrence merge conv:mom-340m-prefill:25" "decode:decode:25")
      elif [ $1 = library1 ]; then
        local runs=("merge conv routing norm swiglu:mom-340m-prefill:15")
      elif [ $1 = library2 ]; then
        local runs=("routing norm swiglu:mom-1.3b-prefill:15")
      else
        local runs=("recurrence_bwd:mom-340m-prefill:60" "norm_bwd swiglu_bwd conv_bwd:mom-340m-prefill:15"
                    "merge_bwd routing_bwd:mom-340m-prefill:15")
      fi
      for r in "${runs[@]}"; do
        IFS=: read names set secs <<< "$r"
        local targs=""; for n in $names; do targs="$targs --template $n"; done
        # 3 shapes a template; per study its time, the winner's re-timing and the references
        local cap=$(( $(wc -w <<< "$names") * 3 * (secs + 20) + 60 )); [ $cap -gt 500 ] && cap=500  # one device call
        timeout $cap momtune search $targs --shapes $set --effort quick --timeout $secs --study quick \
          --storage $DB --workers 16 -q >> $OUT/$1.log 2>&1; echo "$names $set: rc $?"
      done
      grep -a -E "winner|per minute" $OUT/$1.log | cut -c1-200 | tail -40 ;;
    shiplib)  # export the quick/... studies (SHIP_TEMPLATES: only those) merged into the shipped H200 library
      # (its other templates kept with their own provenance); ship $OUT/library-h200.json as
      # momtune/libraries/nvidia-h200-triton3.6.json
      cp momtune/libraries/nvidia-h200-triton3.6.json $OUT/library-h200.json
      local targs=""; for n in ${SHIP_TEMPLATES:-}; do targs="$targs --template $n"; done
      momtune export --storage $DB --study quick,exhaustive --gpu "$(python3 -c 'import torch; print(torch.cuda.get_device_name())')" \
        $targs --merge --out $OUT/library-h200.json 2>&1 | tail -3 ;;
    verify)  # every entry of the shipped H200 library (or $LIB) against the default, one template per
      # capped call so a cut run keeps what it verified (~16 s an entry: all 31 entries do not fit one
      # device call; session 9 verified recurrence, merge, conv: VERIFY_TEMPLATES picks; default: all)
      local lib=${LIB:-momtune/libraries/nvidia-h200-triton3.6.json}
      local all=$(python3 -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['templates']))" $lib)
      for t in ${VERIFY_TEMPLATES:-$all}; do
        timeout 200 momtune verify $lib --template $t >> $OUT/verify-h200.log 2>&1; echo "verify $t: rc $?"
      done
      grep -a -E "^│ [a-z]|pass their check|slower" $OUT/verify-h200.log | cut -c1-200 | tail -40 ;;
    effort)  # --effort quick on the full recurrence space, every mom-340m prefill shape: configs per
      # minute, time to the first result, and the winner against bench/gpu_recurrence.py's hand-listed best
      timeout 300 momtune search --template recurrence --shapes mom-340m-prefill --effort quick --study quick \
        --storage $DB --workers 16 > $OUT/effort-quick.log 2>&1; echo "effort quick: rc $?"
      grep -E "winner|stopped|trials" $OUT/effort-quick.log | tail -8 ;;
    finish)
      timeout 150 momtune bench --presets mom-1.3b --prefill 8x2048 --batches 1 32 --impls momtune fla \
        --out $OUT/bench-1.3b.json > $OUT/bench-1.3b.log 2>&1; echo "bench rc $?"; tail -16 $OUT/bench-1.3b.log
      # LM decode at the batches bench340 did not reach (fla's 24-layer step at B 128 is ~3 s: momtune only)
      timeout 100 momtune bench --presets mom-340m --what model_decode --batches 8 32 --impls momtune fla \
        --out $OUT/bench-340m-lm.json > $OUT/bench-340m-lm.log 2>&1; tail -4 $OUT/bench-340m-lm.log
      timeout 40 momtune bench --presets mom-340m --what model_decode --batches 128 --impls momtune \
        --out $OUT/bench-340m-lm128.json >> $OUT/bench-340m-lm.log 2>&1; tail -2 $OUT/bench-340m-lm.log
      momtune export --storage $DB --out $OUT/library-h100.json 2>&1 | tail -3
      timeout 120 momtune verify $OUT/library-h100.json > $OUT/verify.log 2>&1; echo "verify rc $?"; tail -25 $OUT/verify.log
      timeout 90 python3 bench/gpu_recurrence.py --quick > $OUT/recurrence-quick.log 2>&1; tail -25 $OUT/recurrence-quick.log
      timeout 90 python3 bench/gpu_profile_layer.py > $OUT/profile-layer.log 2>&1; grep -A8 -E "^(momtune|fla):" $OUT/profile-layer.log ;;
    report)
      momtune export --storage $DB --out $OUT/library-h100.json 2>&1 | tail -3
      timeout 200 momtune verify $OUT/library-h100.json > $OUT/verify.log 2>&1; tail -25 $OUT/verify.log
      momtune report --storage $DB --library $OUT/library-h100.json --bench .bench/bench-*.json \
        --out /tmp/report 2>&1 | tail -5
      tar czf $OUT/report.tgz -C /tmp report ;;  # at most 8 files come back: the report as one archive
    *) echo "unknown stage $1; stages: smoke tests tests2 demo bench340 tune search sampler exhaustive diagrec trainprof trainstep multigpu recbench effort library1 library2 library3 train trainrun shiplib verify projection backward finish report"; return 2 ;;
  esac
}

[ $# -gt 0 ] || { echo "usage: bash bench/gpu_session.sh STAGE..."; exit 2; }
for s in "$@"; do
  stage $s
  # the database also stays on the machine (a warm machine keeps .bench between calls), so the next
  # call needs not carry it
  cp $OUT/momtune-h100.db .bench/ 2>/dev/null || true
done
[ "${SAVE_CACHE:-1}" = 0 ] || save_cache
echo "=== done ($(date +%T))"
