"""Shared test helpers: one assert that says how far off and where; NaN poisoning; an op counter."""
from __future__ import annotations

from pathlib import Path

import torch


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, atol: float, rtol: float) -> None:
    """Fail with max abs / rel error and the worst index if out is not within atol + rtol*|ref|."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    nan = torch.isnan(o) & ~torch.isnan(r)
    if bool(nan.any()):
        where = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{name}: {int(nan.sum())} NaN elements (unwritten or invalid), first at {where}")
    err = (o - r).abs()
    bad = err > atol + rtol * r.abs()
    if bool(bad.any()):
        i = int(err.argmax())
        where = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape))
        rel = (err / r.abs().clamp_min(1e-30)).flatten()[i].item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements off; max abs err {err.max().item():.3e} "
            f"at {where} (out {o.flatten()[i].item():.6g}, ref {r.flatten()[i].item():.6g}, rel {rel:.3e}); "
            f"atol {atol:g} rtol {rtol:g}"
        )


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN (integer tensors with -1) in place and return it."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)


class AtenOps:
    """Counts the PyTorch ops a block of code runs, leaving out those the Triton interpreter runs
    to emulate a kernel launch (on a GPU those are the kernels themselves)."""

    def __enter__(self):
        import collections
        import sys

        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops = collections.Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                f = sys._getframe(1)
                while f is not None and "interpreter" not in f.f_code.co_filename:
                    f = f.f_back
                if f is None:
                    ops[str(func).removeprefix("aten.").split(".")[0]] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)

    def work(self) -> dict[str, int]:
        """The ops that move or compute data (not views, not allocations)."""
        meta = {"view", "_unsafe_view", "slice", "as_strided", "t", "empty", "empty_like", "expand", "select"}
        return {k: v for k, v in self.ops.items() if k not in meta}


def load_script(path: "str | Path"):  # noqa: ANN201 - a module
    """A script of bench/ (not a package) as a module, loaded once per process under its file
    name (registered in sys.modules first: dataclasses look their module up while a class is made)."""
    import importlib.util
    import sys

    name = Path(path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def nudged(state: dict, dtype: torch.dtype, seed: int | None) -> dict:
    """``state`` (a state_dict) in ``dtype``; with a seed, every floating value moved by about one
    unit in its last place in ``dtype`` (relative eps, up or down at random). Gradient checks take
    the reference's own error in a dtype as the largest over a plain run and such nudged runs: a
    gradient that cancels strongly (A_log's, summed over every row) moves by far more than one
    run's error shows."""
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if seed is None:
        return out
    eps = torch.finfo(dtype).eps  # computed in float64 and rounded back: 1 + eps/2 does not exist in dtype
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.double() * (1 + eps * (2 * torch.randint(0, 2, v.shape, generator=gen) - 1).to(v.device)))
            .to(dtype) if v.is_floating_point() else v for k, v in out.items()}


def within_own_error(got: dict, want: dict, runs: list[dict], factor: float = 4.0, floor: float = 0.0) -> None:
    """Each gradient in ``got`` within ``factor`` x the largest norm-wise error of ``runs`` (the
    reference in the kernels' dtype, see :func:`nudged`) from the float64 ``want``."""
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for n in want:
        scale = float(want[n].norm()) or 1.0
        err = float((got[n] - want[n]).norm()) / scale
        own = max(float((r[n] - want[n]).norm()) / scale for r in runs)
        assert err <= factor * max(own, floor), (n, err, own)


def gated_delta_case(cu: list[int], H: int, K: int, V: int, seed: int, device: str = "cpu") -> dict:
    """Random inputs of the gated-delta recurrence on segments ``cu`` (float32, on ``device``):
    q, k [N, H, K], v and the output gradient do [N, H, V], log decays g in (-1, 0), beta in
    (0, 1), cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    N = cu[-1]
    q, k = torch.randn(N, H, K, generator=gen), torch.randn(N, H, K, generator=gen)
    v, do = torch.randn(N, H, V, generator=gen), torch.randn(N, H, V, generator=gen)
    g, b = -torch.rand(N, H, generator=gen), torch.rand(N, H, generator=gen)
    out = dict(q=q, k=k, v=v, g=g, beta=b, do=do)
    return {**{n: t.to(device) for n, t in out.items()}, "cu_seqlens": torch.tensor(cu, device=device)}


def gated_delta_autograd(case: dict, dtype: torch.dtype, chunk: int) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dg, dbeta) by autograd of the chunked reference recurrence in ``dtype``."""
    from momtune.reference.recurrence import recurrent_chunked

    leaves = [case[n].to(dtype).requires_grad_(True) for n in ("q", "k", "v", "g", "beta")]
    o, _ = recurrent_chunked(*leaves, cu_seqlens=case["cu_seqlens"], chunk_size=chunk)
    return torch.autograd.grad(o, leaves, case["do"].to(dtype))


#: Triton 3.6.0, the lent H200's, installed beside the venv's newest by `make test` (.triton36)
TRITON36 = Path(__file__).resolve().parents[1] / ".triton36"


def missing(why: str, in_ci: str = "") -> None:
    """Something a test needs is not on this machine: a skip here, a failure under CI=1 (``.ci/run``
    installs or sets up everything the tests need there, so nothing may be skipped). ``in_ci``: what
    the failure adds to ``why``."""
    import os

    import pytest

    if os.environ.get("CI"):
        pytest.fail(f"{why}: {in_ci}" if in_ci else why)
    pytest.skip(why)


def use_triton(triton_dir: "Path | None", monkeypatch) -> None:  # noqa: ANN001 - pytest's fixture
    """Compile checks run in a subprocess: put ``triton_dir``'s Triton first on its path (None: the
    venv's). Missing: a failure under CI (``.ci/run`` runs `make test`, which installs it), else a skip."""
    import os

    if triton_dir is None:
        return
    if not (triton_dir / "triton").is_dir():
        missing(f"no Triton in {triton_dir} (`make test` installs it before the tests)")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(triton_dir), os.environ.get("PYTHONPATH")])))
