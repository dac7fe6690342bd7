"""Convert the H100 kernel-bench JSONs (bench/gpu_*.py outputs) into one bench file
(docs/DATA_FORMATS.md, kind "kernel") that `momtune report --bench` reads.

    python bench/to_bench_json.py --small-ops S.json --decode D.json --recurrence R.json --out FILE
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def _prov(meta: dict) -> dict:
    return {"gpu": meta.get("device"), "torch": meta.get("torch"), "triton": meta.get("triton")}


def small_ops(d: dict) -> list[dict]:
    rows = []
    for r in d["rows"]:
        base = dict(kind="kernel", name=r["op"], shape=r["shape"], dtype="bfloat16", floor_ms=r["floor_ms"])
        err = max(r["max_err"].values()) if r.get("max_err") else None
        rows.append(dict(base, impl="momtune-default", ms=r["graph_ms"], eager_ms=r["eager_ms"], max_abs_err=err,
                         note="CUDA-graph time (eager in eager_ms)"))
        if r.get("torch_ms"):
            rows.append(dict(base, impl="reference", ms=r["torch_ms"], note="PyTorch equivalent (eager)"))
    return rows


def decode(d: dict, shape_extra: dict) -> list[dict]:
    rows, best = [], {}
    for r in d["rows"]:
        shape = dict(B=r["B"], **shape_extra)
        key = r["B"]
        default = r["config"] == d["rows"][0]["config"]
        if default and not any(x["shape"] == shape and x["impl"] == "momtune-default" for x in rows):
            rows.append(dict(kind="kernel", name="decode", shape=shape, dtype="bfloat16", impl="momtune-default",
                             ms=r["graph_us"] / 1e3, eager_ms=r["eager_us"] / 1e3, floor_ms=r["floor_us"] / 1e3,
                             note="CUDA-graph time per step"))
        if r.get("correct") and (key not in best or r["graph_us"] < best[key]["graph_us"]):
            best[key] = r
    for B, r in best.items():
        rows.append(dict(kind="kernel", name="decode", shape=dict(B=B, **shape_extra), dtype="bfloat16",
                         impl="momtune-tuned", ms=r["graph_us"] / 1e3, floor_ms=r["floor_us"] / 1e3,
                         config=r["config"], note="best of a hand-picked sweep of 11 configs (not an Optuna study)"))
    return rows


def recurrence(d: dict) -> list[dict]:
    rows, best = [], {}
    for r in d["rows"]:
        if "ms" not in r:  # a failed config (recorded with its error)
            continue
        shape = dict(r["shape"])
        base = dict(kind="kernel", name="recurrence", shape=shape, dtype="bfloat16", floor_ms=r["floor_ms"],
                    max_rel_err=r.get("rel_err_o"))
        if r["impl"].startswith("fla"):
            rows.append(dict(base, impl="fla", ms=r["ms"], note="fla 0.6.0 chunk_gated_delta_rule, cu_seqlens"))
        elif r["impl"] == "momtune default":
            rows.append(dict(base, impl="momtune-default", ms=r["ms"]))
        else:
            k = json.dumps(shape, sort_keys=True)
            if k not in best or r["ms"] < best[k]["ms"]:
                best[k] = dict(base, impl="momtune-tuned", ms=r["ms"], config=r["impl"].replace("momtune ", ""),
                               note="best of the hand-picked configs (not an Optuna study)")
    return rows + list(best.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--small-ops"), ap.add_argument("--decode"), ap.add_argument("--recurrence")
    ap.add_argument("--out", required=True)
    ap.add_argument("--with-sweeps", action="store_true",
                    help="also emit the best hand-picked sweep config as momtune-tuned (not an Optuna result)")
    a = ap.parse_args()
    rows, prov = [], {}
    if a.small_ops:
        d = json.loads(Path(a.small_ops).read_text())
        rows += small_ops(d)
        prov = {"gpu": d.get("device"), "torch": d.get("torch"), "triton": d.get("triton")}
    if a.decode:
        d = json.loads(Path(a.decode).read_text())
        rows += decode(d, dict(H=4, K=256, V=256, E=4, topk=2, shared=1))
        prov = prov or _prov(d.get("meta", {}))
    if a.recurrence:
        d = json.loads(Path(a.recurrence).read_text())
        rows += recurrence(d)
        prov = prov or _prov(d.get("meta", {}))
    if not a.with_sweeps:
        rows = [r for r in rows if r["impl"] != "momtune-tuned"]
    prov.update(date="2026-11-26", source="bench/gpu_small_ops.py, bench/gpu_decode.py, bench/gpu_recurrence.py")
    Path(a.out).write_text(json.dumps({"schema": "momtune.bench/1", "provenance": prov, "rows": rows}, indent=1))
    print(f"wrote {a.out}: {len(rows)} rows")


if __name__ == "__main__":
    main()
