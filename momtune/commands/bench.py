"""momtune bench: layer prefill, layer decode and model decode, momtune vs fla vs reference."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from momtune.commands import int_in
from momtune.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the MoM layer (prefill, decode) and LM decode: momtune vs fla 0.6.0 vs reference",
        description="Side-by-side end-to-end timings on this GPU, every implementation timed the same way (warmed "
                    "until two medians agree within 3%, then >= 30 calls: median and min-max), eager against eager "
                    "and CUDA graph against CUDA graph; printed as a table and saved as JSON for `momtune report`.")
    p.add_argument("--presets", nargs="+", default=["mom-340m", "mom-1.3b"], help="model presets")
    p.add_argument("--what", nargs="+", default=["layer_prefill", "layer_decode", "model_decode"],
                   help="layer_prefill layer_decode model_decode; layer_train (forward + backward), "
                        "model_train (one AdamW step of the LM) and recurrence (the chunked recurrence alone, "
                        "with FlashInfer's where --impls names flashinfer), not by default")
    p.add_argument("--prefill", nargs="+", default=["8x2048"], help="B x T shapes of the layer prefill")
    p.add_argument("--recurrence-sets", nargs="+", default=None, metavar="SET",
                   help="shape sets of the recurrence's search space for --what recurrence (default: each "
                        "preset's PRESET-prefill; e.g. fla-varlen), or single shapes such as "
                        "N32768-S8-H16-K128-V128 (FlashInfer's gated-delta prefill takes head size 128 only)")
    p.add_argument("--batches", nargs="+", type=int_in(1), default=[1, 8, 32, 128], help="decode batch sizes")
    p.add_argument("--impls", nargs="+", default=["momtune", "fla", "reference"],
                   help="momtune fla reference flashinfer (flashinfer: the recurrence only)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 | float16 | float32")
    p.add_argument("--layers", type=int_in(1), default=None, help="model decode with this many layers (default: preset's)")
    p.add_argument("--out", default="bench.json", help="JSON file to write (atomically)")
    p.add_argument("--json", action="store_true",
                   help="also print the bench file's JSON on stdout (progress and the table go to stderr)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from momtune import bench
    from momtune.checks import check_choice
    from momtune.library import atomic_write_json as write_json_atomic
    from momtune.provenance import collect as provenance

    if not torch.cuda.is_available():
        raise InputError("bench: needs a CUDA GPU (the end-to-end numbers are GPU numbers); none is visible")
    for w in args.what:
        check_choice("--what", w, bench.KINDS)
    for i in args.impls:
        check_choice("--impls", i, bench.IMPLS)
    rec_sets = args.recurrence_sets or [f"{p}-prefill" for p in args.presets]
    if "recurrence" in args.what:
        for set_name in rec_sets:
            bench.recurrence_shapes(set_name)  # an unknown set is an input error before anything runs
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(args.dtype)
    if dtype is None:
        raise InputError(f"--dtype: {args.dtype!r} is not accepted; use bfloat16, float16 or float32")
    shapes = []
    for s in args.prefill:
        try:
            B, T = (int(v) for v in s.lower().split("x"))
        except ValueError:
            raise InputError(f"--prefill: {s!r} is not BxT (e.g. 8x2048)") from None
        shapes.append((B, T))
    from momtune import settings
    from momtune.dispatch import library_path

    # which configs the momtune rows ran with: the tuned library MOMTUNE_LIBRARY resolves to (unset
    # or auto: the shipped one for this GPU, if any), or none (every template's default config);
    # reports label the numbers from it
    prov = {**provenance(), "momtune_library": library_path(settings.load().library)}
    rows: list[dict] = []

    def done(new: list[dict]) -> None:
        """Keep what is measured: the file is rewritten (atomically) after every group, so a run cut
        short by a time limit still leaves every finished row on disk."""
        rows.extend(new)
        for r in new:
            print(f"  {r['kind']} {r['name']} {r['shape']} {r['impl']}: "
                  + (f"{r['ms']:.4f} ms" if r.get("ms") is not None else r.get("note", "")), flush=True,
                  file=sys.stderr if args.json else sys.stdout)
        write_json_atomic(args.out, {"schema": "momtune.bench/1", "provenance": prov, "rows": rows})

    failed: list[str] = []

    def group(kind: str, preset: str, shape: dict, measure: Any) -> None:
        """One group of rows; a group that raises (outside the per-implementation guards) becomes
        a failed row per implementation and the run goes on to the next group."""
        try:
            done(measure())
        except Exception as exc:  # noqa: BLE001 - the reason is the result; the exit status says it
            failed.append(f"{kind} {preset} {shape}")
            from momtune.validate import first_line

            why = f"failed: {first_line(exc, 192)}"
            done([bench._row(kind, preset, shape, dtype, impl, note=why) for impl in args.impls])

    for preset in args.presets:
        if "layer_prefill" in args.what:
            for B, T in shapes:
                group("layer_prefill", preset, dict(B=B, T=T),
                      lambda: bench.bench_layer_prefill(preset, B, T, args.impls, dtype))
        if "layer_train" in args.what:
            for B, T in shapes:
                group("layer_train", preset, dict(B=B, T=T),
                      lambda: bench.bench_layer_train(preset, B, T, args.impls, dtype))
        if "model_train" in args.what:
            for B, T in shapes:
                group("model_train", preset, dict(B=B, T=T),
                      lambda: bench.bench_model_train(preset, B, T, args.impls, dtype, layers=args.layers))
        if "layer_decode" in args.what:
            for B in args.batches:
                group("layer_decode", preset, dict(B=B), lambda: bench.bench_layer_decode(preset, B, args.impls, dtype))
        if "model_decode" in args.what:
            for B in args.batches:
                group("model_decode", preset, dict(B=B),
                      lambda: bench.bench_model_decode(preset, B, args.impls, dtype, layers=args.layers))
    if "recurrence" in args.what:
        from momtune.timing import measure_peaks

        peaks = measure_peaks()  # every floor of the run from this GPU's own copy and GEMM rates
        prov["peaks"] = peaks
        impls = [i for i in args.impls if i in bench.RECURRENCE_IMPLS]
        for set_name in rec_sets:
            for shape in bench.recurrence_shapes(set_name):
                group("recurrence", set_name, shape,
                      lambda: bench.bench_recurrence(set_name, shape, impls, dtype, peaks))
    _print(rows, stderr=args.json)
    if args.json:
        import json

        from momtune.commands import finite

        print(json.dumps(finite({"schema": "momtune.bench/1", "provenance": prov, "rows": rows}), indent=1,
                         default=str))
    if failed:
        print(f"momtune bench: {len(failed)} group(s) failed: {'; '.join(failed)} (their rows say why)",
              file=sys.stderr)
        return 1
    return 0


def _spread(r: dict, prefix: str = "") -> str:
    """'1.234 (1.20-1.31)': the median and the min-max of the timed calls."""
    ms, lo, hi = r.get(f"{prefix}ms"), r.get(f"{prefix}ms_min"), r.get(f"{prefix}ms_max")
    if ms is None:
        return "-"
    return f"{ms:.3f}" + (f" ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else "")


def ratios(rows: list[dict]) -> list[tuple[str, str]]:
    """Per row: (eager ratio, graph ratio) = impl / momtune, eager against eager and CUDA graph
    against CUDA graph; '' where one side has no such time (never graph against eager)."""
    eager = {(r["kind"], r["name"], str(r["shape"])): r.get("ms") for r in rows if r["impl"] == "momtune"}
    graph = {(r["kind"], r["name"], str(r["shape"])): r.get("graph_ms") for r in rows if r["impl"] == "momtune"}
    out = []
    for r in rows:
        key = (r["kind"], r["name"], str(r["shape"]))
        e, g = eager.get(key), graph.get(key)
        own = r["impl"] == "momtune"
        out.append((f"{r['ms'] / e:.2f}x" if not own and r.get("ms") and e else "",
                    f"{r['graph_ms'] / g:.2f}x" if not own and r.get("graph_ms") and g else ""))
    return out


def _note(r: dict) -> str:
    """The note column: why a number is missing; for the recurrence rows, time over the floor and
    the errors against the float64 reference too."""
    parts = []
    if r.get("x_floor") is not None:
        parts.append(f"{r['x_floor']:.1f}x floor {r['floor_ms']:.3f} ms")
    if r.get("rel_err_o") is not None:
        parts.append(f"err o {r['rel_err_o']:.1e} S {r.get('rel_err_state', float('nan')):.1e}")
    if r.get("note"):
        parts.append(str(r["note"]))
    return "; ".join(parts)


def _print(rows: list[dict], stderr: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="momtune bench: median ms (min-max of >= 30 calls after warm-up); x momtune = impl / "
                        "momtune, eager against eager and graph against graph")
    cols = ("kind", "preset", "shape", "impl", "eager ms", "graph ms", "tokens/s", "peak MB", "x momtune eager",
            "x momtune graph", "note")
    for col in cols:
        table.add_column(col, justify="left" if col in ("kind", "preset", "shape", "impl", "note") else "right")
    for r, (er, gr) in zip(rows, ratios(rows)):
        table.add_row(r["kind"], r["name"], str(r["shape"]), r["impl"], _spread(r), _spread(r, "graph_"),
                      f"{r['tokens_per_s']:.3g}" if r.get("tokens_per_s") else "-",
                      f"{r['peak_mem_mb']:.0f}" if r.get("peak_mem_mb") is not None else "-", er, gr,
                      _note(r))
    Console(stderr=stderr).print(table)
