"""The tuned library: export from Optuna studies, load and validate, atomic writes.

Schema ``momtune.library/1`` (docs/DATA_FORMATS.md). One library holds one GPU's winners: for
each template and shape bucket (shape + dtype) the winning config, its time, the default's
time, the largest error the winner showed in its checks, and the trial count; provenance says
where it was measured (GPU, versions, commit) and each template records its source hash.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, LibraryError, StorageError
from .provenance import git_commit, now_iso
from .space import canonical
from .timing import judge

SCHEMA = "momtune.library/1"
PROVENANCE_KEYS = ("gpu", "capability", "sm_count", "driver", "cuda", "torch", "triton", "momtune", "created",
                   "commit")
# every field a library may hold (docs/DATA_FORMATS.md); any other is reported as unknown (a typo)
TOP_FIELDS = ("schema", "provenance", "templates")
PROVENANCE_FIELDS = (*PROVENANCE_KEYS, "searched", "python", "fla", "floor_peak")  # the last three optional
TEMPLATE_FIELDS = ("source_hash", "default_config", "spec", "choices", "entries",
                   "provenance")  # the last: a template carried over by ``export --merge`` (where it was tuned)
ENTRY_FIELDS = ("shape", "dtype", "config", "time_ms", "default_time_ms", "max_abs_err", "max_rel_err", "trials",
                "study", "retimed", "floor_ms", "shape_set", "also_searched", "default_kept",
                "provenance")  # the last: an entry ``export --merge`` kept from the file (where it was tuned)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to a temp file in the same folder, fsync, then rename over ``path``: readers see
    the old file or the new one, never a partial file. The file keeps the mode of the one it
    replaces, else gets the umask's (0644 under the usual 022), not mkstemp's private 0600:
    libraries and reports are meant to be shared."""
    path = Path(path)
    if path.is_dir():
        raise LibraryError(f"{path}: is a folder; give a file name to write the JSON to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # a read-only or missing folder, a full disk, ...
        raise LibraryError(f"{path}: cannot write here ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(obj), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise LibraryError(f"{path}: writing failed ({exc.strerror or exc}); the old file, if any, is "
                               "unchanged") from None
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


@dataclass
class Library:
    path: str
    provenance: dict[str, Any]
    templates: dict[str, dict[str, Any]]
    unknown: list[str] = field(default_factory=list)  # "templates.x.entries[0].confg: unknown field ..."

    def entries(self, template: str) -> list[dict[str, Any]]:
        return list(self.templates.get(template, {}).get("entries", []))

    def size(self) -> int:
        return sum(len(t.get("entries", [])) for t in self.templates.values())


def _unknown(obj: Mapping[str, Any], known: Sequence[str], where: str) -> list[str]:
    return [f"{where}{k}: unknown field (known: {', '.join(known)})" for k in obj if k not in known]


def load_library(path: str | Path) -> Library:
    """Load and check a library file; every problem is a LibraryError naming the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise LibraryError(f"library {p}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LibraryError(f"library {p}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise LibraryError(f"library {p}: schema {got!r}, expected {SCHEMA!r}")
    prov, templates = data.get("provenance"), data.get("templates")
    if not isinstance(prov, dict) or not isinstance(templates, dict):
        raise LibraryError(f"library {p}: 'provenance' and 'templates' must be objects")
    for name, tmpl in templates.items():
        where = f"library {p}: templates.{name}"
        if not isinstance(tmpl, dict) or not isinstance(tmpl.get("entries"), list):
            raise LibraryError(f"{where}: must be an object with an 'entries' list")
        for i, e in enumerate(tmpl["entries"]):
            ok = (isinstance(e, dict) and isinstance(e.get("shape"), dict) and isinstance(e.get("config"), dict)
                  and isinstance(e.get("dtype"), str)
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in e["shape"].values()))
            if not ok:
                raise LibraryError(f"{where}.entries[{i}]: needs 'shape' (ints), 'dtype' (str), 'config' (object)")
    unknown = _unknown(data, TOP_FIELDS, "") + _unknown(prov, PROVENANCE_FIELDS, "provenance.")
    for name, tmpl in templates.items():
        unknown += _unknown(tmpl, TEMPLATE_FIELDS, f"templates.{name}.")
        for i, e in enumerate(tmpl["entries"]):
            unknown += _unknown(e, ENTRY_FIELDS, f"templates.{name}.entries[{i}].")
    return Library(str(p), prov, templates, unknown)


# ---------------------------------------------------------------------------------------------
# does a library fit this machine and this checkout (verify and dispatch share these rules)


def provenance_problems(provenance: Mapping[str, Any], machine: Mapping[str, Any], strict: bool) -> list[str]:
    """Why a library's provenance does not fit ``machine``: a matched field (GPU, capability, Triton)
    that differs, and under ``strict`` every provenance field that is missing, named."""
    from .provenance import MATCH_KEYS, mismatches

    missing = [k for k in PROVENANCE_KEYS if k not in provenance] if strict else []
    what = (f"provenance field{'s' * (len(missing) > 1)} {', '.join(missing)} missing (policy strict needs every "
            f"one of {', '.join(PROVENANCE_KEYS)})")
    return ([what] if missing else []) + mismatches(provenance, machine, tuple(k for k in MATCH_KEYS if k not in missing))


def source_problem(name: str, tmpl: Mapping[str, Any], current: str | None, strict: bool) -> str | None:
    """Why a template's entries do not fit this checkout: its source hash differs from ``current``
    (the template's now), or is missing (a problem under ``strict`` only)."""
    recorded = tmpl.get("source_hash")
    if not recorded:
        return (f"templates.{name}.source_hash missing (policy strict needs it to tell whether the template "
                "changed since the search)") if strict else None
    if current is not None and current != recorded:
        return f"template {name}: source hash library {recorded}, this checkout {current}"
    return None


def config_problem(config: Mapping[str, Any], shape: Mapping[str, int], template: Any, space: Any,
                   searched: Mapping[str, Sequence[Any]] | None = None) -> str | None:
    """Why ``config`` is not a config of ``template`` for ``shape``, or None if it is one. With its
    search space (``space``): a parameter not in it, a value not among its choices, a constraint or
    the template's check failing for the shape. Without one (a template momtune does not ship and no
    --space-dir): a parameter the template's default config lacks or one it has that is missing,
    and a value not among the choices the library records as searched (``searched``)."""
    from .errors import SearchSpaceError

    if space is not None:
        try:
            ok, why = space.is_valid(config, shape)
        except SearchSpaceError as exc:
            return str(exc)
        return None if ok else f"outside the search space {space.path}: {why}"
    params = set(getattr(template, "default_config", {}) or {})
    unknown = sorted(set(config) - params) if params else []
    missing = sorted(params - set(config))
    if unknown:
        return f"parameters {unknown} are not the template's (its parameters: {', '.join(sorted(params))})"
    if missing:
        return f"parameters {missing} missing (the template's parameters: {', '.join(sorted(params))})"
    for k, v in config.items():
        choices = (searched or {}).get(k)
        if isinstance(choices, list) and v not in choices:
            return (f"{k}={v!r} is not one of {choices}, the choices the library records as searched (no search "
                    "space file at hand; give --space-dir DIR to check against one)")
    return None


# ---------------------------------------------------------------------------------------------
# export


def _select_gpu(by_gpu: Mapping[str, list[Any]], gpu: str | None, note: Callable[[str], None]) -> str:
    if gpu is not None:
        if gpu not in by_gpu:
            raise StorageError(f"--gpu {gpu!r}: no studies for it; GPUs in the storage: {', '.join(sorted(by_gpu))}")
        chosen = gpu
    elif len(by_gpu) == 1:
        chosen = next(iter(by_gpu))
    else:
        from .provenance import current_gpu

        here = current_gpu()
        chosen = here if here in by_gpu else max(sorted(by_gpu), key=lambda g: len(by_gpu[g]))
    others = sorted(g for g in by_gpu if g != chosen)
    if others:
        note(f"warning: the storage holds studies of several GPUs ({', '.join(sorted(by_gpu))}); exporting "
             f"{chosen!r} and leaving out {sum(len(by_gpu[g]) for g in others)} studies of {', '.join(others)} "
             "(choose with --gpu)")
    return chosen


def _searched_choices(trials: Sequence[Any], into: dict[str, list[Any]]) -> None:
    """Add each parameter's choices as the trials' distributions hold them (the search space searched)."""
    for t in trials:
        for name, dist in getattr(t, "distributions", {}).items():
            known = into.setdefault(name, [])
            known.extend(c for c in getattr(dist, "choices", ()) if c not in known)


def _default_valid(attrs: Mapping[str, Any]) -> bool:
    """The study's default config is a config of its search space for its shape: recorded by the
    search since session 9; for older studies, from momtune's own search space (False when that
    cannot be told: the entry then keeps the study's winner)."""
    if "default_valid" in attrs:
        return bool(attrs["default_valid"])
    try:
        from .space import find_space
        from .templates import library_spec, resolve_template

        name = str(attrs["template"])
        space = find_space(name, template=resolve_template(library_spec(name, attrs.get("template_spec"))))
        return space is not None and space.is_valid(attrs["default_config"], attrs["shape"])[0]
    except Exception:  # noqa: BLE001 - a template or space that cannot be loaded here
        return False


def _entry(study: Any, attrs: Mapping[str, Any], trials: Sequence[Any]) -> dict[str, Any] | None:
    from .study import DEVICE_STATE_FAILURES, count, failure_kinds

    c = count(trials)
    ok = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs.get("status") == "ok"]
    if not ok:
        return None
    winner = attrs.get("winner")
    if winner and winner.get("config") is not None:
        config, time_ms, retimed = dict(winner["config"]), winner.get("time_ms"), bool(winner.get("retimed"))
    else:  # the search was interrupted before re-timing: the best trial
        best = min(ok, key=lambda t: (t.value, canonical(t.user_attrs["config"])))
        config, time_ms, retimed = dict(best.user_attrs["config"]), best.value, False
    kept = None
    default, default_ms = attrs.get("default_config"), attrs.get("default_time_ms")
    if (retimed and isinstance(default, Mapping) and canonical(default) != canonical(config)
            and isinstance(default_ms, (int, float)) and math.isfinite(default_ms) and time_ms is not None
            and not (failure_kinds(trials, default) - DEVICE_STATE_FAILURES) and _default_valid(attrs)):
        # the search's own rule (momtune.winner), for studies whose default had no result when
        # their winner was named: a winner not faster than the default it was re-timed with beyond
        # noise is no win (the default runs; a nearest-shape lookup must not lend this shape's
        # config either); not for a default that recorded a failure or is outside the space here,
        # but for one whose trials found the device's memory taken and that the re-timing then ran
        spread = {canonical(c.get("config", {})): c.get("spread", 0.0) for c in winner.get("candidates", [])}
        if judge(time_ms, default_ms, winner.get("spread", 0.0), spread.get(canonical(default), 0.0)) != "faster":
            kept = {"config": config, "time_ms": time_ms, "spread": winner.get("spread", 0.0)}
            config, time_ms = dict(default), default_ms
    mine = [t for t in ok if canonical(t.user_attrs["config"]) == canonical(config)]
    errs = [(t.user_attrs.get("max_abs_err", 0.0), t.user_attrs.get("max_rel_err", 0.0)) for t in mine]
    return {"shape": dict(attrs["shape"]), "dtype": attrs["dtype"], "config": config, "time_ms": time_ms,
            "default_time_ms": attrs.get("default_time_ms"),
            "max_abs_err": max((e[0] for e in errs), default=None),
            "max_rel_err": max((e[1] for e in errs), default=None),
            "trials": c.done, "study": study.study_name, "retimed": retimed, "floor_ms": attrs.get("floor_ms"),
            "shape_set": attrs.get("shape_set"), **({"default_kept": kept} if kept else {})}


def build_library(storage_url: str, templates: Sequence[str] | None = None, gpu: str | None = None,
                  prefix: str | None = None, note: Callable[[str], None] = print) -> dict[str, Any]:
    """The library dict of one GPU's studies (see module doc); notes go to ``note``."""
    import optuna

    from .study import open_storage, safe_url, trials_of

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(storage_url, read_only=True)
    summaries = optuna.get_all_study_summaries(storage, include_best_trial=False)
    ours = [s for s in summaries if "template" in s.user_attrs and "shape" in s.user_attrs]
    if prefix == "*":  # every study: per shape, the fastest winner of any of them
        chosen = list(ours)
    elif prefix:  # one prefix, or several separated by commas (per shape, the fastest of them)
        wanted = tuple(p.strip() + "/" for p in prefix.split(",") if p.strip())
        chosen = [s for s in ours if s.study_name.startswith(wanted)]
    else:
        chosen = [s for s in ours if "/" not in s.study_name.split(":", 1)[0]]
    if templates:
        chosen = [s for s in chosen if s.user_attrs["template"] in templates]
    if not chosen:
        prefixes = sorted({s.study_name.split("/", 1)[0] for s in ours if "/" in s.study_name.split(":", 1)[0]})
        raise StorageError(f"storage {safe_url(storage_url)!r}: no momtune studies"
                           f"{' with prefix ' + repr(prefix) if prefix else ''}"
                           f"{' of templates ' + ', '.join(templates) if templates else ''}"
                           f"{'; study prefixes present: ' + ', '.join(prefixes) if prefixes else ''}")
    by_gpu: dict[str, list[Any]] = {}
    for s in chosen:
        by_gpu.setdefault(str(s.user_attrs.get("gpu", "unknown")), []).append(s)
    gpu_name = _select_gpu(by_gpu, gpu, note)
    studies = _current_versions(sorted(by_gpu[gpu_name], key=lambda s: s.study_name), note)
    newest = max(studies, key=lambda s: str(s.user_attrs.get("provenance", {}).get("created", "")))
    prov_src = dict(newest.user_attrs.get("provenance", {}))
    tritons = {str(s.user_attrs.get("provenance", {}).get("triton")) for s in studies}
    if len(tritons) > 1:
        note(f"warning: these studies ran under several Triton versions ({', '.join(sorted(tritons))}); "
             f"the library records {prov_src.get('triton')}")
    provenance = {k: prov_src.get(k) for k in PROVENANCE_KEYS}
    provenance.update(gpu=gpu_name, created=now_iso(), searched=prov_src.get("created"),
                      commit=prov_src.get("commit") or git_commit())
    provenance.update({k: prov_src[k] for k in ("python", "fla") if k in prov_src})  # recorded since issue 13
    if isinstance(newest.user_attrs.get("floor_peak"), dict):  # the peaks its entries' floor_ms use
        provenance["floor_peak"] = newest.user_attrs["floor_peak"]
    out: dict[str, Any] = {}
    for s in studies:
        attrs = s.user_attrs
        name = str(attrs["template"])
        study = optuna.load_study(study_name=s.study_name, storage=storage)
        trials = trials_of(study)
        entry = _entry(study, attrs, trials)
        sprov = attrs.get("provenance", {})
        tmpl = out.setdefault(name, {"source_hash": sprov.get("source_hash"),
                                     "default_config": attrs.get("default_config"), "choices": {}, "entries": []})
        _searched_choices(trials, tmpl["choices"])
        if attrs.get("template_spec") and attrs["template_spec"] != name:
            tmpl["spec"] = attrs["template_spec"]
        if sprov.get("source_hash") != tmpl["source_hash"]:
            note(f"warning: template {name!r} changed between searches (source hashes {tmpl['source_hash']} and "
                 f"{sprov.get('source_hash')}); the library records the first")
        if entry is None:
            note(f"warning: {s.study_name}: no config passed the check; no entry (run time uses the default)")
            continue
        _complete_configs(entry, name, attrs)
        same = [i for i, e in enumerate(tmpl["entries"]) if e["shape"] == entry["shape"] and e["dtype"] == entry["dtype"]]
        if same:  # several studies of one shape (--study '*' or a list): keep the fastest, remember the others
            old = tmpl["entries"][same[0]]
            keep, drop = (entry, old) if _faster(entry, old) else (old, entry)
            keep["default_time_ms"] = keep.get("default_time_ms") or drop.get("default_time_ms")
            keep["also_searched"] = sorted({*old.get("also_searched", []), *entry.get("also_searched", []),
                                            drop["study"]})
            tmpl["entries"][same[0]] = keep
            continue
        tmpl["entries"].append(entry)
    _check_current_sources(out, note)
    return {"schema": SCHEMA, "provenance": provenance, "templates": out}


def _complete_configs(entry: dict[str, Any], name: str, attrs: Mapping[str, Any]) -> None:
    """A study of a reduced space (``--space-dir``, e.g. bench/spaces' sampler comparison) records
    only the parameters it searched; the kernel ran the rest at the template's defaults for the
    dtype. The entry's configs get those values written out, so that every entry of a template
    names every parameter (a template that cannot be imported here is left as recorded)."""
    from .templates import library_spec, resolve_template

    try:
        full = resolve_template(library_spec(name, attrs.get("template_spec"))).default_for(str(attrs.get("dtype")))
    except Exception:  # noqa: BLE001 - a template not registered here
        return
    for holder in (entry, entry.get("default_kept") or {}):
        if isinstance(holder.get("config"), Mapping):
            holder["config"] = {**{k: v for k, v in full.items() if k not in holder["config"]}, **holder["config"]}


def _faster(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Entry ``a`` beats ``b`` (two studies of one shape): by the speed-up over the default each
    was re-timed with in its own process where both have one (two processes' times of one kernel
    differ by a few percent on the H200: the default is the common yardstick), else by time."""
    def ratio(e: Mapping[str, Any]) -> float | None:
        t, d = e.get("time_ms"), e.get("default_time_ms")
        ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (t, d))
        return float(t) / float(d) if ok else None

    ra, rb = ratio(a), ratio(b)
    if ra is not None and rb is not None:
        return ra < rb
    return (a.get("time_ms") or math.inf) < (b.get("time_ms") or math.inf)


def _current_versions(studies: list[Any], note: Callable[[str], None]) -> list[Any]:
    """Per template, shape and dtype: the studies of one version of the template's kernels (a
    kernel changed since an older study of that shape: ``momtune search`` then made
    ``<name>@<source hash>``): the current source's, or, for a template not registered here (a
    study never names code to import), the most recently created study's."""
    from .templates import library_spec, resolve_template

    current: dict[str, str | None] = {}
    for s in studies:
        name = str(s.user_attrs["template"])
        if name not in current:
            try:
                current[name] = resolve_template(library_spec(name, s.user_attrs.get("template_spec"))).source_hash()
            except Exception:  # noqa: BLE001 - a template that cannot be imported here is not filtered
                current[name] = None
    groups: dict[tuple[str, str, str], list[Any]] = {}
    for s in studies:
        a = s.user_attrs
        groups.setdefault((str(a["template"]), str(a.get("shape_key") or a.get("shape")), str(a.get("dtype"))), []).append(s)
    keep: set[str] = set()
    def src(m: Any) -> Any:
        return (m.user_attrs.get("provenance") or {}).get("source_hash")

    for (name, _, _), members in groups.items():
        want = current.get(name)
        if not want or not any(src(m) == want for m in members):
            want = src(max(members, key=lambda m: str((m.user_attrs.get("provenance") or {}).get("created", ""))))
        now = [m for m in members if src(m) == want]
        for m in (now or members):
            keep.add(m.study_name)
        for m in members:
            if now and m.study_name not in keep:
                note(f"{m.study_name}: left out, it measured an older version of {name!r}'s kernels")
    return [s for s in studies if s.study_name in keep]


def _check_current_sources(templates: Mapping[str, Any], note: Callable[[str], None]) -> None:
    from .templates import library_spec, resolve_template

    for name, tmpl in templates.items():
        try:
            current = resolve_template(library_spec(name, tmpl.get("spec"))).source_hash()
        except Exception:  # noqa: BLE001 - a template that cannot be imported here is not checked
            current = None
        if current and tmpl.get("source_hash") and current != tmpl["source_hash"]:
            note(f"warning: template {name!r} has changed since it was searched (source hash now {current}, "
                 f"searched {tmpl['source_hash']}); strict dispatch will refuse these entries")


def export_library(storage_url: str, out: str | Path, templates: Sequence[str] | None = None,
                   gpu: str | None = None, prefix: str | None = None,
                   note: Callable[[str], None] = print, force: bool = False, merge: bool = False) -> dict[str, Any]:
    """Build the library and write it to ``out``. Refused, ``out`` untouched: ``out`` is the storage's
    own database; the library has no entry; and, unless ``force``, ``out`` holds something this
    export would destroy (see :func:`check_replace`). ``merge``: the templates of the library in
    ``out`` that this export has no entry of are kept (see :func:`merge_into`)."""
    from .study import safe_url, sqlite_path

    db = sqlite_path(storage_url)
    if db is not None and Path(out).resolve() == db:
        raise InputError(f"--out: {out} is the study database of --storage {safe_url(storage_url)}; "
                         "writing the library there would replace it")
    lib = build_library(storage_url, templates, gpu, prefix, note)
    if not any(t["entries"] for t in lib["templates"].values()):
        raise LibraryError(f"nothing to export: no study of {', '.join(sorted(lib['templates']))} on GPU "
                           f"{lib['provenance']['gpu']!r} has a config that passed its check; {out} not written")
    if merge:
        lib = merge_into(out, lib, note)
    if not force:
        check_replace(out, lib)
    atomic_write_json(out, lib)
    return lib


def merge_into(out: str | Path, lib: dict[str, Any], note: Callable[[str], None] = print) -> dict[str, Any]:
    """``lib`` with what the library file ``out`` holds that ``lib`` lacks, each piece carrying the
    provenance it was tuned with (its own ``provenance`` field, else its template's, else the old
    file's), so that a library grows a template or a shape set at a time (a device session tunes
    the backward templates, another the forward ones at a new head size) and still says where each
    entry was measured: the templates ``lib`` has no entry of, and, of a template both hold with the
    same source hash, the old entries of shapes ``lib`` lacks and those faster over their own
    default than ``lib``'s of the same shape (the rule of several study prefixes, :func:`_faster`).
    A template whose source changed since the old file's entries is ``lib``'s alone (said). Refused
    (InputError naming ``out``) when ``out`` is not a library or is one of another GPU or Triton
    version; a missing ``out`` is no error (nothing to keep)."""
    from .provenance import MATCH_KEYS, mismatches

    path = Path(out)
    if not path.is_file():
        return lib
    try:
        old = load_library(path)
    except LibraryError as exc:
        raise InputError(f"--merge: --out {out} is not a momtune library ({exc}); nothing to merge into") from None
    if mismatches(old.provenance, lib["provenance"], MATCH_KEYS):
        raise InputError(f"--merge: --out {out} holds the library of {_fmt_prov(old.provenance)}; this export is "
                         f"of {_fmt_prov(lib['provenance'])}: a library is of one GPU and Triton version, so "
                         "it is not merged (choose another --out)")
    merged = {**lib, "templates": dict(lib["templates"])}
    for name, tmpl in old.templates.items():
        if not tmpl.get("entries"):
            continue
        prov = tmpl.get("provenance", old.provenance)
        new = lib["templates"].get(name, {})
        if not new.get("entries"):
            merged["templates"][name] = {**tmpl, "provenance": prov}
            continue
        if tmpl.get("source_hash") != new.get("source_hash"):
            note(f"--merge: {name}: its source changed since {out}'s {len(tmpl['entries'])} entries were tuned; "
                 f"this export's {len(new['entries'])} replace them")
            continue
        mine = {_entry_key(e): e for e in new["entries"]}
        kept = 0
        for e in tmpl["entries"]:
            key = _entry_key(e)
            if key not in mine or _faster(e, mine[key]):
                mine[key] = {**e, "provenance": e.get("provenance", prov)}
                kept += 1
        merged["templates"][name] = {**new, "entries": list(mine.values())}
        note(f"--merge: {name}: {len(new['entries'])} entries exported, {kept} of {out}'s {len(tmpl['entries'])} "
             "kept (shapes not exported, or faster over their default)")
    return merged


def _entry_key(e: Mapping[str, Any]) -> str:
    return json.dumps([e.get("shape"), e.get("dtype")], sort_keys=True)


def _fmt_prov(prov: Mapping[str, Any]) -> str:
    return f"GPU {prov.get('gpu')!r}, Triton {prov.get('triton')}"


def check_replace(out: str | Path, lib: Mapping[str, Any]) -> None:
    """Raise InputError (naming ``out``, what it holds and ``--force``) if writing ``lib`` over
    ``out`` would destroy what this export did not make: a file that is not a momtune library, a
    library of another GPU or Triton version (its provenance differs), or one holding entries of
    templates ``lib`` lacks (an export with --template over a fuller library)."""
    from .provenance import MATCH_KEYS, mismatches

    path = Path(out)
    if not path.is_file():
        return
    advice = "give --force to replace it, or choose another --out"
    try:
        old = load_library(path)
    except LibraryError as exc:
        raise InputError(f"--out {out}: exists and is not a momtune library ({exc}); {advice}") from None
    new_prov = lib["provenance"]
    if mismatches(old.provenance, new_prov, MATCH_KEYS):
        raise InputError(f"--out {out}: holds the library of {_fmt_prov(old.provenance)} ({old.size()} entries); "
                         f"this export is of {_fmt_prov(new_prov)}, and replacing it would lose those; {advice}")
    lost = sorted(n for n, t in old.templates.items() if t.get("entries") and not lib["templates"].get(n, {}).get(
        "entries"))
    if lost:
        raise InputError(f"--out {out}: holds entries of templates {', '.join(lost)} ({_fmt_prov(old.provenance)}) "
                         f"that this export has none of; replacing it would lose them; {advice}")
