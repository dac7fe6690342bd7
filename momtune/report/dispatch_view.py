"""The dispatch view of a report: for each studied shape, the config dispatch picks from the
library and its measured time there against the shape's best (and, leaving each tuned shape
out, the config of its nearest tuned neighbour), as plain data."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .collect import Inputs, Library, ShapeId, Study, config_key, nearest, slug
from .fmt import ratio_of as ratio

if TYPE_CHECKING:
    from .analyze import KernelRow


def gpu_for(prov: dict[str, Any], sole: str | None) -> str:
    return slug(prov["gpu"]) if prov.get("gpu") else (sole or "unknown")


@dataclass
class DispatchRow:
    sid: ShapeId
    config: dict[str, Any]
    source: str  # exact / nearest / default / nearest (held out)
    picked_ms: float | None
    best_ms: float | None
    neighbour: ShapeId | None = None
    picked_spread: float | None = None  # of the trial times above
    best_spread: float | None = None

    @property
    def regret(self) -> float | None:
        return ratio(self.picked_ms, self.best_ms)


def measured(studies: list[Study], config: dict[str, Any] | None) -> float | None:
    """Best measured time of one config across a shape's studies (the default time as a last resort)."""
    if config is None:
        return None
    key = config_key(config)
    times = [t.time_ms for s in studies for t in s.ok_trials if t.time_ms is not None and config_key(t.config) == key]
    if times:
        return min(times)
    defaults = [s.default_time_ms for s in studies if s.default_config and config_key(s.default_config) == key
                and s.default_time_ms is not None]
    return min(defaults) if defaults else None


def trial_spread(studies: list[Study], config: dict[str, Any] | None) -> float | None:
    """The spread of ``config``'s fastest trial in a shape's studies (what measured() returns)."""
    if config is None:
        return None
    key = config_key(config)
    trials = [t for s in studies for t in s.ok_trials if config_key(t.config) == key]
    return min(trials, key=lambda t: t.time_ms or 0.0).spread if trials else None


def best_trial(studies: list[Study]) -> tuple[float | None, dict[str, Any] | None]:
    best: tuple[float | None, dict[str, Any] | None] = (None, None)
    for s in studies:
        for t in s.ok_trials:
            if t.time_ms is not None and (best[0] is None or t.time_ms < best[0]):
                best = (t.time_ms, t.config)
    return best


def dispatch_rows(inputs: Inputs, by_sid: dict[ShapeId, list[Study]], kernels: list[KernelRow],
              sole: str | None, factory: Callable[[Library], Any] | None
              ) -> tuple[list[DispatchRow], str, list[DispatchRow]]:
    lib = inputs.library
    rows: list[DispatchRow] = []
    method = ""
    if lib is not None:
        pick, method, errors = _picker(lib, factory)
        lgpu = gpu_for(lib.provenance, sole)
        for sid, studies in sorted(by_sid.items(), key=lambda kv: (kv[0].template, kv[0].shape)):
            if sid.gpu != lgpu:
                continue
            config, source = pick(sid.template, sid.shape_dict, sid.dtype)
            if not config:  # a template the library does not hold: its default config
                config = next((s.default_config for s in studies if s.default_config), {})
            best_ms, best_cfg = best_trial(studies)
            rows.append(DispatchRow(sid, config, source, measured(studies, config), best_ms, None,
                                    trial_spread(studies, config), trial_spread(studies, best_cfg)))
        if errors:
            method += f"; the local rule stood in where it failed ({errors[0]})"
    # held out: each tuned shape gets the config of the nearest other tuned shape
    tuned = [(k.sid, k.tuned_config) for k in kernels if k.tuned_config is not None]
    held: list[DispatchRow] = []
    for sid, _ in tuned:
        if sid not in by_sid:
            continue
        others = [(o.shape_dict, (o, cfg)) for o, cfg in tuned
                  if o != sid and (o.template, o.gpu, o.dtype) == (sid.template, sid.gpu, sid.dtype)]
        hit = nearest(others, sid.shape_dict)
        best_ms, best_cfg = best_trial(by_sid[sid])
        if hit is None:
            held.append(DispatchRow(sid, {}, "no neighbour", None, best_ms, None, None,
                                    trial_spread(by_sid[sid], best_cfg)))
            continue
        (other, cfg), _ = hit
        held.append(DispatchRow(sid, cfg, "nearest (held out)", measured(by_sid[sid], cfg), best_ms, other,
                                trial_spread(by_sid[sid], cfg), trial_spread(by_sid[sid], best_cfg)))
    return rows, method, held


Picker = Callable[[str, dict[str, int], str], tuple[dict[str, Any], str]]


def _picker(lib: Library, factory: Callable[[Library], Any] | None) -> tuple[Picker, str, list[str]]:
    """Dispatch through momtune.dispatch.Dispatcher when it exists, else the local nearest rule."""
    def local(template: str, shape: dict[str, int], dtype: str) -> tuple[dict[str, Any], str]:
        cands = [(e.shape, e) for e in lib.entries if e.template == template and e.dtype == dtype]
        for s, e in cands:
            if s == shape:
                return e.config, "exact"
        hit = nearest(cands, shape)
        if hit is not None:
            return hit[0].config, "nearest"
        return lib.default_configs.get(template, {}), "default"

    errors: list[str] = []
    try:
        if factory is None:
            from momtune.dispatch import Dispatcher

            def factory(library: Library) -> Any:  # noqa: F811 - the real dispatcher
                try:  # judged as on the library's own machine: no probing of this one
                    return Dispatcher(str(library.path), "ignore", machine=library.provenance)
                except TypeError:
                    return Dispatcher(str(library.path), "ignore")
        dispatcher = factory(lib)
    except ImportError:
        return local, "nearest-bucket rule (local copy: momtune.dispatch is not available)", errors
    except Exception as exc:  # noqa: BLE001 - report what went wrong, keep reporting
        return local, f"nearest-bucket rule (local copy: Dispatcher failed: {type(exc).__name__}: {exc})", errors

    def real(template: str, shape: dict[str, int], dtype: str) -> tuple[dict[str, Any], str]:
        try:
            config, source = dispatcher.config(template, shape, dtype)
            return dict(config), str(source)
        except Exception as exc:  # noqa: BLE001 - e.g. a template this checkout does not know
            errors.append(f"{template}: {type(exc).__name__}: {exc}")
            config, source = local(template, shape, dtype)
            return config, f"{source} (local rule)"

    return real, "momtune.dispatch.Dispatcher", errors
