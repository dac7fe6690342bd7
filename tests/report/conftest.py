"""Small stored inputs for report tests, written as docs/DATA_FORMATS.md says: a SQLite storage
with several studies (failed trials of several kinds, two samplers and an exhaustive study for
one shape), a tuned library and a bench file.

The studies are current ones: trials and winners record their spread, the winner its re-timed
candidates, the study the peaks its floor uses (measured on the GPU; the interpreter's are
nominal) and floor_ms from the template's cost, and provenance Python and fla. ``old=True``
writes them as older searches did (none of that), as does the default bench file."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

GPU = "NVIDIA H100 80GB HBM3"
GPU_SLUG = "nvidia-h100-80gb-hbm3"
# as older files record it (no python, no fla)
PROV = {"gpu": GPU, "capability": [9, 0], "sm_count": 132, "driver": "550.54.15", "cuda": "12.4",
        "torch": "2.6.0", "triton": "3.6.0", "momtune": "0.1.0", "created": "2025-01-02T03:04:05Z",
        "commit": "abc123def456"}
PROV_NEW = {**PROV, "python": "3.12.3", "fla": "0.6.0"}  # as momtune.provenance.collect() records it now
# peaks the search measured on GPU (deliberately not any data sheet's numbers)
PEAKS = {"flops_per_s": 6.21e14, "bytes_per_s": 2.87e12, "gpu": GPU, "measured": True,
         "how": "copy of 1 GiB (read + write); bf16 GEMM 8192^3; do_bench medians"}
SPACE = {"BT": [16, 32, 64], "BV": [32, 64, 128], "num_warps": [2, 4, 8]}
DEFAULT = {"BT": 64, "BV": 32, "num_warps": 4}
SHAPE_A = {"N": 16384, "S": 40, "H": 4, "K": 64, "V": 64}
SHAPE_B = {"N": 32768, "S": 40, "H": 4, "K": 64, "V": 64}
MERGE_SHAPE = {"B": 1, "T": 4096, "H": 4, "V": 256, "J": 2, "fused_norm": 0}
TRIAL_SPREAD, WIN_SPREAD, DEFAULT_SPREAD = 0.012, 0.01, 0.015


def floor_of(template: str, shape: dict[str, int], peaks: dict[str, Any]) -> float:
    """floor_ms as the search computes it: the template's cost over the peaks."""
    import torch

    from momtune.kernels import get_template
    from momtune.timing import floor_ms

    return floor_ms(*get_template(template).cost(shape, torch.bfloat16), peaks)


def peaks_for(interpreter: bool) -> dict[str, Any]:
    from momtune.timing import NOMINAL_PEAKS

    return dict(NOMINAL_PEAKS) if interpreter else dict(PEAKS)


def shape_key(shape: dict[str, int], dtype: str = "bfloat16") -> str:
    return "-".join(f"{k}{v}" for k, v in shape.items()) + f"-{dtype}"


def rec_time(cfg: dict[str, Any], shape: dict[str, int]) -> float:
    """A made-up cost model: optimum at A is BT32 BV64 w4 (0.040 ms); at B it is BT64 BV64 w4."""
    big = shape["N"] > 20000
    f_bt = ({16: 1.7, 32: 1.1, 64: 1.0} if big else {16: 1.6, 32: 1.0, 64: 1.15})[cfg["BT"]]
    f_bv = {32: 1.3, 64: 1.0, 128: 1.2}[cfg["BV"]]
    f_nw = {2: 1.25, 4: 1.0, 8: 1.1}[cfg["num_warps"]]
    return 0.040 * shape["N"] / 16384 * f_bt * f_bv * f_nw


def rec_status(cfg: dict[str, Any]) -> tuple[str, str]:
    if cfg["BT"] == 64 and cfg["BV"] == 128:
        return "out_of_resources", "out of resource: shared memory, Required: 262144, Hardware limit: 232448"
    if cfg["BT"] == 16 and cfg["num_warps"] == 8:
        return "wrong_answer", "max rel err 3.1e-01 > rtol 4e-02"
    if cfg == {"BT": 32, "BV": 128, "num_warps": 2}:
        return "compile_error", "CompilationError: at 12:4: tl.dot needs every dim >= 16"
    if cfg == {"BT": 16, "BV": 128, "num_warps": 2}:
        return "invalid_config", "BV * BT too large for 2 warps"
    return "ok", ""


def _study(storage: str, name: str, template: str, shape: dict[str, int], sampler_name: str, sampler: Any,
           n: int, space: dict[str, list[Any]], timer: Any, status: Any, default: dict[str, Any],
           interpreter: bool = False, enqueue: tuple[dict[str, Any], ...] = (), old: bool = False,
           winner: dict[str, Any] | None = None) -> None:
    import optuna
    from optuna.trial import TrialState

    # searched in memory (fast), then copied into the SQLite storage in one go
    study = optuna.create_study(study_name=name, direction="minimize", sampler=sampler)
    for params in enqueue:
        study.enqueue_trial(params)
    attrs = {"template": template, "shape": shape, "shape_key": shape_key(shape), "dtype": "bfloat16",
             "shape_set": "test", "gpu": "interpreter" if interpreter else GPU, "interpreter": interpreter,
             "sampler": sampler_name, "space_size": math.prod(len(v) for v in space.values()),
             "provenance": PROV if old else PROV_NEW, "default_config": default,
             "default_time_ms": timer(default, shape)}
    if not old:
        peaks = peaks_for(interpreter)
        attrs.update(floor_peak=peaks, floor_ms=floor_of(template, shape, peaks))
    for k, v in attrs.items():
        study.set_user_attr(k, v)
    best: tuple[float, dict[str, Any]] | None = None
    for _ in range(n):
        trial = study.ask()
        cfg = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        st, reason = status(cfg)
        trial.set_user_attr("config", cfg)
        trial.set_user_attr("status", st)
        if st == "ok":
            t = timer(cfg, shape)
            trial.set_user_attr("time_ms", t)
            if not old:
                trial.set_user_attr("spread", TRIAL_SPREAD)
            trial.set_user_attr("max_abs_err", 1e-3)
            trial.set_user_attr("max_rel_err", 2e-3)
            study.tell(trial, t)
            best = min(best, (t, cfg), key=lambda b: b[0]) if best else (t, cfg)
        else:
            trial.set_user_attr("reason", reason)
            study.tell(trial, state=TrialState.PRUNED if st == "invalid_config" else TrialState.FAIL)
    if winner is not None:
        study.set_user_attr("winner", winner)
    elif best and old:
        study.set_user_attr("winner", {"config": best[1], "time_ms": best[0] * 0.98, "retimed": True})
    elif best:  # as momtune.winner records it: the re-timed candidates, the default among them
        study.set_user_attr("winner", {
            "config": best[1], "time_ms": best[0] * 0.98, "spread": WIN_SPREAD, "retimed": True, "trials": n,
            "default_kept": None,
            "candidates": [{"config": best[1], "time_ms": best[0] * 0.98, "spread": WIN_SPREAD},
                           {"config": default, "time_ms": timer(default, shape), "spread": DEFAULT_SPREAD}]})
    optuna.copy_study(from_study_name=name, from_storage=study._storage, to_storage=storage)


def make_storage(path: Path, interpreter: bool = False, old: bool = False) -> str:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{path}"
    gpu = "interpreter" if interpreter else GPU_SLUG
    grid = [dict(zip(SPACE, c)) for c in itertools.product(*SPACE.values())]
    a, b = shape_key(SHAPE_A), shape_key(SHAPE_B)
    common = dict(space=SPACE, timer=rec_time, status=rec_status, default=DEFAULT, interpreter=interpreter,
                  old=old)
    _study(url, f"tpe/recurrence:{gpu}:{a}", "recurrence", SHAPE_A, "tpe",
           optuna.samplers.TPESampler(seed=0, n_startup_trials=6), 20, **common)
    _study(url, f"random/recurrence:{gpu}:{a}", "recurrence", SHAPE_A, "random",
           optuna.samplers.RandomSampler(seed=1), 20, **common)
    _study(url, f"exhaustive/recurrence:{gpu}:{a}", "recurrence", SHAPE_A, "exhaustive",
           optuna.samplers.RandomSampler(seed=0), len(grid), enqueue=tuple(grid), **common)
    _study(url, f"tpe/recurrence:{gpu}:{b}", "recurrence", SHAPE_B, "tpe",
           optuna.samplers.TPESampler(seed=2, n_startup_trials=6), 12, **common)
    merge_space = {"BLOCK": [64, 128, 256], "num_warps": [4, 8]}
    _study(url, f"merge:{gpu}:{shape_key(MERGE_SHAPE)}", "merge", MERGE_SHAPE, "tpe",
           optuna.samplers.RandomSampler(seed=3), 5, merge_space,
           lambda c, s: 0.010 * (1.0 + 0.2 * (c["BLOCK"] != 128)) * (1.1 if c["num_warps"] == 8 else 1.0),
           lambda c: ("timeout", "timed out after 10 s") if c == {"BLOCK": 256, "num_warps": 8} else ("ok", ""),
           {"BLOCK": 64, "num_warps": 8}, interpreter, old=old)
    return url


NOISE_DEFAULT = {"BLOCK": 64, "num_warps": 8}
NOISE_BEST = {"BLOCK": 128, "num_warps": 4}
# merge shapes T -> (best config's time, its spread, the default's time, its spread), as re-timed:
# 1.06x within the ±8% noise; the default kept (the best came within noise); 1.25x beyond noise
NOISE_CASES = {4096: (0.0100, 0.08, 0.0106, 0.07), 8192: (0.0196, 0.03, 0.0200, 0.03),
               16384: (0.0300, 0.01, 0.0375, 0.01)}


def make_noise_storage(path: Path) -> str:
    """merge studies whose winners are within noise of the default, kept the default, or beat it."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{path}"
    space = {"BLOCK": [64, 128], "num_warps": [4, 8]}
    grid = tuple(dict(zip(space, c)) for c in itertools.product(*space.values()))
    for T, (best, best_sp, default, default_sp) in NOISE_CASES.items():
        shape = {**MERGE_SHAPE, "T": T}

        def timer(c: dict[str, Any], s: dict[str, int], best: float = best, default: float = default) -> float:
            return best if c == NOISE_BEST else default if c == NOISE_DEFAULT else default * 1.3

        kept = T == 8192
        winner = {"config": NOISE_DEFAULT if kept else NOISE_BEST, "time_ms": default if kept else best,
                  "spread": default_sp if kept else best_sp, "retimed": True, "trials": 4,
                  "default_kept": {"config": NOISE_BEST, "time_ms": best, "spread": best_sp} if kept else None,
                  "candidates": [{"config": NOISE_BEST, "time_ms": best, "spread": best_sp},
                                 {"config": NOISE_DEFAULT, "time_ms": default, "spread": default_sp}]}
        _study(url, f"merge:{GPU_SLUG}:{shape_key(shape)}", "merge", shape, "tpe",
               optuna.samplers.RandomSampler(seed=0), len(grid), space, timer, lambda c: ("ok", ""),
               NOISE_DEFAULT, enqueue=grid, winner=winner)
    return url


def make_library(path: Path) -> Path:
    lib = {"schema": "momtune.library/1", "provenance": {**PROV_NEW, "floor_peak": PEAKS},
           "templates": {"recurrence": {"source_hash": "0123abcd", "default_config": DEFAULT, "entries": [
               {"shape": SHAPE_A, "dtype": "bfloat16", "config": {"BT": 32, "BV": 64, "num_warps": 4},
                "time_ms": 0.040, "default_time_ms": 0.100, "max_abs_err": 1e-3, "max_rel_err": 2e-3,
                "trials": 67, "study": f"tpe/recurrence:{GPU_SLUG}:{shape_key(SHAPE_A)}"},
               {"shape": SHAPE_B, "dtype": "bfloat16", "config": {"BT": 64, "BV": 64, "num_warps": 4},
                "time_ms": 0.080, "default_time_ms": 0.104, "max_abs_err": 1e-3, "max_rel_err": 2e-3,
                "trials": 12, "study": f"tpe/recurrence:{GPU_SLUG}:{shape_key(SHAPE_B)}"}]}}}
    path.write_text(json.dumps(lib, indent=1))
    return path


def make_bench(path: Path, fla: bool = True, library: str | None | bool = False,
               prov: dict[str, Any] | None = None) -> Path:
    """The bench file; ``library`` is its provenance momtune_library (False: not recorded, as
    older files), ``prov`` its provenance (default: an older file's, no python or fla)."""
    def t(ms: float, lo: float, hi: float) -> dict[str, float]:  # median and min-max of the timed calls
        return {"ms": ms, "ms_min": lo, "ms_max": hi}

    rows: list[dict[str, Any]] = [
        {"kind": "kernel", "name": "recurrence", "shape": SHAPE_A, "dtype": "bfloat16", "impl": "reference",
         **t(2.0, 1.95, 2.1), "floor_ms": 0.020},
        {"kind": "model_decode", "name": "mom-340m", "shape": {"B": 1}, "dtype": "bfloat16", "impl": "momtune",
         **t(5.0, 4.9, 5.1), "tokens_per_s": 200.0, "peak_mem_mb": 1500.0},
        {"kind": "model_decode", "name": "mom-340m", "shape": {"B": 1}, "dtype": "bfloat16", "impl": "reference",
         **t(50.0, 49.0, 52.0)},
        {"kind": "layer_prefill", "name": "mom-340m", "shape": {"B": 1, "T": 4096}, "dtype": "bfloat16",
         "impl": "momtune", **t(1.2, 1.18, 1.23), "tokens_per_s": 3.4e6},
        {"kind": "layer_prefill", "name": "mom-340m", "shape": {"B": 1, "T": 4096}, "dtype": "bfloat16",
         "impl": "momtune-default", **t(1.5, 1.45, 1.56)},
        {"kind": "layer_prefill", "name": "mom-340m", "shape": {"B": 4, "T": 1024}, "dtype": "bfloat16",
         "impl": "momtune", **t(2.0, 1.96, 2.04), "tokens_per_s": 2.0e6},
        {"kind": "layer_decode", "name": "mom-340m", "shape": {"B": 8}, "dtype": "bfloat16", "impl": "momtune",
         **t(0.5, 0.49, 0.52), "graph_ms": 0.2, "tokens_per_s": 16000.0},
        {"kind": "layer_decode", "name": "mom-340m", "shape": {"B": 8}, "dtype": "bfloat16", "impl": "reference",
         "note": "failed: CUDA out of memory"},
    ]
    if fla:
        rows += [
            {"kind": "kernel", "name": "recurrence", "shape": SHAPE_A, "dtype": "bfloat16", "impl": "fla",
             **t(0.060, 0.059, 0.062)},
            {"kind": "kernel", "name": "recurrence", "shape": SHAPE_B, "dtype": "bfloat16", "impl": "fla", "ms": None,
             "note": "fla chunk kernel refuses this shape"},
            {"kind": "model_decode", "name": "mom-340m", "shape": {"B": 1}, "dtype": "bfloat16", "impl": "fla",
             **t(7.5, 7.3, 7.8)},
            {"kind": "layer_prefill", "name": "mom-340m", "shape": {"B": 1, "T": 4096}, "dtype": "bfloat16",
             "impl": "fla", **t(1.0, 0.98, 1.03)},
            # 1.03x: within the two rows' noise (±4%)
            {"kind": "layer_prefill", "name": "mom-340m", "shape": {"B": 4, "T": 1024}, "dtype": "bfloat16",
             "impl": "fla", **t(2.06, 2.01, 2.10)},
            {"kind": "layer_decode", "name": "mom-340m", "shape": {"B": 8}, "dtype": "bfloat16", "impl": "fla",
             **t(0.3, 0.29, 0.31)},
        ]
    provenance = dict(prov or PROV)
    if library is not False:
        provenance["momtune_library"] = library
    path.write_text(json.dumps({"schema": "momtune.bench/1", "provenance": provenance, "rows": rows}, indent=1))
    return path


@dataclass
class Stored:
    storage: str
    library: Path
    bench: Path
    root: Path


@pytest.fixture(scope="session")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Stored:
    root = tmp_path_factory.mktemp("stored")
    return Stored(make_storage(root / "studies.db"), make_library(root / "library.json"),
                  make_bench(root / "bench.json"), root)
