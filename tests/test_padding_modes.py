"""Convolutions with ``padding_mode`` reflect, replicate or circular convert to SAS.

Such a layer pads its input with ``F.pad`` and convolves without padding. Those modes copy
values, and ``S`` acts on each value alone, so ``S(pad(x)) == pad(S(x))``: the SAS layer pads
the narrow input and projects it. Before, these layers stayed dense under ``sasify`` ("SAS
convolutions support only zero padding") while ``torch.compile(backend="sas")``, which sees the
pad as its own op, converted them. Checked in float64 against the reference formulation
(``reference_project``: the reference code's zero-filled tensor and scatter) on ragged sizes.
"""
from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.runtime.layers import SASConv1d, SASConv2d
from sas_compile.runtime.projection import reference_project

DT = torch.float64
MODES = ["reflect", "replicate", "circular"]


def _pad_amounts(layer, dims: int):
    """F.pad's amounts of a dense conv's padding, written out here (last dimension first)."""
    amounts = []
    for i in reversed(range(dims)):
        if layer.padding == "same":
            total = layer.dilation[i] * (layer.kernel_size[i] - 1)
            amounts += [total // 2, total - total // 2]
        else:
            amounts += [layer.padding[i]] * 2
    return amounts


def _reference(layer, x):
    """The SAS layer's function by the reference formulation: pad the input, project it by
    scatter, convolve the wide tensor with the layer's wide weight and no padding."""
    dims = x.dim() - 2
    padded = F.pad(x, _pad_amounts(layer, dims), mode=layer.padding_mode)
    conv = F.conv2d if dims == 2 else F.conv1d
    return conv(reference_project(padded, layer.M, 1), layer.weight, layer.bias, layer.stride, 0, layer.dilation,
                layer.groups)


def _model(mode: str, dims: int, padding, activation: nn.Module):
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    torch.manual_seed(0)
    return nn.Sequential(
        conv(3, 6, 3, padding=1, padding_mode=mode), nn.Tanh(),
        conv(6, 8, 4 if padding == "same" else 3, padding=padding, padding_mode=mode,
             dilation=2 if padding == "same" else 1),
        activation,
        conv(8, 4, 3, stride=2, padding=1, padding_mode=mode, groups=2),
    ).to(DT).eval()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("padding,activation,M", [
    ((1, 2), nn.ReLU(), 2),       # asymmetric padding, ReLU folded into the next layer
    ("same", nn.Tanh(), 4),       # 'same' with an even kernel pads one more on the right
    (2, nn.ReLU(), 8),
])
def test_sasify_converts_and_matches_reference(mode, dims, padding, activation, M):
    if dims == 1 and isinstance(padding, tuple):
        padding = padding[1]
    dense = _model(mode, dims, padding, activation)
    shape = (2, 3, 11, 13) if dims == 2 else (2, 3, 17)
    x = torch.randn(shape, dtype=DT)
    sas = sas_compile.sasify(dense, M=M)
    assert type(sas) is nn.Sequential
    assert [layer.name for layer in sas.sas_plan.eligible()] == ["2", "4"], sas.sas_plan
    layers = [sas[2], sas[4]]
    for layer in layers:
        assert isinstance(layer, SASConv2d if dims == 2 else SASConv1d)
        assert layer.padding_mode == mode and f"padding_mode='{mode}'" in repr(layer)
    with torch.no_grad():  # function-preserving from the dense weights
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-10, atol=1e-12)

    # trained-looking wide weights: each layer against the reference, values and gradients
    with torch.no_grad():
        for p in sas.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    for layer in layers:
        inp = torch.randn(2, layer.in_channels, *shape[2:], dtype=DT, requires_grad=True)
        got = layer(inp)
        grad_out = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, (inp, layer.weight, layer.bias), grad_out)
        want = _reference(layer, inp)
        want_grads = torch.autograd.grad(want, (inp, layer.weight, layer.bias), grad_out)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_backend_on_sasified_and_dense_models(mode):
    dense = _model(mode, 2, 1, nn.ReLU()).float()
    x = torch.randn(2, 3, 9, 10)
    sas = sas_compile.sasify(dense, M=2)
    torch._dynamo.reset()
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(torch.compile(sas, backend="sas")(x), want, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(dense, backend="sas")(x), want, rtol=1e-5, atol=1e-5)


class Branchy(nn.Module):
    """Data-dependent control flow: symbolic tracing fails, sasify captures with dynamo and swaps modules."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, padding_mode="reflect")
        self.c = nn.Conv2d(6, 2, 3, padding=(1, 2), padding_mode="circular")

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if h.sum() > 0:
            h = h * 2
        return self.c(torch.tanh(self.b(h)))


def test_dynamo_capture_swaps_padded_convolutions():
    torch.manual_seed(0)
    model = Branchy().to(DT).eval()
    x = torch.randn(2, 3, 7, 8, dtype=DT)
    sas = sas_compile.sasify(model, M=4, example_inputs=(x,))
    assert sas.sas_plan.capture == "dynamo" and type(sas) is Branchy
    assert [layer.name for layer in sas.sas_plan.eligible()] == ["b", "c"]
    assert sas.c.padding_mode == "circular"
    with torch.no_grad():
        for sign in (1, -1):  # both sides of the branch
            torch.testing.assert_close(sas(sign * x), model(sign * x), rtol=1e-10, atol=1e-12)


def test_constructor_and_errors():
    layer = SASConv2d(4, 5, 3, M=2, padding=(1, 2), padding_mode="replicate").to(DT)
    x = torch.randn(2, 4, 6, 7, dtype=DT)
    torch.testing.assert_close(layer(x), _reference(layer, x), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="padding_mode='mirror'.*'reflect'"):
        SASConv1d(4, 5, 3, padding_mode="mirror")
    # a layer pickled before padding modes existed has no such attribute: it pads with zeros
    old = SASConv2d(4, 5, 3, M=2, padding=1).to(DT)
    del old.__dict__["padding_mode"]
    copy = pickle.loads(pickle.dumps(old))
    assert copy.padding_mode == "zeros"
    torch.testing.assert_close(copy(x), F.conv2d(reference_project(x, 2, 1), old.weight, old.bias, padding=1),
                               rtol=1e-10, atol=1e-12)


def test_report_counts_padded_layers_as_converted():
    dense = _model("reflect", 2, 1, nn.ReLU()).float()
    report = sas_compile.report(dense, (torch.randn(1, 3, 8, 8),), M=(2,))
    rows = {row["name"]: row for row in report.to_dict()["layers"]}
    for name in ("2", "4"):
        row = rows[name]
        assert row["eligible"] and row["reason"] is None, row
        assert row["sas"][2]["mults"] == row["base"]["mults"]
        weight = dense.get_submodule(name).weight.numel()
        assert row["sas"][2]["params"] == row["base"]["params"] + weight
