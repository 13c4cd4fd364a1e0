"""SAS layers under every kind of differentiation, against the reference formulation in float64.

The ``sas::`` ops' own autograd serves ``backward()``. Before, the other kinds went wrong:
``torch.func.jvp`` and ``forward_ad`` returned zero tangents for every SAS layer, ``grad`` /
``jacrev`` / ``vmap`` of ``grad`` raised, and a backward with ``create_graph=True`` gave
second derivatives without the SAS layers (a gradient penalty left the SAS weights with no
gradient at all). Now the layers run their composite form there (``sas_ops``, *the composite
form*), whose derivatives are checked here against ``F.linear(reference_project(x), W)``
(the reference code's scatter formulation, differentiated by autograd).

SWAT layers in a training step refuse these uses with one clear error: their backward is
SWAT's training gradient, not the derivative of the forward.
"""
from __future__ import annotations

import contextlib
import io
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.runtime import sas_ops
from sas_compile.runtime.layers import SASConv1d, SASConv2d, SASLinear
from sas_compile.runtime.projection import get_rule, reference_project

DT = torch.float64


def test_the_out_of_place_scatter_is_the_reference_projection():
    x = torch.randn(3, 8, 5, dtype=DT)
    for M, dim in ((2, -1), (4, 1), (8, 1)):
        torch.testing.assert_close(scatter_project(x, M, dim), reference_project(x, M, dim), rtol=0, atol=0)


def scatter_project(x, M: int, dim: int):
    """``reference_project`` (the reference code's zero-filled tensor + scatter of ``|x|``) written
    out of place, which ``vmap`` can batch."""
    dim = dim % x.dim()
    slot = get_rule("sign_pattern", M).slot(x, dim).to(torch.int64).unsqueeze(dim + 1)
    shape = list(x.shape)
    shape.insert(dim + 1, M)
    wide = torch.zeros(shape, dtype=x.dtype, device=x.device).scatter(dim + 1, slot, x.abs().unsqueeze(dim + 1))
    return wide.flatten(dim, dim + 1)


def _reference_forward(layer):
    if isinstance(layer, SASLinear):
        return lambda x: F.linear(scatter_project(x, layer.M, -1), layer.weight, layer.bias)
    if isinstance(layer, SASConv1d):
        return lambda x: F.conv1d(scatter_project(x, layer.M, 1), layer.weight, layer.bias, layer.stride,
                                  layer.padding, layer.dilation, layer.groups)
    return lambda x: F.conv2d(scatter_project(x, layer.M, 1), layer.weight, layer.bias, layer.stride,
                              layer.padding, layer.dilation, layer.groups)


@contextlib.contextmanager
def reference_layers(model: nn.Module):
    """Every SAS layer of ``model`` computes the reference formulation, on its own parameters."""
    layers = [m for m in model.modules() if isinstance(m, (SASLinear, SASConv1d, SASConv2d))]
    assert layers
    for layer in layers:
        layer.forward = types.MethodType(lambda self, x: _reference_forward(self)(x), layer)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


def _mlp():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 8), nn.GELU(),
                          nn.Linear(8, 3)).to(DT)
    sas = sas_compile.sasify(dense, M=4)
    with torch.no_grad():  # trained-looking weights: no slot shares its partner's value, dead slots move
        for p in sas.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sas, torch.randn(5, 6, dtype=DT)


def _cnn():
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2), nn.Softplus(), nn.Flatten(),
                          nn.Linear(4 * 2 * 2, 3)).to(DT)
    sas = sas_compile.sasify(dense, M=2)
    with torch.no_grad():
        for p in sas.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sas, torch.randn(2, 3, 7, 7, dtype=DT)


def _conv1d():
    torch.manual_seed(2)
    dense = nn.Sequential(nn.Conv1d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv1d(6, 4, 5, padding="same"), nn.Tanh(),
                          nn.Conv1d(4, 2, 1)).to(DT)
    return sas_compile.sasify(dense, M=2), torch.randn(3, 2, 9, dtype=DT)


MODELS = {"mlp": _mlp, "cnn": _cnn, "conv1d": _conv1d}


def _close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def _gradient_penalty_grads(model, x):
    """d/d(x, params) of ||d sum(f(x)^2) / dx||^2: a double backward through every layer."""
    model.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_()
    g, = torch.autograd.grad(model(xs).square().sum(), xs, create_graph=True)
    penalty = g.square().sum()
    penalty.backward()
    return [g.detach(), xs.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", MODELS)
def test_double_backward_and_gradient_penalty_match_the_reference(name):
    model, x = MODELS[name]()
    got = _gradient_penalty_grads(model, x)
    with reference_layers(model):
        want = _gradient_penalty_grads(model, x)
    assert all(g is not None for g in got)  # every weight has its gradient-penalty gradient
    for a, b in zip(got, want):
        _close(a, b)


@pytest.mark.parametrize("name", MODELS)
def test_torch_func_transforms_match_the_reference(name):
    model, x = MODELS[name]()
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangent = torch.randn_like(x)

    def loss(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).square().sum()

    def transforms():
        out = {"jvp": torch.func.jvp(model, (x,), (tangent,))[1],
               "jacrev": torch.func.jacrev(model)(x),
               "hessian_x": torch.func.hessian(lambda xi: model(xi).square().sum())(x[:1]),
               "per_sample": torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x),
               "vmap": torch.func.vmap(lambda xi: model(xi.unsqueeze(0)).squeeze(0))(x)}
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            out["forward_ad"] = fwAD.unpack_dual(model(fwAD.make_dual(x, tangent))).tangent
        return out

    got = transforms()
    with reference_layers(model):
        want = transforms()
    for key in want:
        if isinstance(want[key], dict):
            for k in want[key]:
                _close(got[key][k], want[key][k])
        else:
            _close(got[key], want[key])
    assert got["jvp"].abs().max() > 0  # the tangent that used to come out as zeros


def test_a_rewritten_graph_calls_the_op_through_its_entry_point():
    """A functional layer (``F.linear`` on a parameter) makes sasify rewrite the graph: it calls
    ``sas_linear_call``, so transforms reach the composite form there too; the function is kept,
    so every derivative in x equals the dense model's."""
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.o = nn.Linear(6, 8), nn.Linear(8, 3)
            self.w = nn.Parameter(torch.randn(8, 8) * 0.3)

        def forward(self, x):
            return self.o(torch.tanh(F.linear(torch.tanh(self.a(x)), self.w)))

    torch.manual_seed(0)
    dense = Functional().to(DT)
    sas = sas_compile.sasify(dense, M=2)
    assert isinstance(sas, torch.fx.GraphModule)
    assert any(n.target is sas_ops.sas_linear_call for n in sas.graph.nodes)
    x, tangent = torch.randn(4, 6, dtype=DT), torch.randn(4, 6, dtype=DT)
    _close(torch.func.jvp(sas, (x,), (tangent,))[1], torch.func.jvp(dense, (x,), (tangent,))[1])
    _close(torch.func.jacrev(sas)(x), torch.func.jacrev(dense)(x))
    _close(_gradient_penalty_grads(sas, x)[1], _gradient_penalty_grads(dense, x)[1])
    buffer = io.BytesIO()
    torch.save(sas, buffer)
    buffer.seek(0)
    _close(torch.load(buffer, weights_only=False)(x), dense(x))
    with pytest.raises(ValueError, match="already has SAS layers: .*sas::linear"):
        sas_compile.swsify(sas, M=4)


def test_first_derivatives_are_the_ops_own_at_exact_zeros():
    """A ReLU feeds exact zeros; the op's derivative there is the one from the left (the dense
    layer's own for a function-preserving conversion). The composite form, which a
    ``create_graph=True`` backward runs, gives the same first derivatives."""
    torch.manual_seed(3)
    dense = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)
    sas = sas_compile.sasify(dense, M=2, fold_relu=False)
    x = torch.randn(7, 6, dtype=DT)
    assert (sas[3](sas[2](sas[1](sas[0](x)))) == 0).any()  # the last layer sees exact zeros

    def first(model, create_graph):
        xs = x.clone().requires_grad_()
        return torch.autograd.grad(model(xs).sum(), [xs, *model.parameters()], create_graph=create_graph)

    plain, recorded = first(sas, False), first(sas, True)
    for a, b in zip(plain, recorded):
        _close(a, b.detach())
    _close(plain[0], first(dense, False)[0])


@pytest.mark.parametrize("M", [2, 4, 8])
def test_composite_values_equal_the_op_on_nonfinite_inputs(M):
    """Dead slots (an all-zero weight column: a folded ReLU's) read 0, never 0 * inf."""
    torch.manual_seed(M)
    weight = torch.randn(5, 6 * M, dtype=DT)
    weight[:, 1::M] = 0
    x = torch.randn(4, 6, dtype=DT)
    x[0, 0], x[1, 2], x[2, 3], x[3, 5] = float("inf"), float("-inf"), float("nan"), 0.0
    want = torch.ops.sas.linear(x, weight, None, M, "sign_pattern")
    torch.testing.assert_close(sas_ops.projected_linear(x, weight, None, M, "sign_pattern"), want, equal_nan=True)
    conv_w = torch.randn(3, 6 * M, 3, 3, dtype=DT)
    conv_w[:, ::M] = 0
    xc = torch.randn(2, 6, 5, 5, dtype=DT)
    xc[0, 1, 2, 2], xc[1, 4, 0, 3] = float("inf"), float("-inf")
    want = torch.ops.sas.conv2d(xc, conv_w, None, [1, 1], [1, 1], [1, 1], 1, M, "sign_pattern")
    got = sas_ops.projected_conv2d(xc, conv_w, None, [1, 1], [1, 1], [1, 1], 1, M, "sign_pattern")
    torch.testing.assert_close(got, want, equal_nan=True)


def test_the_op_runs_outside_transforms_and_the_composite_inside():
    assert not sas_ops.composite_transform_active()
    seen = []
    torch.func.grad(lambda x: seen.append(sas_ops.composite_transform_active()) or x.sum())(torch.ones(2))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        seen.append(sas_ops.composite_transform_active())
    assert seen == [True, True] and not sas_ops.composite_transform_active()
    # a compiled SAS model still records the op (dynamo traces through the entry point)
    model, x = _mlp()
    ops = []

    def backend(gm, example_inputs):
        ops.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(model, backend=backend)(x), model(x))
    torch._dynamo.reset()
    assert ops.count(torch.ops.sas.linear) == 3


def test_swat_refuses_what_differentiates_its_training_gradient():
    torch.manual_seed(0)
    model = sas_compile.swatify(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                              nn.Linear(8, 3)).to(DT), sparsity=0.5)
    x = torch.randn(4, 6, dtype=DT)
    model.train()
    with pytest.raises(RuntimeError, match="not the derivative of the forward.*eval mode"):
        torch.func.jvp(model, (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match="create_graph=True: SWAT's backward"):
        xs = x.clone().requires_grad_()
        torch.autograd.grad(model(xs).sum(), xs, create_graph=True)
    model.eval()  # F.linear with the top-K weight: every transform differentiates it exactly
    dense_eval = [(m.sparse_weight(), m.bias) for m in model.modules() if hasattr(m, "sparse_weight")]

    def reference(inp):
        h = inp
        for i, (w, b) in enumerate(dense_eval):
            h = F.linear(h, w, b)
            h = torch.relu(h) if i < len(dense_eval) - 1 else h
        return h

    tangent = torch.ones_like(x)
    _close(torch.func.jvp(model, (x,), (tangent,))[1], torch.func.jvp(reference, (x,), (tangent,))[1])
    _close(torch.func.jacrev(model)(x), torch.func.jacrev(reference)(x))


@pytest.mark.parametrize("M", [2, 4])
def test_the_plain_op_form_has_the_ops_gradients(M):
    """``projected_linear`` / ``projected_conv2d`` (the composite form, and what the GPU lowering
    writes into compiled graphs) give the ops' own gradients: at exact zeros (the previous
    ``clamp_min`` planes passed both slots' gradients there) and for an all-zero weight column
    (its gradient was zeroed where the ops train it)."""
    torch.manual_seed(M)
    weight = torch.randn(5, 6 * M, dtype=DT)
    weight[:, 1::M] = 0  # dead slots, as a folded ReLU's
    x = torch.randn(4, 6, dtype=DT)
    x[0, 1] = x[2, 4] = x[3, 0] = 0.0
    conv_w = torch.randn(3, 6 * M, 3, 3, dtype=DT)
    conv_w[:, ::M] = 0
    xc = torch.randn(2, 6, 5, 5, dtype=DT)
    xc[0, 2, 1, 1] = xc[1, 5, 3, 0] = 0.0
    conf = ([1, 1], [1, 1], [1, 1], 1)
    for call, plain, inp, w in (
            (lambda a, b: torch.ops.sas.linear(a, b, None, M, "sign_pattern"),
             lambda a, b: sas_ops.projected_linear(a, b, None, M, "sign_pattern"), x, weight),
            (lambda a, b: torch.ops.sas.conv2d(a, b, None, *conf, M, "sign_pattern"),
             lambda a, b: sas_ops.projected_conv2d(a, b, None, *conf, M, "sign_pattern"), xc, conv_w)):
        grads = []
        for f in (call, plain):
            a, b = inp.clone().requires_grad_(), w.clone().requires_grad_()
            out = f(a, b)
            out.backward(torch.linspace(-1, 1, out.numel(), dtype=DT).view_as(out))
            grads.append((out.detach(), a.grad, b.grad))
        for want, got in zip(*grads):
            _close(got, want)
