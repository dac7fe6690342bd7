"""Progress of a search: a live line per study (trials done, best so far, failures by kind) and
a final summary table. ``Reporter`` is the silent base class (tests); ``RichReporter`` prints."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def fmt_ms(ms: float | None) -> str:
    if ms is None or ms != ms or ms == float("inf"):
        return "-"
    return f"{ms:.4g} ms"


def fmt_config(config: Mapping[str, Any] | None) -> str:
    return "-" if not config else " ".join(f"{k}={v}" for k, v in config.items())


def fmt_clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"


class Reporter:
    """Receives search events; the base class ignores them."""

    def plan(self, studies: int) -> None:
        """How many studies this search runs (called once, before the first)."""

    def note(self, message: str) -> None:
        pass

    def study_started(self, name: str, target: int, space_size: int, interpreter: bool, done: int,
                      timeout_s: float | None = None) -> None:
        pass

    def trial_done(self, name: str, number: int, config: Mapping[str, Any], status: str, time_ms: float | None,
                   reason: str, cached: bool, done: int, target: int, best_ms: float | None,
                   failures: Mapping[str, int]) -> None:
        pass

    def study_finished(self, result: Any) -> None:
        pass

    def summary(self, results: Sequence[Any]) -> None:
        pass

    def close(self) -> None:
        pass


class RichReporter(Reporter):
    """On a terminal: per study a progress bar (study k of n, trials done of the target, elapsed,
    ETA, best so far) with failures printed above it; in a log (not a terminal) or with
    ``verbosity`` 1: one line per trial with the same numbers; ``verbosity`` -1: only each study's
    winner and the summary. ``stderr``: everything goes to stderr (stdout carries --json)."""

    def __init__(self, verbosity: int = 0, stderr: bool = False) -> None:
        from rich.console import Console

        self.console = Console(stderr=stderr)
        if not self.console.is_terminal:  # logs: long lines, no wrapping at 80 columns
            self.console = Console(width=200, stderr=stderr)
        self.verbosity = verbosity
        self._live: Any = None
        self._task: Any = None
        self.studies = 0
        self.k = 0
        self._start = 0.0
        self._done0 = self._last_done = 0
        self._first: float | None = None
        self._timeout: float | None = None

    def plan(self, studies: int) -> None:
        self.studies = studies

    def note(self, message: str) -> None:
        if self.verbosity >= 0 or "error" in message or "warning" in message:
            self.console.print(message)

    def _eta(self, done: int, target: int) -> float | None:
        """Seconds left: the rate of this run's trials, capped by the study's timeout."""
        import time

        elapsed = time.monotonic() - self._start
        ran = done - self._done0
        eta = (target - done) * elapsed / ran if ran > 0 else None
        if self._timeout is not None:
            left = max(0.0, self._timeout - elapsed)
            eta = left if eta is None else min(eta, left)
        return eta

    def study_started(self, name: str, target: int, space_size: int, interpreter: bool, done: int,
                      timeout_s: float | None = None) -> None:
        import time

        self.close()
        self.k += 1
        self._start, self._done0, self._timeout = time.monotonic(), done, timeout_s
        self._first = None  # seconds to the first trial result of this run
        self._last_done = done
        of = f"study {self.k} of {self.studies}: " if self.studies else ""
        if self.verbosity >= 0:
            where = "[yellow]interpreter timings (TRITON_INTERPRET=1, no GPU): not GPU performance[/]" if interpreter \
                else "GPU timings: triton do_bench median, L2 flushed before each run"
            limit = f", at most {timeout_s:g} s" if timeout_s else ""
            self.console.print(f"{of}[bold]{name}[/]: {target} trials{limit}, {space_size} valid configs, "
                               f"{done} done already; {where}")
        if self.console.is_terminal and self.verbosity == 0:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._live = Progress(TextColumn(f"  {of.split(':')[0] or 'trials'}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                                  TextColumn("eta {task.fields[eta]} | best {task.fields[best]}"),
                                  console=self.console, transient=True)
            self._task = self._live.add_task("", total=target, completed=done, eta=fmt_clock(None), best="-")
            self._live.start()

    def trial_done(self, name: str, number: int, config: Mapping[str, Any], status: str, time_ms: float | None,
                   reason: str, cached: bool, done: int, target: int, best_ms: float | None,
                   failures: Mapping[str, int]) -> None:
        import time

        if self._first is None and not cached:
            self._first = time.monotonic() - self._start
        self._last_done = done
        fails = ", ".join(f"{k} {v}" for k, v in sorted(failures.items()) if k != "ok") or "none"
        what = fmt_ms(time_ms) if status == "ok" else f"{status}: {reason[:100]}"
        eta = fmt_clock(self._eta(done, target))
        clock = f"{fmt_clock(time.monotonic() - self._start)} eta {eta}"
        line = (f"  trial {number:>3} [{done}/{target} {clock}] {fmt_config(config)} -> {what}"
                f"{' (cached)' if cached else ''} | best {fmt_ms(best_ms)} | failures: {fails}")
        if self._live is not None:
            self._live.update(self._task, completed=done, eta=eta, best=fmt_ms(best_ms))
            if status != "ok":
                self._live.console.print(line, markup=False, highlight=False)
        elif self.verbosity >= 0:
            self.console.print(line, markup=False, highlight=False)

    def study_finished(self, result: Any) -> None:
        import time

        self.close()
        if self.verbosity >= 0 and self._start:
            wall = time.monotonic() - self._start
            n = self._last_done - self._done0
            first = "no result" if self._first is None else f"first result after {self._first:.1f} s"
            self.console.print(f"  {n} trials this run in {wall:.0f} s ({60 * n / max(wall, 1e-9):.1f} per minute), "
                               f"{first}", markup=False, highlight=False)
            phases = getattr(result, "phases_ms", None)
            if phases:  # where the benchmark worker's time went: what limits the configs per minute
                parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e3:.2f}" for k, v in phases.items())
                self.console.print(f"  benchmark worker, median s per trial over {result.phase_trials}: {parts} "
                                   f"(sum {sum(phases.values()) / 1e3:.2f})", markup=False, highlight=False)
        if result.winner is None:
            self.console.print(f"  [red]no config passed the check[/] ({result.stopped})")
        else:
            kept = getattr(result, "default_kept", None)
            self.console.print(f"  winner {fmt_config(result.winner)}: {fmt_ms(result.winner_ms)} "
                               f"(default {fmt_ms(result.default_ms)}, floor {fmt_ms(result.floor_ms)}) "
                               f"[stopped: {result.stopped}]", markup=False, highlight=False)
            if kept:
                self.console.print(f"  the default is kept: the best config, {fmt_config(kept['config'])} at "
                                   f"{fmt_ms(kept['time_ms'])}, is not faster beyond noise", markup=False,
                                   highlight=False)

    def summary(self, results: Sequence[Any]) -> None:
        from rich.table import Table

        if not results:
            return
        interp = any(r.interpreter for r in results)
        table = Table(title="momtune search" + (" (interpreter timings, not GPU performance)" if interp else ""))
        for col in ("study", "trials", "ok", "failures", "winner", "time", "default", "speed-up", "floor", "stopped"):
            table.add_column(col)
        for r in results:
            fails = ", ".join(f"{k} {v}" for k, v in sorted(r.by_status.items()) if k != "ok") or "-"
            speed = f"{r.default_ms / r.winner_ms:.2f}x" if r.winner_ms and r.default_ms else "-"
            if getattr(r, "default_kept", None):
                speed += " (default kept)"
            table.add_row(r.study, str(r.trials), str(r.by_status.get("ok", 0)), fails, fmt_config(r.winner),
                          fmt_ms(r.winner_ms), fmt_ms(r.default_ms), speed, fmt_ms(r.floor_ms), r.stopped or "-")
        self.console.print(table)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
