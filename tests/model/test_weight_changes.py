"""The fast layer and LM notice every way of changing a weight (issue 15, item 6).

The fast layer's projection weights are views of its fused, aligned projection weight, so an
in-place change (``.data``, ``copy_``, ``load_state_dict``, an optimizer step) is a change of
the fused weight; a weight that stops being its view (``to()``, a new Parameter,
``load_state_dict(assign=True)``, ``.data = ...``, ``functional_call``, a parametrization) is
noticed by its address and the fused weight rebuilt. Each route: after the change the Triton
output equals the reference's (changed the same way) and differs from the output before.
"""
from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
from torch import nn

import momtune
from momtune.errors import InputError
from tests.helpers import assert_close

INTERP = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
needs_kernels = pytest.mark.skipif(not INTERP and not torch.cuda.is_available(),
                                   reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (interpreter)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ARGS = {"hidden_size": 32, "head_dim": 16, "num_heads": 2, "expand_v": 1, "num_memories": 3, "topk": 2,
        "shared_mem": True, "norm_eps": 1e-5, "layer_idx": 0}
TOL = 2e-3  # float32, as tests/model/test_fast_model.py


def _pair(seed: int = 0, backend: str = "triton", **kw):
    """A fast layer and a reference layer with the same weights (conv weights and decays larger
    than the init, so every term matters)."""
    args = {**ARGS, **kw}
    torch.manual_seed(seed)
    fast = momtune.MoMAttention(**args, backend=backend).to(DEVICE)
    with torch.no_grad():
        for conv in (fast.q_conv1d, fast.k_conv1d, fast.v_conv1d):
            conv.weight.normal_(0, 0.5)
        fast.A_log.copy_(torch.linspace(-1, 1, fast.num_heads))
    ref = momtune.reference.MoMAttention(**args).to(DEVICE)
    ref.load_state_dict(fast.state_dict())
    return fast.eval(), ref.eval()


def _x(seed: int = 100) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(2, 6, 32, device=DEVICE)


def _assert_flat(fast: momtune.MoMAttention) -> None:
    """Every projection weight is a view of the layer's fused weight (as it is, not rebuilt here)
    at its row block; padding rows are 0."""
    fused = fast._fused
    assert fused is not None
    rows, total = fast._projection_rows()
    assert fused.shape == (total, fast.hidden_size)
    covered = torch.zeros(total, dtype=torch.bool)
    for (name, w), r in zip(fast._projection_names(), rows):
        assert w.data_ptr() == fused[r].data_ptr() and w.shape[0] <= total - r, \
            f"{name} is not the view of the fused weight at row {r}"
        covered[r:r + w.shape[0]] = True
    assert not fused[~covered.to(fused.device)].any(), "the padding rows of the fused weight are zero"


def _assert_moved(got: torch.Tensor, before: torch.Tensor) -> None:
    """The change shows: the output before it is off the new output by well over the tolerance
    (so a stale fused weight fails the comparison with the reference)."""
    moved = (got - before).abs().max().item()
    assert moved > 5 * TOL, f"the change must show in the output (moved {moved:.2e}, tolerance {TOL:g})"


def _outputs(fast, ref, x):
    with torch.no_grad():
        return fast(x)[0], ref(x)[0]


def _check_route(change, seed: int = 0) -> None:
    """``change(layer)`` applied to the fast and the reference layer: the Triton output follows."""
    fast, ref = _pair(seed)
    x = _x()
    before, _ = _outputs(fast, ref, x)  # builds and uses the fused weight
    change(fast)
    change(ref)
    got, want = _outputs(fast, ref, x)
    assert_close("o after the change", got, want, TOL, TOL)
    _assert_moved(got, before)
    _assert_flat(fast)


def _new_values(layer: nn.Module, seed: int = 7) -> dict[str, torch.Tensor]:
    """Fresh values for a few projection weights (the same for every layer given the same seed)."""
    gen = torch.Generator().manual_seed(seed)
    names = ("q_proj.weight", "g_proj.weight", "gate.weight", "k_proj.1.weight", "v_proj.0.weight", "shared_a.weight")
    params = dict(layer.named_parameters())
    return {n: (torch.randn(params[n].shape, generator=gen) * 0.3).to(DEVICE) for n in names}


# ---------------------------------------------------------------- the routes, layer
@needs_kernels
def test_data_mul_shows():
    """The filed bug: ``.data`` has its own version counter, so a cache keyed on versions missed it."""
    def change(layer):
        for lin in (layer.q_proj, layer.g_proj, layer.k_proj[1], layer.shared_v):
            lin.weight.data.mul_(-2)
    _check_route(change)


@needs_kernels
def test_weight_copy_shows():
    def change(layer):
        params = dict(layer.named_parameters())
        with torch.no_grad():
            for name, value in _new_values(layer).items():
                params[name].copy_(value)
    _check_route(change)


@needs_kernels
def test_data_copy_shows():
    def change(layer):
        params = dict(layer.named_parameters())
        for name, value in _new_values(layer).items():
            params[name].data.copy_(value)
    _check_route(change)


@needs_kernels
@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_load_state_dict_shows(assign):
    torch.manual_seed(5)
    other = momtune.reference.MoMAttention(**ARGS).to(DEVICE).state_dict()

    def change(layer):
        layer.load_state_dict({k: v.clone() for k, v in other.items()}, assign=assign)
    _check_route(change)


@needs_kernels
def test_to_dtype_and_back_shows():
    """``.double()`` (a change in float64) then ``.float()``: the fused weight follows each
    conversion at once (the old one is not kept) and the weights stay its views."""
    fast, ref = _pair()
    x = _x()
    before, _ = _outputs(fast, ref, x)
    for layer in (fast, ref):
        layer.double()
        layer.q_proj.weight.data.mul_(-2)
        layer.g_proj.weight.data.mul_(-2)
    assert fast._fused.dtype == torch.float64
    _assert_flat(fast)
    fast.float()
    ref.float()
    assert fast._fused.dtype == torch.float32
    _assert_flat(fast)
    got, want = _outputs(fast, ref, x)
    assert_close("o after .double() / change / .float()", got, want, TOL, TOL)
    _assert_moved(got, before)


@needs_kernels
def test_new_parameter_shows():
    def change(layer):
        for name, value in _new_values(layer).items():
            *path, leaf = name.split(".")
            setattr(layer.get_submodule(".".join(path)), leaf, nn.Parameter(value.clone()))
        layer.k_proj[2] = nn.Linear(32, 32, bias=False).to(DEVICE)  # a new module, too
        with torch.no_grad():
            layer.k_proj[2].weight.copy_(_new_values(layer, seed=8)["k_proj.1.weight"])
    _check_route(change)


@needs_kernels
def test_data_assignment_shows():
    def change(layer):
        params = dict(layer.named_parameters())
        for name, value in _new_values(layer).items():
            params[name].data = value.clone()
    _check_route(change)


@needs_kernels
def test_optimizer_step_on_the_reference_then_triton():
    """backend 'auto' trains on the reference (gradients of the fused weight's views equal the
    reference's), an optimizer step writes into the fused weight, and the next Triton call sees it."""
    fast, ref = _pair(backend="auto")
    x = _x()
    before, _ = _outputs(fast, ref, x)
    grads = []
    for layer in (fast, ref):
        layer.train()
        opt = torch.optim.SGD(layer.parameters(), lr=50.0)
        with warnings.catch_warnings():  # 'auto' says once that it trains on the reference
            warnings.simplefilter("ignore")
            loss = (layer(_x(1))[0] ** 2).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        opt.step()
        layer.eval()
    for name, g in grads[1].items():
        assert_close(f"grad {name}", grads[0][name], g, 1e-5, 1e-4)
    got, want = _outputs(fast, ref, x)
    assert_close("o after the step", got, want, TOL, TOL)
    _assert_moved(got, before)
    _assert_flat(fast)


@needs_kernels
def test_functional_call_uses_the_given_weights_and_leaves_them_alone():
    """torch.func.functional_call swaps in plain tensors for one call: that call rebuilds from
    them (they are not re-pointed), and the module's own weights are back afterwards."""
    fast, ref = _pair()
    x = _x()
    before, _ = _outputs(fast, ref, x)
    given = _new_values(fast)
    ptrs = {n: t.data_ptr() for n, t in given.items()}
    with torch.no_grad():
        got = torch.func.functional_call(fast, given, (x,))[0]
        want = torch.func.functional_call(ref, given, (x,))[0]
    assert_close("o(functional_call)", got, want, TOL, TOL)
    _assert_moved(got, before)
    assert {n: t.data_ptr() for n, t in given.items()} == ptrs, "the caller's tensors are not re-pointed"
    again, _ = _outputs(fast, ref, x)
    assert torch.equal(again, before)
    _assert_flat(fast)


@needs_kernels
def test_parametrized_weight_rebuilds_every_call():
    """A parametrization computes the weight at every access: it can never be a view, so every
    call rebuilds the fused weight, and a change of the parametrization's original shows."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    fast, ref = _pair()
    x = _x()
    before, _ = _outputs(fast, ref, x)
    for layer in (fast, ref):
        parametrize.register_parametrization(layer.g_proj, "weight", Twice())
    got, want = _outputs(fast, ref, x)
    assert_close("o(parametrized)", got, want, TOL, TOL)
    _assert_moved(got, before)
    for layer in (fast, ref):
        layer.g_proj.parametrizations.weight.original.data.mul_(-1)
    got2, want2 = _outputs(fast, ref, x)
    assert_close("o(parametrized, original changed)", got2, want2, TOL, TOL)
    _assert_moved(got2, got)


# ---------------------------------------------------------------- what must keep working
def test_names_parameters_and_state_dict_are_the_references():
    fast, ref = _pair()
    _assert_flat(fast)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in ref.parameters())
    params, state = dict(fast.named_parameters()), fast.state_dict()
    assert list(state) == list(ref.state_dict())
    for name, w in fast._projection_names():
        assert params[name] is w and isinstance(w, nn.Parameter) and w.is_leaf
        assert torch.equal(state[name], ref.state_dict()[name])
        assert state[name].data_ptr() == w.data_ptr(), "state_dict values are the live weights"


@pytest.mark.parametrize("kw", [{}, {"shared_mem": False}, {"single_kv_proj": True}],
                         ids=["shared", "noshared", "single_kv_proj"])
def test_projection_weights_are_the_layouts_blocks(kw):
    """The fused weight's row blocks hold q_proj, g_proj, gate, then memory_linears(m) of each slot."""
    fast, _ = _pair(**kw)
    want = [fast.q_proj.weight, fast.g_proj.weight, fast.gate.weight]
    for m in range(1 if fast.single_kv_proj else fast.num_slots):
        want += [lin.weight for lin in fast.memory_linears(m)]
    assert len(fast._projection_weights()) == len(want)
    assert all(a is b for a, b in zip(fast._projection_weights(), want))
    _assert_flat(fast)
    x2 = torch.randn(5, 32, device=DEVICE)
    q, gate, logits, k, v, b, a = fast._project(x2)
    assert_close("q", q, x2 @ fast.q_proj.weight.T, 1e-5, 1e-5)
    assert_close("gate", gate, x2 @ fast.g_proj.weight.T, 1e-5, 1e-5)
    assert_close("logits", logits, x2 @ fast.gate.weight.T, 1e-5, 1e-5)
    for m in range(fast.num_slots):
        for lin, t in zip(fast.memory_linears(m), (k, v, b, a)):
            assert_close(f"slot {m}", t[:, m], x2 @ lin.weight.T, 1e-5, 1e-5)


def test_requires_grad_and_identity_survive_a_rebuild():
    fast, _ = _pair()
    fast.q_proj.weight.requires_grad_(False)
    before = {n: (p, p.requires_grad) for n, p in fast.named_parameters()}
    fast.double().float()
    fast.gate.weight.data = fast.gate.weight.data.clone()
    fast._fused_weight()
    after = {n: (p, p.requires_grad) for n, p in fast.named_parameters()}
    assert all(after[n][0] is p and after[n][1] == rg for n, (p, rg) in before.items()), \
        "a rebuild keeps each Parameter object (optimizers hold them) and its requires_grad"
    _assert_flat(fast)


@needs_kernels
def test_deepcopy_is_independent():
    fast, ref = _pair()
    x = _x()
    before, _ = _outputs(fast, ref, x)
    twin = copy.deepcopy(fast)
    twin.g_proj.weight.data.mul_(-2)
    ref.g_proj.weight.data.mul_(-2)
    got, want = _outputs(twin, ref, x)
    assert_close("o(changed copy)", got, want, TOL, TOL)
    _assert_moved(got, before)
    assert torch.equal(_outputs(fast, ref, x)[0], before), "the original is untouched"
    _assert_flat(twin)


@needs_kernels
def test_torch_save_load_of_module_and_state_dict():
    fast, ref = _pair()
    x = _x()
    before, _ = _outputs(fast, ref, x)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    _assert_flat(loaded)  # views of one storage stay views of one storage
    assert torch.equal(_outputs(loaded, ref, x)[0], before)
    loaded.g_proj.weight.data.mul_(-2)  # the loaded module notices changes too
    changed = _outputs(loaded, ref, x)[0]
    _assert_moved(changed, before)

    buf = io.BytesIO()
    torch.save(loaded.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    ref.load_state_dict(state)
    fast.load_state_dict(state)
    got, want = _outputs(fast, ref, x)
    assert_close("o(loaded state_dict)", got, want, TOL, TOL)
    assert torch.equal(got, changed)
    _assert_flat(fast)


def test_safetensors_round_trip():
    """The weights share one storage without overlapping: safetensors saves them."""
    st = pytest.importorskip("safetensors.torch")
    fast, ref = _pair()
    data = st.save(fast.state_dict())
    ref.load_state_dict(st.load(data), strict=True)
    for name, w in fast.state_dict().items():
        assert torch.equal(ref.state_dict()[name], w), name


def test_rebuilt_under_inference_mode_still_trains():
    """The fused weight is never an inference tensor: a layer whose fused weight was rebuilt
    under torch.inference_mode() (as a Triton call there does) still trains afterwards."""
    fast, _ = _pair(backend="reference")
    with torch.inference_mode():
        fast.g_proj.weight.data = fast.g_proj.weight.data.clone()  # an inference tensor
        fast._fused_weight()
    assert not fast._fused.is_inference() and not fast.g_proj.weight.is_inference()
    fast.train()
    (fast(_x())[0] ** 2).sum().backward()
    assert all(p.grad is not None for p in fast.parameters())


@needs_kernels
def test_weights_of_mixed_dtypes_are_named():
    fast, _ = _pair()
    fast.k_proj[1].weight.data = fast.k_proj[1].weight.data.double()
    with torch.no_grad(), pytest.raises(InputError, match=r"k_proj\.1\.weight is torch\.float64"):
        fast(_x())


@pytest.mark.parametrize("single", [False, True], ids=["per-memory", "single_kv_proj"])
def test_padding_rows_stay_zero(single):
    fast, _ = _pair(num_memories=3, single_kv_proj=single)
    _assert_flat(fast)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    fast.load_state_dict({k: v + 1 for k, v in fast.state_dict().items()})
    _assert_flat(fast)
    fast.double()
    _assert_flat(fast)


# ---------------------------------------------------------------- the LM
def _lm_pair(seed: int = 0):
    cfg = momtune.MoMConfig.from_preset("tiny")
    torch.manual_seed(seed)
    fast = momtune.MoMForCausalLM(cfg, backend="triton").to(DEVICE).eval()
    ref = momtune.reference.MoMForCausalLM(cfg).to(DEVICE).eval()
    ref.load_state_dict(fast.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 5), device=DEVICE)
    return fast, ref, ids


def _lm_check(change, seed: int = 0) -> None:
    fast, ref, ids = _lm_pair(seed)
    with torch.no_grad():
        before = fast(ids).logits
    change(fast)
    change(ref)
    with torch.no_grad():
        got, want = fast(ids).logits, ref(ids).logits
    assert_close("logits after the change", got, want, TOL, TOL)
    _assert_moved(got, before)
    for block in fast.model.layers:
        _assert_flat(block.attn)


@needs_kernels
def test_lm_data_changes_show():
    """``.data`` changes of an attention projection, an MLP weight and a norm weight."""
    def change(lm):
        layers = lm.model.layers
        layers[0].attn.g_proj.weight.data.mul_(-2)
        layers[1].attn.gate.weight.data.mul_(5)
        layers[1].mlp.gate_proj.weight.data.mul_(3)
        layers[0].mlp_norm.weight.data.mul_(2)
        lm.model.norm.weight.data.mul_(-1)
    _lm_check(change)


@needs_kernels
def test_lm_load_state_dict_shows():
    cfg = momtune.MoMConfig.from_preset("tiny")
    torch.manual_seed(9)
    other = momtune.reference.MoMForCausalLM(cfg).to(DEVICE).state_dict()
    with torch.no_grad():  # norms away from 1, so a stale norm weight would show
        for v in other.values():
            if v.dim() == 1:
                v.uniform_(0.5, 1.5)
    _lm_check(lambda lm: lm.load_state_dict(other))


@needs_kernels
def test_lm_to_dtype_and_back_shows():
    def change(lm):
        lm.double()
        lm.model.layers[0].attn.g_proj.weight.data.mul_(-2)
        lm.float()
    _lm_check(change)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graph_generate_sees_weight_changes():
    """``generate`` captures the decode step per call: after a ``.data`` change the graph's tokens
    equal eager decoding's with the changed weights; a parametrized weight (never a view, so
    rebuilt inside the capture) neither breaks the graph nor gets re-pointed into its memory."""
    from torch.nn.utils import parametrize

    cfg = momtune.MoMConfig.from_preset("tiny", hidden_size=256, head_dim=64, num_heads=4)
    torch.manual_seed(0)
    model = momtune.MoMForCausalLM(cfg, backend="triton").cuda().eval()
    ref = momtune.reference.MoMForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 9), device="cuda")
    with torch.no_grad():
        before = model(ids).logits
    model.generate(ids, 4)  # a graph over the old weights
    for block in model.model.layers:
        block.attn.g_proj.weight.data.mul_(-3)
        block.attn.gate.weight.data.mul_(5)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert_close("logits after the change", got, want, TOL, TOL)
    _assert_moved(got, before)
    assert torch.equal(model.generate(ids, 6), model.generate(ids, 6, cuda_graph=False))

    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    attn = model.model.layers[0].attn
    parametrize.register_parametrization(attn.v_proj[1], "weight", Twice())
    original = attn.v_proj[1].parametrizations.weight.original
    ptr = original.data_ptr()
    assert torch.equal(model.generate(ids, 6), model.generate(ids, 6, cuda_graph=False))
    assert original.data_ptr() == ptr
    _assert_flat_except(attn, "v_proj.1.weight")


def _assert_flat_except(fast: momtune.MoMAttention, skip: str) -> None:
    fused = fast._fused
    rows, _ = fast._projection_rows()
    for (name, w), r in zip(fast._projection_names(), rows):
        if name != skip:
            assert w.data_ptr() == fused[r].data_ptr(), name
