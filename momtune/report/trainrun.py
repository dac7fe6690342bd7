"""Read the JSON of a real training run (``bench/gpu_train_run.py --out FILE``) into plain data.

The file records a small MoM LM trained on associative recall three times from the same weights
and batches: on momtune's kernels, on the PyTorch reference, and on the reference from weights
nudged by one float32 rounding (how far two curves drift apart by rounding alone). The report
shows its numbers as recorded; nothing is re-run. Every problem raises :class:`ReportError`
naming the file and what is wrong.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from momtune.errors import ReportError

from .collect import _read_json, num_or_none

WHAT = "train-run file"
# the run names bench/gpu_train_run.py writes, and how the report calls them
MOMTUNE, REFERENCE, NUDGED = "momtune", "reference", "reference, nudged init"
RUN_LABELS = {MOMTUNE: "momtune kernels", REFERENCE: "PyTorch reference",
              NUDGED: "PyTorch reference (nudged init)"}
HOW = "`python3 bench/gpu_train_run.py --steps 300 --out train-run.json --plot train-run.png` on a GPU"


@dataclass
class Run:
    name: str
    loss: list[float]
    step_ms: list[float]
    accuracy: float | None
    median_step_ms: float | None
    peak_mem_mb: float | None

    @property
    def label(self) -> str:
        return RUN_LABELS.get(self.name, self.name)

    @property
    def final_loss(self) -> float:
        return self.loss[-1]


@dataclass
class TrainRun:
    path: Path
    data: dict[str, Any]  # the file as read (the plot draws from it, as bench/gpu_train_run.py does)
    runs: list[Run]
    provenance: dict[str, Any]  # the file's `provenance`, else what it records: {"gpu": device}
    args: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return str(self.data.get("device") or "not recorded")

    @property
    def dtype(self) -> str:
        return str(self.data.get("dtype") or "not recorded")

    def run(self, name: str) -> Run | None:
        return next((r for r in self.runs if r.name == name), None)

    def num(self, key: str) -> float | None:
        return num_or_none(self.data.get(key))

    def arg(self, key: str) -> int | float | str | None:
        """A command-line argument as recorded (strings), as a number where it reads as one."""
        v = self.args.get(key)
        if v is None or v == "None":
            return None
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                pass
        return v

    @property
    def agree_checked(self) -> bool | None:
        """Whether the recorded per-step gaps all lie within the recorded bounds (None: not recorded)."""
        gap, bound = self.data.get("gap"), self.data.get("bound")
        if not _numbers(gap) or not _numbers(bound) or len(gap) != len(bound):
            return None
        return all(g <= b for g, b in zip(gap, bound))

    @property
    def largest_gap(self) -> tuple[int, float, float] | None:
        """(step, gap, bound) where momtune's curve is furthest from the reference's."""
        gap, bound = self.data.get("gap"), self.data.get("bound")
        if not _numbers(gap) or not _numbers(bound) or len(gap) != len(bound) or not gap:
            return None
        i = max(range(len(gap)), key=lambda i: gap[i])
        return i, float(gap[i]), float(bound[i])

    @property
    def tightest(self) -> tuple[int, float, float] | None:
        """(step, gap, bound) where the gap comes nearest its bound (or passes it furthest)."""
        gap, bound = self.data.get("gap"), self.data.get("bound")
        if not _numbers(gap) or not _numbers(bound) or len(gap) != len(bound) or not gap:
            return None
        i = max(range(len(gap)), key=lambda i: gap[i] - bound[i])
        return i, float(gap[i]), float(bound[i])


def _numbers(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def load_train_run(path: str | Path) -> TrainRun:
    p = Path(path)
    data = _read_json(p, WHAT)
    where = f"{WHAT} {p}"
    if "schema" in data and "rows" in data:
        raise ReportError(f"{where}: this is a bench file (schema {data.get('schema')!r}); pass it with --bench, "
                          "and with --train-run the JSON of bench/gpu_train_run.py --out")
    runs_in = data.get("runs")
    if not isinstance(runs_in, dict) or not runs_in:
        raise ReportError(f"{where}: no `runs` object of named runs; expected the JSON that "
                          "bench/gpu_train_run.py --out writes")
    runs: list[Run] = []
    for name, r in runs_in.items():
        at = f"{where}: runs[{name!r}]"
        if not isinstance(r, dict):
            raise ReportError(f"{at}: expected an object, got {type(r).__name__}")
        loss = r.get("loss")
        if not _numbers(loss) or not loss:
            raise ReportError(f"{at}: `loss` must be a non-empty list of numbers (one a step)")
        step_ms = r.get("step_ms", [])
        if not _numbers(step_ms):
            raise ReportError(f"{at}: `step_ms` must be a list of numbers (one a step)")
        for key in ("accuracy", "median_step_ms", "peak_mem_mb"):
            v = r.get(key)
            if v is not None and num_or_none(v) is None and not (isinstance(v, float) and math.isnan(v)):
                raise ReportError(f"{at}: `{key}` must be a number or null, got {v!r}")
        runs.append(Run(str(name), [float(x) for x in loss], [float(x) for x in step_ms],
                        num_or_none(r.get("accuracy")), num_or_none(r.get("median_step_ms")),
                        num_or_none(r.get("peak_mem_mb"))))
    for key in ("gap", "bound", "drift"):
        if key in data and not _numbers(data[key]):
            raise ReportError(f"{where}: `{key}` must be a list of numbers (one a step)")
    args = data.get("args", {})
    if not isinstance(args, dict):
        raise ReportError(f"{where}: `args` must be an object (the command line's arguments)")
    prov = data.get("provenance")
    if prov is not None and not isinstance(prov, dict):
        raise ReportError(f"{where}: `provenance` must be an object")
    provenance = dict(prov) if prov else {}
    if data.get("device"):
        provenance.setdefault("gpu", str(data["device"]))
    return TrainRun(p, data, runs, provenance, {str(k): str(v) for k, v in args.items()})
