#!/usr/bin/env bash
# Wheel check: the package as a user gets it, not as the checkout runs it. Builds the wheel of
# this checkout, installs it in a fresh venv in a temp dir (torch 2.13.0, the CPU build, first;
# the rest from the package index), then, from a temp dir outside the checkout so nothing is
# imported from the repo, runs `momtune --help`, `momtune list` and a tiny interpreter search and
# export. Prints each step's time; exits non-zero on any failure, naming the step.
# Environment: PYTHON = interpreter of the fresh venv (python3); KEEP_TMP=1 keeps the temp dir.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd -P)"
BUILD_PY="$ROOT/.venv/bin/python"
[ -x "$BUILD_PY" ] || BUILD_PY="$(command -v python3)"
BASE_PY="${PYTHON:-python3}"
TEMPLATES=(routing recurrence merge conv decode norm swiglu norm_bwd swiglu_bwd merge_bwd routing_bwd conv_bwd)
COMMANDS=(search export verify bench report list)

TMP="$(cd "$(mktemp -d -t momtune-wheel-check.XXXXXX)" && pwd -P)"
case "$TMP/" in
  "$ROOT"/*) echo "wheel_check: temp dir $TMP is inside the checkout $ROOT; set TMPDIR elsewhere" >&2; exit 1 ;;
esac
cleanup() { if [ "${KEEP_TMP:-0}" = 1 ]; then echo "wheel_check: kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT

STEP="set-up"
STEP_T0=0
T_START=$(date +%s%N)
PASSED=0
# the closing line is 'wheel_check: N passed, N failed', the plain form CI reads
trap 'echo "wheel_check: FAILED in step \"$STEP\" (exit $?, line $LINENO)" >&2; echo "wheel_check: $PASSED passed, 1 failed"' ERR
fail() { echo "wheel_check: FAILED in step \"$STEP\": $*" >&2; echo "wheel_check: $PASSED passed, 1 failed"; exit 1; }
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
secs() { printf '%d.%02ds' $(($1 / 1000)) $((($1 % 1000) / 10)); }
begin() { STEP="$1"; STEP_T0=$(date +%s%N); echo "wheel_check: $STEP ..."; }
end() { PASSED=$((PASSED + 1)); echo "wheel_check: $STEP: ok in $(secs "$(ms_since "$STEP_T0")")"; }

begin "build the wheel"
# setuptools' build and egg-info folders go to the temp dir: nothing is written into the
# checkout, and no stale build/lib (e.g. of a deleted module) can slip into the wheel
printf '[build]\nbuild_base = %s\n[egg_info]\negg_base = %s\n' "$TMP/build" "$TMP" > "$TMP/setup.cfg"
(cd "$ROOT" && DIST_EXTRA_CONFIG="$TMP/setup.cfg" "$BUILD_PY" -m pip wheel -q --no-deps -w "$TMP/dist" .)
shopt -s nullglob
wheels=("$TMP"/dist/momtune-*.whl)
shopt -u nullglob
[ ${#wheels[@]} -eq 1 ] || fail "expected one momtune wheel in $TMP/dist, found ${#wheels[@]}"
WHEEL="${wheels[0]}"
echo "  $(basename "$WHEEL")"
end

begin "create a fresh venv ($BASE_PY)"
"$BASE_PY" -m venv "$TMP/venv"
VPY="$TMP/venv/bin/python"
"$VPY" -m pip install -q --upgrade pip  # as `make setup` does
end

begin "install torch==2.13.0 (CPU build)"
"$VPY" -m pip install -q torch==2.13.0
end

begin "install the wheel alone (no extras: what runs the model)"
"$VPY" -m pip install -q "$WHEEL"
for m in optuna rich matplotlib; do
  if "$VPY" -c "import $m" 2>/dev/null; then fail "the bare wheel pulled in $m (only the tune/report extras should)"; fi
done
end

mkdir "$TMP/run"
cd "$TMP/run"
unset PYTHONPATH VIRTUAL_ENV
export PATH="$TMP/venv/bin:$PATH" COLUMNS=240 TRITON_INTERPRET=1

begin "momtune is imported from the venv, not the checkout"
where="$("$VPY" -c 'import momtune.commands, momtune.kernels.merge, momtune.reference, momtune.search_spaces as s
print(momtune.__file__, momtune.commands.__file__, momtune.kernels.merge.__file__, momtune.reference.__file__, s.__file__, sep="\n")')"
echo "$where" | sed 's/^/  /'
while IFS= read -r f; do
  case "$f" in "$TMP/venv/"*) ;; *) fail "imported $f, not from the fresh venv $TMP/venv" ;; esac
done <<< "$where"
end

begin "the fast model runs without the tune and report extras"
"$VPY" - <<'EOF' || fail "the model path needs a tuning or report package"
import sys, torch
from momtune import MoMForCausalLM
from momtune.reference.config import MoMConfig
cfg = MoMConfig.from_preset("tiny")
model = MoMForCausalLM(cfg, backend="triton").eval()
with torch.no_grad():
    out = model.generate(torch.randint(0, cfg.vocab_size, (1, 5)), max_new_tokens=3)
loaded = [m for m in ("optuna", "rich", "matplotlib", "sqlalchemy") if m in sys.modules]
assert not loaded, f"imported {loaded}"
print(f"  generated {tuple(out.shape)} tokens in the interpreter; optuna, rich, matplotlib not imported")
EOF
out="$(momtune search --template merge --shapes tiny --trials 1 --storage "sqlite:///$TMP/x.db" 2>&1)" \
  && fail "momtune search ran without optuna"
grep -q "momtune\[tune\]" <<< "$out" || fail "momtune search without optuna does not say to install momtune[tune]: $out"
end

begin "install the tune and report extras"
"$VPY" -m pip install -q "$WHEEL[tune,report]"
end

begin "momtune --help"
out="$(momtune --help)"
for c in "${COMMANDS[@]}"; do
  grep -Eq "^ +$c +" <<< "$out" || fail "'momtune --help' lists no subcommand $c:"$'\n'"$out"
done
end

begin "momtune list"
out="$(momtune list)"
for t in "${TEMPLATES[@]}"; do
  # the template's module and its search space (package data) on the template's row; a backward
  # template NAME_bwd lives beside its forward, in momtune.kernels.NAME.template_bwd
  mod="momtune.kernels.$t.template"
  case "$t" in *_bwd) mod="momtune.kernels.${t%_bwd}.template_bwd" ;; esac
  grep -Eq "${mod//./\\.}[[:space:]].*\b$t\.toml\b" <<< "$out" \
    || fail "'momtune list' has no row for template $t with module $mod and $t.toml:"$'\n'"$out"
done
end

begin "momtune search (merge, tiny, 2 trials, interpreter)"
momtune search --template merge --shapes tiny --trials 2 --storage "sqlite:///$TMP/s.db"
end

begin "momtune export"
momtune export --storage "sqlite:///$TMP/s.db" --out "$TMP/lib.json"
[ -s "$TMP/lib.json" ] || fail "momtune export wrote no $TMP/lib.json"
"$VPY" - "$TMP/lib.json" <<'EOF' || fail "$TMP/lib.json is not a library with merge entries"
import json, sys
data = json.load(open(sys.argv[1]))
templates = data.get("templates")
if not isinstance(templates, dict) or "merge" not in templates:
    sys.exit(f"no 'templates' key holding 'merge' (keys: {sorted(data)})")
if not templates["merge"].get("entries"):
    sys.exit("templates.merge has no entries")
print(f"  {sys.argv[1]}: templates {sorted(templates)}, merge entries {len(templates['merge']['entries'])}")
EOF
end

STEP="done"
echo "wheel_check: OK, the wheel installs and runs outside the checkout (total $(secs "$(ms_since "$T_START")"))"
echo "wheel_check: $PASSED passed, 0 failed"
