"""The report's figures (matplotlib, Agg, PNG). Each function writes one PNG and returns nothing;
matplotlib is imported inside the functions so importing this module costs nothing."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .collect import Study
from .fmt import num

IMPL_COLORS = {"momtune": "#2563eb", "momtune-default": "#93c5fd", "fla": "#f97316", "reference": "#6b7280"}
SAMPLER_COLORS = {"tpe": "#2563eb", "random": "#c026d3", "cmaes": "#059669", "gp": "#0891b2",
                  "grid": "#92400e", "qmc": "#ca8a04", "exhaustive": "#111827"}
_EXTRA = ("#0d9488", "#dc2626", "#7c3aed", "#65a30d", "#db2777", "#0369a1")
DPI = 120
STYLE = {
    "font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "axes.edgecolor": "#9ca3af", "axes.titleweight": "bold",
    "figure.facecolor": "white", "savefig.facecolor": "white", "font.family": "DejaVu Sans",
}


def time_unit(values_ms: Sequence[float | None]) -> tuple[str, float]:
    """A unit for a set of times in ms: (name, factor to multiply ms by), chosen by the median."""
    vals = sorted(v for v in values_ms if v is not None and v > 0 and math.isfinite(v))
    if not vals:
        return "ms", 1.0
    mid = vals[len(vals) // 2]
    if mid < 1.0:
        return "µs", 1e3
    if mid >= 1e3:
        return "s", 1e-3
    return "ms", 1.0


def sampler_color(name: str, index: int) -> str:
    return SAMPLER_COLORS.get(name, _EXTRA[index % len(_EXTRA)])


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", dpi=DPI)


def convergence(path: Path, title: str, panels: Sequence[tuple[str, Sequence[Study]]]) -> None:
    """One panel per shape: best-so-far time against trial number, a line per sampler, the
    exhaustive optimum (dashed) and the default config (dotted) as horizontal lines."""
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    with matplotlib.rc_context(STYLE):
        n = len(panels)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig = _figure(max(7.0, 4.3 * cols), 2.9 * rows + 0.6)
        axes = fig.subplots(rows, cols, squeeze=False)
        all_times = [t.time_ms for _, ss in panels for s in ss for t in s.ok_trials]
        unit, f = time_unit(all_times)
        handles: dict[str, Any] = {}
        for i, (label, studies) in enumerate(panels):
            ax = axes[i // cols][i % cols]
            searched = [s for s in studies if not s.exhaustive] or list(studies)
            dup = len({s.sampler for s in searched}) < len(searched)
            for j, s in enumerate(sorted(searched, key=lambda s: s.label)):
                xs, ys, best = [], [], math.inf
                for t in sorted(s.trials, key=lambda t: t.number):
                    if t.time_ms is not None and t.state == "COMPLETE":
                        best = min(best, t.time_ms)
                    xs.append(t.number + 1)
                    ys.append(best * f if math.isfinite(best) else math.nan)
                color = _EXTRA[j % len(_EXTRA)] if dup else sampler_color(s.sampler, j)
                (line,) = ax.step(xs, ys, where="post", lw=1.8, color=color, label=f"{s.label} (best so far)")
                handles.setdefault(line.get_label(), line)
            for s in studies:
                if s.exhaustive and s.best_ms is not None:
                    h = ax.axhline(s.best_ms * f, color=SAMPLER_COLORS["exhaustive"], ls="--", lw=1.2,
                                   label="exhaustive optimum")
                    handles.setdefault(h.get_label(), h)
            defaults = sorted(s.default_time_ms for s in studies if s.default_time_ms is not None)
            if defaults:  # each study re-times the default; their median
                h = ax.axhline(defaults[len(defaults) // 2] * f, color="#9ca3af", ls=":", lw=1.4, label="default config")
                handles.setdefault(h.get_label(), h)
            ax.set_title(label, fontsize=8.5)
            ax.set_xlabel("trial number")
            ax.set_ylabel(f"best time so far ({unit})")
            ax.set_xlim(left=0.5)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for k in range(n, rows * cols):
            axes[k // cols][k % cols].set_visible(False)
        fig.suptitle(title, fontsize=11, fontweight="bold")
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(4, len(handles)), frameon=False)
        _save(fig, path)


def importance(path: Path, title: str, per_study: Sequence[tuple[str, Mapping[str, float]]]) -> None:
    """Horizontal bars: mean importance per parameter over the studies; dots: single studies."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        params = sorted({p for _, v in per_study for p in v})
        means = {p: sum(v.get(p, 0.0) for _, v in per_study) / len(per_study) for p in params}
        order = sorted(params, key=lambda p: means[p])
        fig = _figure(7.5, 1.2 + 0.38 * len(order))
        ax = fig.subplots()
        ys = range(len(order))
        ax.barh(list(ys), [means[p] for p in order], color=IMPL_COLORS["momtune"], alpha=0.85, height=0.6,
                label=f"mean over {len(per_study)} stud{'y' if len(per_study) == 1 else 'ies'}")
        if len(per_study) > 1:
            for _, vals in per_study:
                ax.scatter([vals.get(p, 0.0) for p in order], list(ys), s=14, color="#111827", zorder=3,
                           alpha=0.7, label="one study")
        for y, p in zip(ys, order):
            ax.text(means[p] + 0.01, y, f"{means[p]:.2f}", va="center", fontsize=8)
        ax.set_yticks(list(ys), order)
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("importance (share of explained variance, sums to 1)")
        ax.grid(axis="y", visible=False)
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        fig.legend(list(uniq.values()), list(uniq), loc="outside lower center", ncols=2, frameon=False)
        ax.set_title(title)
        _save(fig, path)


def grouped_bars(path: Path, title: str, labels: Sequence[str], series: Mapping[str, Sequence[float | None]],
                 names: Mapping[str, str], xlabel: str = "time") -> None:
    """Horizontal grouped bars, one group per label and one bar per implementation (consistent
    colors); log scale when the times span more than 20x. Missing bars are simply absent."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        impls = [i for i in series if any(v is not None for v in series[i])]
        vals = [v for i in impls for v in series[i] if v is not None]
        unit, f = time_unit(vals)
        k = max(1, len(impls))
        group = 0.8
        bar = group / k
        fig = _figure(8.5, 1.3 + len(labels) * (0.22 * k + 0.25))
        ax = fig.subplots()
        for j, impl in enumerate(impls):
            ys = [g - group / 2 + bar * (j + 0.5) for g in range(len(labels))]
            xs = [(v * f if v is not None else 0.0) for v in series[impl]]
            ax.barh(ys, xs, height=bar * 0.92, color=IMPL_COLORS.get(impl, _EXTRA[j % len(_EXTRA)]),
                    label=names.get(impl, impl))
            for y, v in zip(ys, series[impl]):
                if v is not None:
                    ax.text(v * f * 1.02, y, f" {num(v * f)}", va="center", fontsize=7, color="#374151")
        ax.set_yticks(list(range(len(labels))), list(labels))
        ax.invert_yaxis()
        if vals and max(vals) / max(min(vals), 1e-12) > 20:
            ax.set_xscale("log")
            ax.set_xlim(min(vals) * f / 1.5, max(vals) * f * 2.5)
        elif vals:
            ax.set_xlim(0, max(vals) * f * 1.15)
        ax.set_xlabel(f"{xlabel} ({unit}, lower is better)")
        ax.grid(axis="y", visible=False)
        fig.legend(loc="outside lower center", ncols=max(1, len(impls)), frameon=False)
        ax.set_title(title)
        _save(fig, path)


def roofline(path: Path, title: str, points: Sequence[Any], peaks: Sequence[Mapping[str, Any]],
             peak_labels: Sequence[str]) -> None:
    """Log-log roofline: arithmetic intensity (FLOP/byte) on x, achieved FLOP/s on y; each peak
    set draws its two roofs (bandwidth slope, compute ceiling); a point per shape and
    implementation (tuned: filled, default: open), a thin line joining a shape's two points."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = _figure(8.0, 4.8)
        ax = fig.subplots()
        xs = [p.intensity for p in points]
        ys = [p.flops_per_s for p in points]
        ridges = [float(p["flops_per_s"]) / float(p["bytes_per_s"]) for p in peaks]
        lo_x = min(xs + [r / 8 for r in ridges]) / 4
        hi_x = max(xs + [r * 8 for r in ridges]) * 4
        for i, (peak, label, ridge) in enumerate(zip(peaks, peak_labels, ridges)):
            f, b = float(peak["flops_per_s"]), float(peak["bytes_per_s"])
            color = "#111827" if i == 0 else _EXTRA[i % len(_EXTRA)]
            style = "-" if peak.get("measured") else "--"
            rx = [lo_x, ridge, hi_x]
            ax.plot(rx, [min(f, b * x) for x in rx], color=color, lw=1.6, ls=style, label=f"roofs: {label}")
            at = math.sqrt(lo_x * ridge)  # halfway up the slope (log scale)
            ax.annotate(f"{num(b / 1e12)} TB/s", (at, b * at), xytext=(-6, 6), textcoords="offset points",
                        fontsize=7.5, color=color, ha="right")
            ax.annotate(f"{num(f / 1e12)} TFLOP/s", (ridge, f), xytext=(4, 4), textcoords="offset points",
                        fontsize=7.5, color=color)
        shapes = list(dict.fromkeys(p.shape for p in points))
        for j, shape in enumerate(shapes):
            color = _EXTRA[j % len(_EXTRA)] if len(shapes) > 1 else IMPL_COLORS["momtune"]
            mine = [p for p in points if p.shape == shape]
            if len(mine) > 1:
                ax.plot([p.intensity for p in mine], [p.flops_per_s for p in mine], color=color, lw=0.8, alpha=0.6)
            for p in sorted(mine, key=lambda p: p.impl == "tuned"):  # the default's ring under the tuned dot
                tuned = p.impl == "tuned"
                ax.scatter([p.intensity], [p.flops_per_s], s=26 if tuned else 80, zorder=4 if tuned else 3,
                           facecolors=color if tuned else "white", edgecolors=color, linewidths=1.6,
                           label=f"{shape} · {p.impl}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo_x, hi_x)
        tops = [float(p["flops_per_s"]) for p in peaks] + ys
        bottoms = ys + [float(p["bytes_per_s"]) * lo_x for p in peaks]
        if tops and bottoms:
            ax.set_ylim(min(bottoms) / 3, max(tops) * 3)
        ax.set_xlabel("arithmetic intensity (FLOP / byte, from the template's cost model)")
        ax.set_ylabel("achieved FLOP/s")
        ax.set_title(title)
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        fig.legend(list(uniq.values()), list(uniq), loc="outside right center", frameon=False, fontsize=7.5)
        _save(fig, path)


def _g(v: Any) -> str:
    """A recorded number (bench/gpu_train_run.py writes its arguments as strings) without a trailing .0."""
    try:
        return f"{float(v):g}"
    except (TypeError, ValueError):
        return str(v)


RUN_COLORS = {"momtune": IMPL_COLORS["momtune"], "reference": IMPL_COLORS["reference"],
              "reference, nudged init": "#f97316"}


def loss_curves(path: Path, result: Mapping[str, Any], title: str | None = None) -> None:
    """A training run as bench/gpu_train_run.py records it (its JSON, read as is): the loss of
    every run against the step (log scale) with the chance loss; below, where recorded, the
    distance between momtune's curve and the reference's, the nudged reference's drift from the
    reference and the bound the first must stay under (factor x the drift), log scale."""
    import matplotlib

    from .trainrun import RUN_LABELS

    runs: Mapping[str, Mapping[str, Any]] = result["runs"]
    gap, bound, drift = result.get("gap"), result.get("bound"), result.get("drift")
    below = isinstance(gap, list) and isinstance(bound, list) and bool(gap)
    with matplotlib.rc_context(STYLE):
        fig = _figure(7.5, 6.2 if below else 4.0)
        axes = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2)) if below else [fig.subplots()]
        ax = axes[0]
        for j, (name, run) in enumerate(runs.items()):
            facts = []
            if isinstance(run.get("accuracy"), (int, float)):
                facts.append(f"recall {run['accuracy']:.1%}")
            if isinstance(run.get("median_step_ms"), (int, float)):
                facts.append(f"{num(run['median_step_ms'])} ms/step")
            label = RUN_LABELS.get(name, name) + (f" ({', '.join(facts)})" if facts else "")
            ax.plot(range(len(run["loss"])), run["loss"], lw=1.4 if j == 0 else 1.0, label=label,
                    color=RUN_COLORS.get(name, _EXTRA[j % len(_EXTRA)]), ls="--" if "nudged" in name else "-")
        if isinstance(result.get("chance_loss"), (int, float)):
            ax.axhline(result["chance_loss"], color="#9ca3af", ls=":", lw=1.2, label="chance (ln values)")
        ax.set_yscale("log")
        ax.set_ylabel("loss on the recalled values")
        ax.legend(loc="lower left", frameon=False)
        ax.set_title(title or f"MoM LM learning associative recall — {result.get('device', '?')}, "
                              f"{result.get('dtype', '?')}")
        if below:
            low = axes[1]
            args = result.get("args") or {}
            steps = range(len(gap))
            low.plot(steps, gap, color=RUN_COLORS["momtune"], lw=1.2, label="|momtune − reference|")
            if isinstance(drift, list) and drift:
                low.plot(range(len(drift)), drift, color=RUN_COLORS["reference, nudged init"], lw=1.0, ls="--",
                         label="|nudged reference − reference| (drift)")
            low.plot(range(len(bound)), bound, color="#111827", lw=1.0, ls=":",
                     label=f"bound: {_g(args.get('factor', '?'))} × drift")
            low.set_yscale("log")
            low.set_ylabel(f"loss difference\n(max over {args.get('window', '?')} steps)")
            low.legend(loc="lower right", frameon=False, fontsize=7)
        axes[-1].set_xlabel("training step")
        _save(fig, path)
