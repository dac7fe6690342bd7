"""Read Optuna studies (written by `momtune search`) into plain data, with parameter importances."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from momtune.errors import ReportError
from momtune.study import is_done, safe_url, scrub

from .collect import MIN_IMPORTANCE_TRIALS, Importance, Study, Trial, norm_dtype, num_or_none

_SHAPE_PART = re.compile(r"^([A-Za-z_]+)(\d+)$")
def parse_study_name(name: str) -> tuple[str, str, str, str]:
    """``[prefix/]template:gpu_slug:shape_key`` -> (prefix, template, gpu_slug, shape_key)."""
    prefix, _, rest = name.rpartition("/")
    parts = rest.split(":")
    if len(parts) != 3:
        return prefix, "", "", ""
    return prefix, parts[0], parts[1], parts[2]


def parse_shape_key(shape_key: str) -> tuple[dict[str, int], str]:
    """``N4096-S8-H4-bfloat16`` -> ({"N": 4096, "S": 8, "H": 4}, "bfloat16")."""
    parts = shape_key.split("-")
    shape: dict[str, int] = {}
    for part in parts[:-1]:
        m = _SHAPE_PART.match(part)
        if m:
            shape[m.group(1)] = int(m.group(2))
    return shape, parts[-1] if parts else ""


def load_studies(url: str, importance: bool = True) -> tuple[list[Study], list[str]]:
    """All momtune studies in an Optuna storage, and warnings about studies that were skipped."""
    import optuna

    try:
        from momtune.study import open_storage

        storage = open_storage(url, read_only=True)
        summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
    except Exception as exc:  # noqa: BLE001 - any storage failure is a bad --storage argument
        raise ReportError(f"--storage {safe_url(url)}: cannot read Optuna studies "
                          f"({type(exc).__name__}: {scrub(str(exc), url)})") from None
    studies: list[Study] = []
    warnings: list[str] = []
    for summary in sorted(summaries, key=lambda s: s.study_name):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        parsed = _study_from_optuna(study)
        if parsed is None:
            warnings.append(f"study {summary.study_name!r} skipped: not a momtune study (no template/shape)")
            continue
        if importance:
            parsed.importance = param_importance(study, parsed)
        studies.append(parsed)
    return studies, warnings


def _study_from_optuna(study: Any) -> Study | None:
    attrs = dict(study.user_attrs)
    prefix, name_template, name_gpu, shape_key = parse_study_name(study.study_name)
    template = str(attrs.get("template") or name_template)
    shape = attrs.get("shape")
    dtype = attrs.get("dtype")
    if not isinstance(shape, dict) or not dtype:
        parsed_shape, parsed_dtype = parse_shape_key(str(attrs.get("shape_key") or shape_key))
        shape = shape if isinstance(shape, dict) else parsed_shape
        dtype = dtype or parsed_dtype
    if not template or not shape:
        return None
    trials = [_trial(t) for t in study.get_trials(deepcopy=False)]
    winner = attrs.get("winner") if isinstance(attrs.get("winner"), dict) else None
    return Study(
        name=study.study_name,
        template=template,
        shape={str(k): int(v) for k, v in shape.items()},
        dtype=norm_dtype(str(dtype)),
        gpu=str(attrs.get("gpu") or name_gpu or "unknown"),
        interpreter=bool(attrs.get("interpreter", False)),
        sampler=str(attrs.get("sampler") or prefix or "unknown").lower(),
        space_size=int(attrs["space_size"]) if num_or_none(attrs.get("space_size")) is not None else None,
        provenance=dict(attrs.get("provenance") or {}),
        default_config=dict(attrs.get("default_config") or {}),
        default_time_ms=num_or_none(attrs.get("default_time_ms")),
        floor_ms=num_or_none(attrs.get("floor_ms")),
        winner=winner,
        trials=trials,
        floor_peak=dict(attrs["floor_peak"]) if isinstance(attrs.get("floor_peak"), dict) else None,
        timing_mode=str(attrs.get("timing_mode") or ""),
    )


def _trial(t: Any) -> Trial:
    attrs = t.user_attrs
    state = t.state.name
    # FAIL without a result (no status, or an "ok" its process died before telling): a trial lost
    # with its process (Optuna's heartbeat check), not an outcome (momtune.study.is_done)
    default_status = {"COMPLETE": "ok", "FAIL": "lost", "PRUNED": "invalid_config"}.get(state, state.lower())
    status = str(attrs.get("status") or default_status)
    if state == "FAIL" and not is_done(t):
        # not benchmarked because the study's --timeout came first (momtune.search), else lost
        status = "not_run" if str(attrs.get("reason", "")).startswith("not run:") else "lost"
    time_ms = num_or_none(attrs.get("time_ms"))
    if time_ms is None and state == "COMPLETE" and t.values:
        time_ms = num_or_none(t.values[0])
    config = attrs.get("config")
    return Trial(number=t.number, state=state, status=status,
                 config=dict(config) if isinstance(config, dict) else dict(t.params),
                 time_ms=time_ms if state == "COMPLETE" else None,
                 reason=str(attrs.get("reason") or "").splitlines()[0] if attrs.get("reason") else "",
                 spread=num_or_none(attrs.get("spread")))


def param_importance(study: Any, parsed: Study) -> Importance:
    """fANOVA importances (optuna); without scikit-learn, the share of log-time variance each
    parameter's groups explain (eta squared). Too few trials or parameters: a note instead."""
    ok = parsed.ok_trials
    if len(ok) < MIN_IMPORTANCE_TRIALS:
        return Importance({}, "", f"not enough trials ({len(ok)} complete, need {MIN_IMPORTANCE_TRIALS})")
    varying = [p for p in sorted({k for t in ok for k in t.config})
               if len({json.dumps(t.config.get(p), default=str) for t in ok}) > 1]
    if len(varying) < 2:
        return Importance({}, "", "only one varying parameter" + (f" ({varying[0]})" if varying else "s: none"))
    try:
        import optuna

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        return Importance({k: float(v) for k, v in values.items()}, "fANOVA")
    except ImportError:
        method = "variance share (η² of log time; fANOVA needs scikit-learn)"
    except Exception as exc:  # noqa: BLE001 - a failing estimator must not sink the report
        method = f"variance share (η² of log time; fANOVA failed: {type(exc).__name__})"
    return Importance(eta_squared([(t.config, t.time_ms or 0.0) for t in ok], varying), method)


def eta_squared(points: Sequence[tuple[Mapping[str, Any], float]], params: Iterable[str]) -> dict[str, float]:
    """Per parameter, the share of the variance of log(time) explained by its value groups,
    normalised to sum to 1 (largest first)."""
    ys = [math.log(max(t, 1e-12)) for _, t in points]
    mean = sum(ys) / len(ys)
    total = sum((y - mean) ** 2 for y in ys)
    raw: dict[str, float] = {}
    for p in params:
        groups: dict[str, list[float]] = {}
        for (cfg, _), y in zip(points, ys):
            groups.setdefault(json.dumps(cfg.get(p), default=str), []).append(y)
        between = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups.values())
        raw[p] = between / total if total > 0 else 0.0
    s = sum(raw.values())
    norm = {k: (v / s if s > 0 else 0.0) for k, v in raw.items()}
    return dict(sorted(norm.items(), key=lambda kv: -kv[1]))
