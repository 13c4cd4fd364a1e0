"""The sas:: ops and the projection against float64 references built the slow, obvious way."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sas_compile
from sas_compile.layers import SASConv1d, SASConv2d, SASLinear
from sas_compile.runtime import sas_ops  # noqa: F401
from sas_compile.runtime.projection import expand_dense_weight, project, reference_project, slot_index

RULE = "sign_pattern"


def _slow_projection(x: torch.Tensor, M: int) -> torch.Tensor:
    """BRIEF section 1, element by element, for a 2-D (rows, channels) tensor."""
    b = M.bit_length() - 1
    rows, channels = x.shape
    out = torch.zeros(rows, channels * M, dtype=x.dtype)
    for r in range(rows):
        for g in range(0, channels, b):
            members = range(g, min(g + b, channels))
            pattern = sum(int(x[r, c] <= 0) << j for j, c in enumerate(members))
            for c in members:
                out[r, c * M + pattern] = abs(x[r, c])
    return out


@pytest.mark.parametrize("M", [2, 4, 8, 16])
@pytest.mark.parametrize("channels", [1, 5, 7, 12])
def test_projection_matches_the_rule(M, channels):
    torch.manual_seed(M * 100 + channels)
    x = torch.randn(6, channels, dtype=torch.float64)
    x[0, 0] = 0.0  # zero goes to the "<= 0" slot with value 0
    ref = _slow_projection(x, M)
    assert torch.equal(project(x, M), ref)
    assert torch.equal(reference_project(x, M), ref)
    # exactly one nonzero per M slots where x != 0
    nz = (project(x, M).view(6, channels, M) != 0).sum(-1)
    assert torch.equal(nz, (x != 0).long())


def test_m2_is_the_reference_sign_rule():
    x = torch.randn(3, 9, dtype=torch.float64)
    wide = project(x, 2).view(3, 9, 2)
    assert torch.equal(wide[..., 0], x.clamp_min(0))
    assert torch.equal(wide[..., 1], (-x).clamp_min(0))


def test_projection_along_channels_of_images():
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    for M in (2, 4):
        wide = project(x, M, dim=1)
        flat = x.permute(0, 2, 3, 1).reshape(-1, 5)
        ref = _slow_projection(flat, M).view(2, 4, 3, 5 * M).permute(0, 3, 1, 2)
        assert torch.equal(wide, ref)
        assert slot_index(x, M, 1).shape == x.shape


@pytest.mark.parametrize("M", [2, 4, 8])
def test_linear_op_forward_backward_float64(M):
    torch.manual_seed(M)
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 7 * M, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = torch.ops.sas.linear(x, w, b, M, RULE)
    ref = _slow_projection(x.detach().reshape(-1, 7), M).view(3, 4, 7 * M) @ w.detach().T + b.detach()
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.sas.linear(x, w, b, M, RULE), (x, w, b), fast_mode=True)


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("conf", [
    dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1),
    dict(stride=[2, 1], padding=[0, 2], dilation=[1, 2], groups=1),
    dict(stride=[1, 2], padding=[1, 0], dilation=[2, 1], groups=2),
    dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=6),  # depthwise
])
def test_conv_op_forward_backward_float64(M, conf):
    torch.manual_seed(M)
    x = torch.randn(2, 6, 7, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 6 // conf["groups"] * M, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    args = (conf["stride"], conf["padding"], conf["dilation"], conf["groups"], M, RULE)
    out = torch.ops.sas.conv2d(x, w, b, *args)
    flat = x.detach().permute(0, 2, 3, 1).reshape(-1, 6)
    wide = _slow_projection(flat, M).view(2, 7, 6, 6 * M).permute(0, 3, 1, 2)
    ref = F.conv2d(wide, w.detach(), b.detach(), conf["stride"], conf["padding"], conf["dilation"], conf["groups"])
    assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12)
    small = (x[:1, :, :4, :4].detach().clone().requires_grad_(), w[:, :, :2].detach().clone().requires_grad_(),
             b.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.sas.conv2d(x, w, b, *args), small, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("M", [2, 4])
def test_opcheck(M):
    torch.manual_seed(0)
    torch.library.opcheck(torch.ops.sas.linear.default, (torch.randn(3, 5), torch.randn(4, 5 * M), torch.randn(4), M, RULE))
    torch.library.opcheck(torch.ops.sas.linear.default, (torch.randn(2, 3, 5, requires_grad=True),
                                                         torch.randn(4, 5 * M, requires_grad=True), None, M, RULE))
    for x in (torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5).to(memory_format=torch.channels_last)):
        torch.library.opcheck(torch.ops.sas.conv2d.default,
                              (x.requires_grad_(), torch.randn(6, 4 * M, 3, 3, requires_grad=True),
                               torch.randn(6, requires_grad=True), [2, 1], [1, 1], [1, 1], 1, M, RULE))


def test_cpu_path_does_not_scatter_into_zeros():
    """The CPU ops build S(x) with one select; the reference code scatters into a zero tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x = torch.randn(2, 4, 6, 5)
    for call in (lambda: torch.ops.sas.conv2d(x, torch.randn(3, 8, 3, 3), None, [1, 1], [1, 1], [1, 1], 1, 2, RULE),
                 lambda: torch.ops.sas.linear(x, torch.randn(3, 10), None, 2, RULE)):
        with Record() as rec:
            call()
        assert not [op for op in rec.ops if "scatter" in op or "index_put" in op or "zeros" in op], rec.ops
    with Record() as rec:
        reference_project(x, 2)
    assert any("scatter" in op for op in rec.ops)  # the recorder does see a scatter when there is one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_layers_all_dtypes(dtype):
    torch.manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]
    lin = nn.Linear(9, 4).to(dtype)
    conv = nn.Conv2d(5, 6, 3, stride=2, padding=1).to(dtype)
    conv1 = nn.Conv1d(5, 6, 3, padding="same").to(dtype)
    for dense, sas_cls, x in ((lin, SASLinear, torch.randn(3, 9)), (conv, SASConv2d, torch.randn(2, 5, 7, 7)),
                              (conv1, SASConv1d, torch.randn(2, 5, 11))):
        x = x.to(dtype)
        sas = sas_cls.from_dense(dense, 2)
        out = sas(x)
        assert out.dtype == dtype
        ref = dense.double()(x.double())
        dense.to(dtype)
        assert ((out.double() - ref).norm() / ref.norm()).item() < tol
        out.float().sum().backward()
        assert sas.weight.grad.dtype == dtype


def test_fresh_sas_layers_train_from_scratch():
    torch.manual_seed(0)
    layer = SASLinear(6, 3, M=4)
    assert layer.weight.shape == (3, 24)
    bound = 1 / 6 ** 0.5
    assert layer.weight.abs().max() <= bound
    conv = SASConv2d(4, 5, 3, M=2, padding=1)
    assert conv.weight.shape == (5, 8, 3, 3)
    with pytest.raises(ValueError, match="power of two"):
        SASLinear(6, 3, M=3)


# ------------------------------------------------------------------ property test

@st.composite
def _stacks(draw):
    kind = draw(st.sampled_from(["linear", "conv"]))
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(1, 9)) for _ in range(depth + 1)]
    acts = [draw(st.sampled_from(["relu", "none", "tanh"])) for _ in range(depth)]
    M = draw(st.sampled_from([2, 4, 8]))
    seed = draw(st.integers(0, 2**16))
    ks = [draw(st.sampled_from([1, 2, 3])) for _ in range(depth)]
    return kind, widths, acts, M, seed, ks


class _Stack(nn.Module):
    def __init__(self, kind, widths, acts, ks):
        super().__init__()
        self.acts = acts
        if kind == "linear":
            self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        else:
            self.layers = nn.ModuleList(nn.Conv2d(a, b, k, padding=k // 2) for a, b, k in zip(widths, widths[1:], ks))

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts):
            x = layer(x)
            x = torch.relu(x) if act == "relu" else torch.tanh(x) if act == "tanh" else x
        return x


@settings(max_examples=40, deadline=None)
@given(_stacks())
def test_property_random_stacks_preserve_function(case):
    kind, widths, acts, M, seed, ks = case
    torch.manual_seed(seed)
    model = _Stack(kind, widths, acts, ks)
    x = torch.randn(3, widths[0]) if kind == "linear" else torch.randn(2, widths[0], 5, 4)
    sas = sas_compile.sasify(model, M=M, dense_input_layers=False)
    with torch.no_grad():
        ref, out = model(x), sas(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * (ref.abs().max().item() + 1e-3))


@pytest.mark.parametrize("target", ["torch", "emulator"])
@pytest.mark.parametrize("M", [2, 4])
def test_unfolded_conv_path_used_on_gpus(M, target):
    """The accelerator conv path (im2col into one sas_matmul), run on the CPU and in the kernel emulator."""
    from sas_compile.runtime.sas_ops import _sas_conv2d_unfolded

    torch.manual_seed(M)
    dtype = torch.float32 if target == "torch" else torch.float16
    x = torch.randn(2, 6, 7, 5).to(dtype)
    w = (torch.randn(5, 6 * M, 3, 2) * 0.3).to(dtype)
    b = torch.randn(5).to(dtype)
    out = _sas_conv2d_unfolded(x, w, b, [2, 1], [1, 1], [1, 2], 1, M, RULE, target=target)
    ref = F.conv2d(project(x.double(), M, 1), w.double(), b.double(), [2, 1], [1, 1], [1, 2])
    tol = 1e-5 if target == "torch" else 2e-3  # fp16 output rounding
    assert out.shape == ref.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("M", [2, 4])
def test_project_is_differentiable(M):
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: project(t, M), (x,))
    with torch.no_grad():
        assert torch.equal(project(x, M), _slow_projection(x.detach(), M))


def test_lowering_to_projection_keeps_the_function_and_gradients():
    """lower_sas_to_projection writes each SAS op as projection + dense op (what inductor fuses)."""
    from torch import nn

    from types import SimpleNamespace

    import sas_compile
    from sas_compile.passes.lower_sas_to_projection import lower_sas_to_projection
    from sas_compile.passes.plan import Plan

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(8, 6, 1),
                          nn.Flatten(), nn.Linear(6 * 5 * 5, 7)).eval()
    for M in (2, 4):
        sas = sas_compile.sasify(dense, M=M, dense_input_layers=False)
        gm = torch.fx.symbolic_trace(sas)
        before = sum(1 for n in gm.graph.nodes if str(n.target).startswith("sas."))
        assert before == 4
        # the device decides whether to lower at all; measure_kernels=False needs no GPU
        gpu = SimpleNamespace(device=torch.device("cuda"), measure_kernels=False)
        plan = lower_sas_to_projection(gm, Plan(layers=[], capture="symbolic_trace"), gpu)
        assert plan.lowered == before
        assert not any(str(n.target).startswith("sas.") for n in gm.graph.nodes)
        cpu = SimpleNamespace(device=torch.device("cpu"))
        assert lower_sas_to_projection(torch.fx.symbolic_trace(sas), Plan(layers=[], capture="dynamo"), cpu).lowered == 0
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        x2 = x.detach().clone().requires_grad_(True)
        torch.testing.assert_close(gm(x), sas(x2), rtol=1e-5, atol=1e-5)
        gm(x).square().sum().backward()
        sas(x2).square().sum().backward()
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)
        for (name, p), (_, q) in zip(gm.named_parameters(), sas.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
            p.grad = q.grad = None


@pytest.mark.slow
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("M", [2, 4])
def test_ops_from_a_dense_weight_equal_the_dense_layer_and_pass_opcheck(M, fold):
    """sas::linear_from_dense / sas::conv2d_from_dense: the dense layer's function, gradients to
    the dense weight through the expansion, opcheck-clean."""
    g = torch.Generator().manual_seed(M + 10 * fold)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lin_w = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    args_lin = (x, lin_w, b, M, fold, RULE, True)
    args_conv = (xc, w, b, [1, 2], [1, 0], [1, 1], 1, M, fold, RULE, True)
    want = torch.nn.functional.linear(x.relu() if fold else x, lin_w, b)
    torch.testing.assert_close(torch.ops.sas.linear_from_dense(*args_lin), want)
    want = torch.nn.functional.conv2d(xc.relu() if fold else xc, w, b, [1, 2], [1, 0])
    torch.testing.assert_close(torch.ops.sas.conv2d_from_dense(*args_conv), want)
    # gradients equal the dense layer's (gradcheck perturbs weights through .data, which the
    # expansion cache keyed on the version counter does not see: compare with autograd instead)
    for op, args, dense in (
        (torch.ops.sas.linear_from_dense, args_lin, lambda: torch.nn.functional.linear(x.relu() if fold else x, lin_w, b)),
        (torch.ops.sas.conv2d_from_dense, args_conv,
         lambda: torch.nn.functional.conv2d(xc.relu() if fold else xc, w, b, [1, 2], [1, 0])),
    ):
        inputs = [t for t in args if isinstance(t, torch.Tensor)]
        upstream = torch.randn_like(dense())
        got = torch.autograd.grad(op(*args), inputs, upstream)
        want = torch.autograd.grad(dense(), inputs, upstream)
        for a, c in zip(got, want):
            torch.testing.assert_close(a, c)
    torch.autograd.gradcheck(lambda t: torch.ops.sas.linear_from_dense(t, lin_w.detach(), b.detach(), M, fold, RULE,
                                                                       True), (x,))
    torch.library.opcheck(torch.ops.sas.linear_from_dense.default, args_lin)
    torch.library.opcheck(torch.ops.sas.conv2d_from_dense.default, args_conv)


def test_dense_weight_is_expanded_once_per_version():
    from sas_compile.runtime.sas_ops import wide_weight

    weight = torch.nn.Parameter(torch.randn(5, 4))
    first = wide_weight(weight, 2, True, RULE)
    assert wide_weight(weight, 2, True, RULE) is first  # cached
    assert wide_weight(weight, 4, True, RULE) is not first  # another M is another expansion
    with torch.no_grad():
        weight.mul_(2)  # an optimizer step bumps the version counter
    second = wide_weight(weight, 2, True, RULE)
    assert second is not first and torch.equal(second, 2 * first)


def test_backward_into_a_dense_weight_is_refused_unless_asked():
    from sas_compile.runtime.sas_ops import SASTrainingError

    x = torch.randn(3, 4)
    w = torch.randn(5, 4, requires_grad=True)
    out = torch.ops.sas.linear_from_dense(x, w, None, 2, False, RULE, False)
    with pytest.raises(SASTrainingError, match="train_dense"):
        out.sum().backward()
    # gradients to the input alone are fine (a frozen layer inside a trained model)
    xg = torch.randn(3, 4, requires_grad=True)
    torch.ops.sas.linear_from_dense(xg, w.detach(), None, 2, False, RULE, False).sum().backward()
    assert xg.grad is not None


def _counting(monkeypatch, module, name):
    """Replace ``module.name`` by a wrapper that counts its calls; returns the count (a list)."""
    calls, original = [0], getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_conv1d_under_the_backend_expands_its_dense_weight_once_per_version(monkeypatch):
    """A compiled dense Conv1d is expanded (and its dead slots found) once per weight version,
    as a Conv2d is: the op gets the dense parameter itself, never a per-call view of it."""
    from sas_compile.runtime import projection

    torch._dynamo.reset()
    expansions = _counting(monkeypatch, sas_ops, "expand_dense_weight")
    dead_slot_scans = _counting(monkeypatch, projection, "zero_columns")
    torch.manual_seed(0)
    # the first conv reads the network input and stays dense; the folded ReLU leaves dead slots
    model = nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Conv1d(4, 6, 3, padding=1)).eval()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    x = torch.randn(2, 3, 11)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
        assert expansions[0] == 1 and dead_slot_scans[0] == 1
        model[2].weight.add_(1)  # an optimizer-like in-place step bumps the version counter
        for _ in range(3):
            torch.testing.assert_close(compiled(x), model(x))
    assert expansions[0] == 2 and dead_slot_scans[0] == 2  # exactly one re-expansion
    torch._dynamo.reset()


def test_sasified_conv1d_finds_its_dead_slots_once_per_version(monkeypatch):
    """A SASConv1d passes its wide weight itself to sas::conv2d: the dead-slot cache hits,
    eagerly and under the backend (which keeps the SAS layer)."""
    from sas_compile.runtime import projection

    torch._dynamo.reset()
    scans = _counting(monkeypatch, projection, "zero_columns")
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv1d(3, 4, 1), nn.ReLU(), nn.Conv1d(4, 6, 3, padding=1)).eval()
    model = sas_compile.sasify(dense, M=2)  # the folded ReLU leaves dead slots
    assert isinstance(model[2], SASConv1d)
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    x = torch.randn(2, 3, 11)
    x[0, 0, 0] = float("inf")  # the SAS layer's input holds infinities: its dead slots are masked
    with torch.no_grad():
        for _ in range(3):
            for run in (model, compiled):
                torch.testing.assert_close(run(x), dense(x), equal_nan=True)
        assert scans[0] == 1
        model[2].weight.mul_(2)  # an optimizer-like in-place step: one new scan
        dense[2].weight.mul_(2)
        for _ in range(3):
            for run in (model, compiled):
                torch.testing.assert_close(run(x), dense(x), equal_nan=True)
    assert scans[0] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("M", [2, 4])
def test_conv_ops_take_a_conv1d_weight_as_a_kernel_of_height_one(M):
    """sas::conv2d / sas::conv2d_from_dense with a 3-D (conv1d) weight: the conv1d's function and
    gradients (the weight's gradient in its own shape), opcheck-clean."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(2, 6, 1, 9, generator=g, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(4, 3 * M, 3, generator=g, dtype=torch.float64, requires_grad=True)
    dense_w = torch.randn(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    conf = ([1, 2], [0, 1], [1, 1], 2)
    out = torch.ops.sas.conv2d(x, wide, b, *conf, M, RULE)
    ref = F.conv1d(project(x.detach().squeeze(2), M, 1), wide.detach(), b.detach(), 2, 1, 1, 2)
    torch.testing.assert_close(out.squeeze(2), ref)
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.sas.conv2d(x, w, b, *conf, M, RULE),
                                    (x, wide, b), fast_mode=True)
    args = (x, dense_w, b, *conf, M, True, RULE, True)
    dense = lambda: F.conv1d(x.squeeze(2).relu(), dense_w, b, 2, 1, 1, 2)  # noqa: E731
    torch.testing.assert_close(torch.ops.sas.conv2d_from_dense(*args).squeeze(2), dense())
    upstream = torch.randn_like(dense(), dtype=torch.float64)
    got = torch.autograd.grad(torch.ops.sas.conv2d_from_dense(*args).squeeze(2), (x, dense_w, b), upstream)
    want = torch.autograd.grad(dense(), (x, dense_w, b), upstream)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)
    torch.library.opcheck(torch.ops.sas.conv2d.default, (x, wide, b, *conf, M, RULE))
    torch.library.opcheck(torch.ops.sas.conv2d_from_dense.default, args)


@pytest.mark.parametrize("M", [2, 4])
def test_gradient_at_exact_zeros_is_the_dense_gradient(M):
    """At x = 0 the projection's derivative is the one from the left (0 is filed as nonpositive):
    a function-preserving SAS layer fed exact zeros (a ReLU's output, padding) back-propagates
    exactly the dense layer's input gradient, not 0."""
    torch.manual_seed(M)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64).clamp_min(0)  # about half exact zeros
    x[0, :, 0, 0] = 0.0  # a whole sign-pattern group at zero
    w = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    g = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    wide = expand_dense_weight(w, M)
    xs = x.clone().requires_grad_()
    torch.ops.sas.conv2d(xs, wide, None, [1, 1], [1, 1], [1, 1], 1, M, RULE).backward(g)
    xd = x.clone().requires_grad_()
    F.conv2d(xd, w, None, 1, 1).backward(g)
    assert torch.allclose(xs.grad, xd.grad, rtol=1e-12, atol=1e-12)
    lin_x = x.permute(0, 2, 3, 1).reshape(-1, 6)
    lin_w = torch.randn(3, 6, dtype=torch.float64)
    xs, xd = lin_x.clone().requires_grad_(), lin_x.clone().requires_grad_()
    gl = torch.randn(lin_x.shape[0], 3, dtype=torch.float64)
    torch.ops.sas.linear(xs, expand_dense_weight(lin_w, M), None, M, RULE).backward(gl)
    F.linear(xd, lin_w).backward(gl)
    assert torch.allclose(xs.grad, xd.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("M", [2, 4])
def test_input_gradient_equals_the_slow_rule_everywhere(M):
    """The input gradient (threshold_backward and gather, no masks) against the rule applied
    element by element: the wide gradient at the value's slot, +1 for x > 0, -1 otherwise."""
    torch.manual_seed(10 + M)
    x = torch.randn(7, 9, dtype=torch.float64)
    x[::3, ::2] = 0.0
    w = torch.randn(5, 9 * M, dtype=torch.float64)
    g = torch.randn(7, 5, dtype=torch.float64)
    xs = x.clone().requires_grad_()
    torch.ops.sas.linear(xs, w, None, M, RULE).backward(g)
    grad_wide = g @ w
    slot = slot_index(x, M).long()
    expected = torch.empty_like(x)
    for r in range(7):
        for c in range(9):
            value = grad_wide[r, c * M + slot[r, c]]
            expected[r, c] = value if x[r, c] > 0 else -value
    assert torch.equal(xs.grad, expected)


def test_transient_projection_is_the_projection_in_one_reused_workspace():
    from sas_compile.runtime.projection import dead_slots, project_transient, release_workspace

    torch.manual_seed(3)
    release_workspace()
    cases = [
        (torch.randn(5, 11), -1, None),
        (torch.randn(2, 6, 4, 3), 1, None),
        (torch.randn(2, 6, 4, 3).to(memory_format=torch.channels_last), 1, None),
        (torch.randn(3, 4, 5), 1, dead_slots(torch.cat([torch.zeros(2, 1), torch.randn(2, 7)], 1))),
    ]
    big = project_transient(torch.randn(8, 64), 4)  # grows the workspace past every case below
    pointers = {big.untyped_storage().data_ptr()}
    for M in (2, 4):
        for x, dim, dead in cases:
            if dead is not None and dead.shape[0] != x.shape[dim] * M:
                continue
            got = project_transient(x, M, dim, RULE, dead)
            # finite values: the dead slots (zero weight columns) need no zeroing, and keep |x|
            assert torch.equal(got, project(x, M, dim, RULE))
            if dead is not None:  # an infinite value: they are zeroed, as project() zeroes them
                poisoned = x.clone()
                poisoned[0, 0, 0] = float("inf")  # slot 0 of channel 0: the dead column
                assert torch.equal(project_transient(poisoned, M, dim, RULE, dead),
                                   project(poisoned, M, dim, RULE, dead))
                got = project_transient(x, M, dim, RULE, dead)
            assert got.is_contiguous(memory_format=torch.channels_last) == (x.dim() == 4 and not x.is_contiguous())
            pointers.add(got.untyped_storage().data_ptr())
    assert len(pointers) == 1  # every projection above lived in the same block
    # a workspace first made under inference_mode serves a training step afterwards
    release_workspace()
    w = torch.randn(4, 11 * 2, requires_grad=True)
    x = torch.randn(5, 11, requires_grad=True)
    with torch.inference_mode():
        torch.ops.sas.linear(x.detach(), w.detach(), None, 2, RULE)
    torch.ops.sas.linear(x, w, None, 2, RULE).sum().backward()
    assert torch.allclose(w.grad, project(x.detach(), 2).sum(0).expand(4, -1))


def test_transient_projection_is_per_thread():
    """Concurrent SAS layers on several threads never share a workspace."""
    import threading

    torch.manual_seed(4)
    inputs = [torch.randn(64, 33, dtype=torch.float64) for _ in range(4)]
    w = torch.randn(7, 66, dtype=torch.float64)
    expected = [_slow_projection(x, 2) @ w.T for x in inputs]
    failures = []

    def work(i):
        for _ in range(50):
            out = torch.ops.sas.linear(inputs[i], w, None, 2, RULE)
            if not torch.allclose(out, expected[i], rtol=1e-12, atol=1e-12):
                failures.append(i)
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_a_training_forward_shrinks_the_workspace_as_the_network_narrows_and_inference_keeps_it():
    """The workspace serves inference, the training forward and the backward. A recorded
    (training) layer that needs under a quarter of it frees it, so a step's peak (the end of its
    forward) holds no wide tensor of the wide early layers; layers of one size reuse it (no fresh
    block, no page faults, per layer)."""
    from sas_compile.runtime import projection

    torch.manual_seed(5)
    big, small = torch.randn(4, 6, 10, 10), torch.randn(4, 6, 4, 4)  # 2400 and 384 values: 6.25x
    w = torch.randn(3, 12, 3, 3, requires_grad=True)

    def layer(x):
        return torch.ops.sas.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, 2, RULE)

    def held():
        buffer = projection._workspace.buffers.get(torch.float32)
        return None if buffer is None else buffer.numel()

    projection.release_workspace()
    with torch.no_grad():
        layer(big), layer(small)
    assert held() == 2 * big.numel()  # inference keeps the largest
    layer(big).sum().backward()
    assert held() == 2 * big.numel()  # training at one size reuses it
    block = projection._workspace.buffers[torch.float32].data_ptr()
    layer(big)
    assert projection._workspace.buffers[torch.float32].data_ptr() == block  # the same block, not a fresh one
    out = layer(small)
    assert held() is None  # a layer needing under a quarter freed it
    out.sum().backward()
    assert held() == 2 * small.numel()  # the backward's recomputed projection
    assert w.grad is not None


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False), (False, False, True)])
def test_conv_backward_equals_autograd_through_the_projection(channels_last, needs):
    torch.manual_seed(6)
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(4, 12, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    g = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    torch.ops.sas.conv2d(*leaves, [2, 1], [1, 2], [1, 2], 1, 2, RULE).backward(g)
    refs = [t.clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    F.conv2d(_slow_projection(refs[0].permute(0, 2, 3, 1).reshape(-1, 6), 2).view(2, 7, 5, 12).permute(0, 3, 1, 2),
             refs[1], refs[2], [2, 1], [1, 2], [1, 2]).backward(g)
    for got, ref, need in zip(leaves, refs, needs):
        if need:
            assert torch.allclose(got.grad, ref.grad, rtol=1e-12, atol=1e-12)
        else:
            assert got.grad is None


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size, stride", [((7, 9), (2, 2)), ((8, 8), (2, 1)), ((5, 6), (3, 2))])
def test_strided_pointwise_conv_projects_only_the_positions_it_reads(monkeypatch, M, memory_format, size, stride):
    """A strided 1x1 SAS conv (ResNet's downsample) projects x[:, :, ::s, ::s] and convolves it
    with stride 1: the same values and gradients as the reference formulation, in float64, on
    ragged sizes; the skipped positions get a zero input gradient."""
    seen = []
    real = sas_ops.project_transient

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(sas_ops, "project_transient", spy)
    torch.manual_seed(M)
    x = torch.randn(3, 10, *size, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    w = torch.randn(6, 10 * M, 1, 1, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = torch.ops.sas.conv2d(x, w, b, list(stride), [0, 0], [1, 1], 1, M, RULE)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = F.conv2d(reference_project(xr, M, 1), wr, br, stride)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert out.is_contiguous(memory_format=memory_format)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    read = (3, 10, len(range(0, size[0], stride[0])), len(range(0, size[1], stride[1])))
    assert seen == [read, read]  # the forward and the backward's recomputation: subsampled
    skipped = torch.ones_like(x, dtype=torch.bool)
    skipped[:, :, ::stride[0], ::stride[1]] = False
    assert not x.grad[skipped].any()


def test_strided_conv1d_pointwise_and_dense_weight_ops_take_the_same_path():
    torch.manual_seed(0)
    conv = nn.Conv1d(8, 5, 1, stride=2).double()
    x = torch.randn(2, 8, 11, dtype=torch.float64, requires_grad=True)
    sas = sas_compile.sasify(nn.Sequential(nn.ReLU(), conv), M=2, dense_input_layers=False)
    torch.testing.assert_close(sas(x), conv(torch.relu(x)), rtol=1e-12, atol=1e-12)
    sas(x).sum().backward()
    xr = x.detach().clone().requires_grad_()
    conv(torch.relu(xr)).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    with torch.no_grad():  # a dense model's strided 1x1 conv under backend="sas": the from-dense op
        down = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2)).double()
        xi = torch.randn(2, 3, 9, 9, dtype=torch.float64)
        out = torch.compile(down, backend="sas", options={"inner": "eager", "M": 4})(xi)
    torch.testing.assert_close(out, down(xi), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel, stride", [(3, 1), (1, 2)])
def test_a_large_backward_runs_in_batch_chunks_with_the_same_gradients(monkeypatch, M, memory_format, kernel, stride):
    """Above BACKWARD_CHUNK_BYTES the backward recomputes and uses the projection a batch chunk at a
    time (5 images in chunks of 2, 2, 1 here): the gradients equal the reference's in float64."""
    torch.manual_seed(M + kernel)
    pad = kernel // 2
    x = torch.randn(5, 6, 9, 7, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    w = torch.randn(4, 6 * M, kernel, kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    read = len(range(0, 9, stride)) * len(range(0, 7, stride))  # positions a strided 1x1 kernel reads
    monkeypatch.setattr(sas_ops, "BACKWARD_CHUNK_BYTES", 2 * 6 * M * read * 8)  # two images' wide input
    out = torch.ops.sas.conv2d(x, w, b, [stride, stride], [pad, pad], [1, 1], 1, M, RULE)
    ref = F.conv2d(reference_project(xr, M, 1), wr, br, stride, pad)
    g = torch.randn_like(ref)
    with torch.profiler.profile() as prof:
        out.backward(g)
    ref.backward(g)
    calls = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(calls) == 3
    for got, want in ((x.grad, xr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert x.grad.is_contiguous(memory_format=memory_format)
    small = (x.detach()[:3, :, :5, :5].clone().requires_grad_(), w.detach().clone().requires_grad_())
    monkeypatch.setattr(sas_ops, "BACKWARD_CHUNK_BYTES", 1)  # one image per chunk
    assert torch.autograd.gradcheck(
        lambda a, c: torch.ops.sas.conv2d(a, c, None, [stride, stride], [pad, pad], [1, 1], 1, M, RULE), small,
        fast_mode=True)


@pytest.mark.parametrize("kernel, stride", [(3, 1), (1, 2)])
def test_an_empty_batch_has_empty_and_zero_gradients(kernel, stride):
    x = torch.randn(0, 4, 5, 5, requires_grad=True)
    w = torch.randn(3, 8, kernel, kernel, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    out = torch.ops.sas.conv2d(x, w, b, [stride, stride], [kernel // 2] * 2, [1, 1], 1, 2, RULE)
    assert out.shape[0] == 0
    out.sum().backward()
    assert x.grad.shape == x.shape and not w.grad.any() and not b.grad.any()
