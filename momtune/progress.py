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


class Reporter:
    """Receives search events; the base class ignores them."""

    def note(self, message: str) -> None:
        pass

    def study_started(self, name: str, target: int, space_size: int, interpreter: bool, done: int) -> None:
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
    """Live status line on a terminal (one line per trial otherwise) and a summary table."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console()
        if not self.console.is_terminal:  # logs: long lines, no wrapping at 80 columns
            self.console = Console(width=200)
        self._live: Any = None

    def note(self, message: str) -> None:
        self.console.print(message)

    def study_started(self, name: str, target: int, space_size: int, interpreter: bool, done: int) -> None:
        self.close()
        where = "[yellow]interpreter timings (TRITON_INTERPRET=1, no GPU): not GPU performance[/]" if interpreter \
            else "GPU timings: triton do_bench median, L2 flushed before each run"
        self.console.print(f"[bold]{name}[/]: {target} trials, {space_size} valid configs, {done} done already; {where}")
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live("", console=self.console, refresh_per_second=4, transient=True)
            self._live.start()

    def trial_done(self, name: str, number: int, config: Mapping[str, Any], status: str, time_ms: float | None,
                   reason: str, cached: bool, done: int, target: int, best_ms: float | None,
                   failures: Mapping[str, int]) -> None:
        fails = ", ".join(f"{k} {v}" for k, v in sorted(failures.items()) if k != "ok") or "none"
        what = fmt_ms(time_ms) if status == "ok" else f"{status}: {reason[:100]}"
        line = (f"  trial {number:>3} [{done}/{target}] {fmt_config(config)} -> {what}{' (cached)' if cached else ''}"
                f" | best {fmt_ms(best_ms)} | failures: {fails}")
        if self._live is not None:
            self._live.update(line)
            if status != "ok":
                self.console.print(line, markup=False, highlight=False)
        else:
            self.console.print(line, markup=False, highlight=False)

    def study_finished(self, result: Any) -> None:
        self.close()
        if result.winner is None:
            self.console.print(f"  [red]no config passed the check[/] ({result.stopped})")
        else:
            kept = getattr(result, "default_kept", None)
            self.console.print(f"  winner {fmt_config(result.winner)}: {fmt_ms(result.winner_ms)} "
                               f"(default {fmt_ms(result.default_ms)}, floor {fmt_ms(result.floor_ms)}) "
                               f"[{result.stopped}]", markup=False, highlight=False)
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
        for col in ("study", "trials", "ok", "failures", "winner", "time", "default", "speed-up", "floor"):
            table.add_column(col)
        for r in results:
            fails = ", ".join(f"{k} {v}" for k, v in sorted(r.by_status.items()) if k != "ok") or "-"
            speed = f"{r.default_ms / r.winner_ms:.2f}x" if r.winner_ms and r.default_ms else "-"
            table.add_row(r.study, str(r.trials), str(r.by_status.get("ok", 0)), fails, fmt_config(r.winner),
                          fmt_ms(r.winner_ms), fmt_ms(r.default_ms), speed, fmt_ms(r.floor_ms))
        self.console.print(table)

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
