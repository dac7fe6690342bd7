"""Hostile and careless uses of the Python API (the fast layer, the LM, the dispatcher, the
environment), judged as the command cases are (test_hostile_inputs.py): each ends a clear error
naming the argument, or the right result; the tally counts them with the commands'.

Runs the kernels in the interpreter (float32; bf16 there must be refused or run on the reference)."""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import momtune
from momtune.errors import MomtuneError

from .conftest import OUTCOMES

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ARGS = {"hidden_size": 32, "head_dim": 16, "num_heads": 2, "expand_v": 1, "num_memories": 3, "topk": 2,
        "shared_mem": True, "layer_idx": 0}
TOL = 2e-3  # float32 layer against the reference, as tests/model


def _layers(backend: str = "triton", dtype: torch.dtype = torch.float32):
    torch.manual_seed(0)
    fast = momtune.MoMAttention(**ARGS, backend=backend).eval()
    ref = momtune.reference.MoMAttention(**ARGS).eval()
    ref.load_state_dict(fast.state_dict())
    return fast.to(dtype), ref.to(dtype)


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 6, 32).to(dtype)


def _same_after(change: Callable[[torch.nn.Module], None]) -> None:
    """After ``change`` (applied to both), the Triton layer's output is the reference's, and moved."""
    fast, ref = _layers()
    with torch.no_grad():
        before = fast(_x())[0].clone()
        change(fast)
        change(ref)
        after, expect = fast(_x())[0], ref(_x())[0]
    assert (after - expect).abs().max().item() < TOL, "the fast layer kept its old weights"
    assert (after - before).abs().max().item() > 5 * TOL, "the change did not change the output"


def _scale_gate(layer: torch.nn.Module) -> None:
    layer.g_proj.weight.data.mul_(3)  # .data: its own version counter, the route once missed


def _load_other(layer: torch.nn.Module) -> None:
    torch.manual_seed(7)
    other = momtune.reference.MoMAttention(**ARGS)
    layer.load_state_dict(other.state_dict())


def _round_trip(layer: torch.nn.Module) -> None:
    layer.double()
    with torch.no_grad():
        layer.g_proj.weight.mul_(-1)
    layer.float()


def _bf16_auto_runs_the_reference() -> None:
    fast, ref = _layers("auto", torch.bfloat16)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, expect = fast(_x(torch.bfloat16))[0], ref(_x(torch.bfloat16))[0]
    assert torch.equal(out, expect), "auto in the interpreter must run bf16 on the reference"


def _call(layer: torch.nn.Module, x: torch.Tensor, **kw: object) -> None:
    with torch.no_grad():
        layer(x, **kw)


def _lm_generate(**kw: object) -> None:
    cfg = momtune.MoMConfig.from_preset("tiny")
    model = momtune.MoMForCausalLM(cfg, backend="triton").eval()
    with torch.no_grad():
        model.generate(torch.randint(0, cfg.vocab_size, (1, 4)), **kw)


def _lm_forward(ids: torch.Tensor) -> None:
    cfg = momtune.MoMConfig.from_preset("tiny")
    model = momtune.MoMForCausalLM(cfg, backend="triton").eval()
    with torch.no_grad():
        model(ids)


def _env(var: str, value: str) -> Callable[[], None]:
    def run() -> None:
        from momtune.settings import load

        os.environ[var] = value
        try:
            load()
        finally:
            del os.environ[var]
    return run


@dataclass
class ApiCase:
    id: str
    run: Callable[[], None]
    says: str = ""  # "": must succeed (run asserts the result); else a MomtuneError containing this


CASES = [
    # ---- weights changed any way: the fast layer follows (issue 15, item 6)
    ApiCase("layer-weight-data-scaled", lambda: _same_after(_scale_gate)),
    ApiCase("layer-load-state-dict", lambda: _same_after(_load_other)),
    ApiCase("layer-to-double-and-back", lambda: _same_after(_round_trip)),
    # ---- bf16 in the interpreter (issue 15, item 7)
    ApiCase("layer-bf16-triton-in-the-interpreter",
            lambda: _call(_layers("triton", torch.bfloat16)[0], _x(torch.bfloat16)), says="bfloat16"),
    ApiCase("layer-bf16-auto-in-the-interpreter", _bf16_auto_runs_the_reference),
    # ---- inputs
    ApiCase("layer-wrong-hidden-size", lambda: _call(_layers()[0], torch.randn(2, 6, 31)), says="hidden_states"),
    ApiCase("layer-nan-input", lambda: _call(_layers()[0], torch.full((1, 3, 32), float("nan"))),
            says="hidden_states"),
    ApiCase("layer-mask-of-wrong-shape",
            lambda: _call(_layers()[0], _x(), attention_mask=torch.ones(2, 5, dtype=torch.bool)),
            says="attention_mask"),
    ApiCase("lm-token-out-of-vocab", lambda: _lm_forward(torch.tensor([[1, 2, 10_000]])), says="input_ids"),
    ApiCase("lm-negative-new-tokens", lambda: _lm_generate(max_new_tokens=-1), says="max_new_tokens"),
    ApiCase("lm-zero-temperature-sampling", lambda: _lm_generate(max_new_tokens=2, do_sample=True, temperature=0.0),
            says="temperature"),
    # ---- configuration
    ApiCase("dispatcher-unknown-policy", lambda: momtune.dispatch.Dispatcher(None, "lenient"), says="policy"),
    ApiCase("env-unknown-backend", _env("MOMTUNE_BACKEND", "cuda-fast"), says="MOMTUNE_BACKEND"),
    ApiCase("layer-unknown-backend", lambda: momtune.MoMAttention(**ARGS, backend="fast"), says="backend"),
]


@pytest.mark.skipif(not INTERP, reason="the kernels run in the interpreter here (make test sets TRITON_INTERPRET=1)")
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_api_use(case: ApiCase) -> None:
    outcome, detail = "", ""
    try:
        case.run()
    except MomtuneError as exc:
        if not case.says:
            outcome, detail = "unclear_error", f"refused a right use: {exc}"
        elif case.says.lower() not in str(exc).lower():
            outcome, detail = "unclear_error", f"the error does not say {case.says!r}: {exc}"
        else:
            outcome = "clear_error"
    except AssertionError as exc:
        outcome, detail = "silent_wrong", str(exc)
    except Exception as exc:  # noqa: BLE001 - what the suite is looking for
        outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"
    else:
        outcome = "ok" if not case.says else "silent_wrong"
        detail = "" if not case.says else "accepted where it had to refuse"
    OUTCOMES[outcome] += 1
    assert outcome in ("clear_error", "ok"), f"{outcome}: {detail}"
