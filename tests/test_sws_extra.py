"""SWS follow-ups: Conv1d / F.conv1d widening, and the dense layer on the raw network input.

SAS keeps the layer reading the raw input dense by default (``dense_input_layers=True``);
SWS must treat it the same way (widen its output, keep its weight dense) so the SAS vs SWS
comparison is fair, and ``report``'s SWS columns must count exactly what ``swsify`` builds
for both settings.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sas_compile
from sas_compile.accounting import sws_width
from sas_compile.api import analyze
from sas_compile.sws import export_sws_weights, sws_costs

from zoo import models as zoo_models

torch.manual_seed(0)


# --------------------------------------------------------------------------- models


class CNN1d(nn.Module):
    """The MNIST-1D style CNN: three strided Conv1d + ReLU, flatten into a linear."""

    def __init__(self, channels=32, length=40, classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.positions = self.net(torch.zeros(1, 1, length)).shape[1] // channels
        self.fc = nn.Linear(channels * self.positions, classes)

    def forward(self, x):
        return self.fc(self.net(x))


class PooledCNN1d(nn.Module):
    """Conv1d with BatchNorm1d, MaxPool1d, a residual add and a global 1-D pool."""

    def __init__(self, c=12):
        super().__init__()
        self.stem = nn.Conv1d(2, c, 3, padding=1)
        self.bn = nn.BatchNorm1d(c)
        self.pool = nn.MaxPool1d(2)
        self.conv = nn.Conv1d(c, c, 3, padding=1, bias=False)
        self.gap = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.stem(x))))
        x = x + F.relu(self.conv(x))
        return self.fc(torch.flatten(self.gap(x), 1))


class FunctionalConv1d(nn.Module):
    """F.conv1d and torch.conv1d (a depthwise one) with the model's own Parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 6, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(8, 6, 3) * 0.3)
        self.kernel_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3) * 0.3)
        self.w = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = F.conv1d(x, self.kernel, self.kernel_bias, stride=2)
        x = torch.conv1d(torch.relu(x), self.dw, None, 1, 1, 1, 8)
        return F.linear(x.mean(2), self.w)


class ScaledInput(nn.Module):
    """Parameter-free ops before the first layer: it still reads the raw input (sasify's notion)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.flatten(x * 2.0, 1))))


def _forward_backward(model, x):
    model.train()
    out = model(x)
    out.square().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for _, g in grads), \
        [n for n, g in grads if g is None or not g.abs().sum() > 0]
    return out


def _reference_mask(weight: torch.Tensor, M: int) -> torch.Tensor:
    """Float64 reference of the 1:M rule: largest magnitude of every M consecutive weights."""
    flat = weight.detach().double().reshape(-1).tolist()
    keep = [False] * len(flat)
    for start in range(0, len(flat), M):
        chunk = flat[start:start + M]
        keep[start + max(range(len(chunk)), key=lambda i: (abs(chunk[i]), -i))] = True
    return torch.tensor(keep).view(weight.shape)


def _by_target(s):
    return {s.sws_layers[n]: w for n, w in s.sws_widths.layers.items()}


def _check_one_of_m(module, M):
    dense = module.parametrizations.weight.original
    masked = module.weight.detach()
    assert torch.equal(masked, dense.detach() * _reference_mask(dense, M))
    flat = masked.reshape(-1)
    chunks = F.pad(flat, (0, (-flat.numel()) % M)).view(-1, M)
    assert torch.all((chunks != 0).sum(1) == 1)  # random weights: exactly the kept one is nonzero
    assert int((masked != 0).sum()) == math.ceil(masked.numel() / M)


def _bias_numel(s, node):
    bias_target = s.sws_widths.layer_params[node][1]
    if bias_target is None:
        return 0
    owner = s.get_submodule(bias_target.rpartition(".")[0]) if "." in bias_target else s
    b = getattr(owner, bias_target.rpartition(".")[2])
    return 0 if b is None else b.numel()


def _assert_report_agrees(model, x, M, dense_input_layers):
    """Every SWS column of report == what the built model costs, layer by layer and in total."""
    rep = sas_compile.report(model, (x,), M=(M,), dense_input_layers=dense_input_layers, symbolic=False)
    s = sas_compile.swsify(model, M=M, example_inputs=x, dense_input_layers=dense_input_layers)
    built = sws_costs(s, (x,))
    assert len(rep.layers) == len(built)
    total_mults = total_nnz = 0
    for row, (node, got) in zip(rep.layers, built.items()):  # both in graph order
        want = row["sws"][M]
        bias = _bias_numel(s, node)
        assert row["name"].split("#")[0] == got["name"]
        assert (got["in_channels"], got["out_channels"]) == (want["in_features"], want["out_features"]), row["name"]
        assert got["mults"] == want["mults"], row["name"]
        assert got["nonzeros"] + bias == want["nonzero_params"], row["name"]
        assert got["weight_numel"] + bias == want["params"], row["name"]
        # the analysis, the built mask and the count agree on which weights are 1:M sparse
        assert got["sparse"] == s.sws_widths.layers[node].sparse
        total_mults += got["mults"]
        total_nnz += got["nonzeros"] + bias
    assert rep.totals["sws"][M]["mults"] == total_mults
    assert rep.totals["sws"][M]["nonzero_params"] == total_nnz
    return rep, s, built


# --------------------------------------------------------------------------- Conv1d widening


@pytest.mark.parametrize("M", [2, 4])
def test_conv1d_cnn_widens_like_its_conv2d_counterpart(M):
    model = CNN1d()
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(model, M=M, example_inputs=x)
    wide = sws_width(32, M)
    w = _by_target(s)
    assert (w["net.0.weight"].in_channels, w["net.0.weight"].out_channels) == (1, wide)
    for name in ("net.2.weight", "net.4.weight"):
        assert (w[name].in_channels, w[name].out_channels, w[name].in_features) == (wide, wide, wide * 3)
        assert w[name].op == "conv1d" and w[name].kernel_size == (3,)
    # flatten into the linear: channels x positions
    assert w["fc.weight"].in_channels == wide * model.positions and w["fc.weight"].out_channels == 10
    for name, cin in (("net.0", 1), ("net.2", wide), ("net.4", wide)):
        conv = s.get_submodule(name)
        assert isinstance(conv, nn.Conv1d) and conv.weight.shape == (wide, cin, conv.kernel_size[0])
        assert conv.stride == model.get_submodule(name).stride
    assert s.fc.weight.shape == (10, wide * model.positions)
    assert s(x).shape == (3, 10)
    _forward_backward(s, x)
    # hidden conv1d weights and the linear carry exact 1:M masks; the input conv stays dense
    for name in ("net.2", "net.4", "fc"):
        _check_one_of_m(s.get_submodule(name), M)
    assert not parametrize.is_parametrized(s.get_submodule("net.0"), "weight")
    assert model.net[0].out_channels == 32  # the original is untouched


def test_conv1d_widths_match_the_conv2d_version():
    """The same network as Conv2d over a 1 x L image gets the same widths and mults."""
    conv2d = nn.Sequential(nn.Conv2d(1, 32, (1, 5), stride=(1, 2)), nn.ReLU(), nn.Conv2d(32, 32, (1, 3), stride=(1, 2)),
                           nn.ReLU(), nn.Conv2d(32, 32, (1, 3), stride=(1, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(96, 10))
    m1 = CNN1d()
    s1 = sws_costs(sas_compile.swsify(m1, M=4, example_inputs=torch.randn(2, 1, 40)), (torch.randn(2, 1, 40),))
    s2 = sws_costs(sas_compile.swsify(conv2d, M=4, example_inputs=torch.randn(2, 1, 1, 40)),
                   (torch.randn(2, 1, 1, 40),))
    pick = lambda c: [(v["in_channels"], v["out_channels"], v["in_features"], v["nonzeros"], v["mults"])
                      for v in c.values()]
    assert pick(s1) == pick(s2)


def test_conv1d_with_batchnorm_pool_and_residual():
    x = torch.randn(4, 2, 16)
    s = sas_compile.swsify(PooledCNN1d(c=12), M=2, example_inputs=x)
    wide = sws_width(12, 2)
    assert s.bn.num_features == wide and s.conv.weight.shape == (wide, wide, 3)
    assert s.fc.in_features == wide  # the global pool keeps channels, flatten is channels x 1
    assert s(x).shape == (4, 3)
    _forward_backward(s, x)
    _check_one_of_m(s.conv, 2)
    _assert_report_agrees(PooledCNN1d(c=12), x, 2, True)


def test_functional_conv1d_and_depthwise_groups_follow_the_width():
    x = torch.randn(2, 2, 11)
    s = sas_compile.swsify(FunctionalConv1d(), M=4, example_inputs=x)
    assert s.kernel.shape == (sws_width(8, 4), sws_width(6, 4), 3)
    assert s.dw.shape == (sws_width(8, 4), 1, 3)
    assert s.w.shape == (5, sws_width(8, 4))
    widths = list(s.sws_widths.layers.values())
    assert [w.op for w in widths] == ["conv1d", "conv1d", "conv1d", "linear"]
    assert widths[2].groups == sws_width(8, 4) and widths[2].in_features == 3  # depthwise at the new width
    assert s(x).shape == (2, 5)
    _forward_backward(s, x)
    _assert_report_agrees(FunctionalConv1d(), x, 4, True)


@pytest.mark.parametrize("dense_input_layers", [True, False])
@pytest.mark.parametrize("M", [2, 4, 8])
def test_conv1d_report_agrees_with_swsify(M, dense_input_layers):
    x = torch.randn(2, 1, 40)
    rep, s, built = _assert_report_agrees(CNN1d(), x, M, dense_input_layers)
    first = rep.layers[0]["sws"][M]
    wide = sws_width(32, M)
    positions = s.sws_widths.shape_of(next(iter(s.sws_layers)))[-1]
    weights = wide * 1 * 5
    assert first["mults"] == 2 * positions * (weights if dense_input_layers else math.ceil(weights / M))


@pytest.mark.parametrize("M", [2, 4])
def test_export_conv1d_weights_round_trip(M):
    """Conv1d weights pack as [out, in * k]; unpacking gives the masked weight back exactly."""
    from sas_compile.runtime.packing import unpack_sws_weight

    channels = 24 if M == 2 else 32  # fan-in wide * 3 divisible by M: 34*3, 64*3
    model = CNN1d(channels=channels)
    x = torch.randn(2, 1, 40)
    s = sas_compile.swsify(model, M=M, example_inputs=x, dense_input_layers=False)
    packed = export_sws_weights(s, strict=False)
    for name, node in (("net.2", "net_2"), ("net.4", "net_4")):
        weight = s.get_submodule(name).weight.detach()
        assert weight.dim() == 3 and node in packed
        dense = unpack_sws_weight(packed[node])
        assert dense.shape == (weight.shape[0], weight.shape[1] * weight.shape[2])
        assert torch.equal(dense, weight.reshape(weight.shape[0], -1))
    # the input conv (1 channel x 5 taps) does not fit 2:4 rows: strict names it
    with pytest.raises(ValueError, match="net_0"):
        export_sws_weights(s)


# --------------------------------------------------------------------------- the dense input layer


def test_input_layer_is_dense_by_default_and_widens_its_output():
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(CNN1d(), M=4, example_inputs=x)
    first = _by_target(s)["net.0.weight"]
    assert first.widened and not first.sparse and first.reads_network_input
    assert first.out_channels == sws_width(32, 4) and first.in_channels == 1
    assert "raw network input" in first.reason and "dense_input_layers" in first.reason
    assert first.nonzeros == first.weight_numel == sws_width(32, 4) * 5
    assert not parametrize.is_parametrized(s.get_submodule("net.0"), "weight")
    costs = sws_costs(s)["net_0"]
    assert not costs["sparse"] and costs["nonzeros"] == costs["weight_numel"] == sws_width(32, 4) * 5
    assert export_sws_weights(s, strict=True).keys() == {"net_2", "net_4", "fc"}  # dense layers are not packed
    # every other widened layer is sparse
    assert all(w.sparse for n, w in s.sws_widths.layers.items() if n != "net_0")


def test_dense_input_layers_false_masks_the_input_layer():
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(CNN1d(), M=4, example_inputs=x, dense_input_layers=False)
    first = _by_target(s)["net.0.weight"]
    assert first.widened and first.sparse and first.reads_network_input is False
    assert "dense" not in (first.reason or "")
    _check_one_of_m(s.get_submodule("net.0"), 4)
    assert sws_costs(s)["net_0"]["nonzeros"] == math.ceil(sws_width(32, 4) * 5 / 4)


def test_raw_input_through_parameter_free_ops_is_sasify_s_notion():
    x = torch.randn(4, 2, 3)
    s = sas_compile.swsify(ScaledInput(), M=2, example_inputs=x)
    w = _by_target(s)
    assert w["a.weight"].reads_network_input and not w["a.weight"].sparse
    assert w["b.weight"].sparse and not w["b.weight"].reads_network_input
    plan = analyze(ScaledInput(), (x,))
    assert [layer.input_is_graph_input for layer in plan.layers] == [True, False]


def test_filter_fn_reason_and_dense_input_reason_are_kept_apart():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3))
    keep = lambda m, fqn: fqn != "4"  # noqa: E731
    x = torch.randn(2, 6)
    s = sas_compile.swsify(model, M=2, example_inputs=x, filter_fn=keep)
    w = _by_target(s)
    assert not w["4.weight"].widened and not w["4.weight"].sparse and "filter_fn" in w["4.weight"].reason
    assert w["0.weight"].widened and not w["0.weight"].sparse and "raw network input" in w["0.weight"].reason
    assert w["2.weight"].widened and w["2.weight"].sparse and "filter_fn" in w["2.weight"].reason  # output stays
    assert (w["2.weight"].in_channels, w["2.weight"].out_channels) == (sws_width(16, 2), 16)
    # report passes filter_fn to the SWS widths too: it counts the model swsify builds
    rep = sas_compile.report(model, (x,), M=(2,), filter_fn=keep)
    row = {r["name"]: r for r in rep.layers}["4"]["sws"][2]
    assert (row["in_features"], row["out_features"]) == (16, 16) and row["mults"] == 2 * 16 * 16
    built = sws_costs(s, (x,))
    assert [c["mults"] for c in built.values()] == [r["sws"][2]["mults"] for r in rep.layers]


# --------------------------------------------------------------------------- agreement on the zoo


def _agreement_models():
    out = dict(zoo_models())
    # the zoo's resnet18 is sas_compile.models.resnet18(width=16) (10 classes): residual adds, downsample
    return out


@pytest.mark.parametrize("dense_input_layers", [True, False])
@pytest.mark.parametrize("name", sorted(_agreement_models()))
def test_report_agrees_with_swsify_on_the_zoo(name, dense_input_layers):
    factory, make_x = _agreement_models()[name]
    torch.manual_seed(0)
    model, x = factory(), make_x()
    M = 4
    _, s, built = _assert_report_agrees(model, x, M, dense_input_layers)
    plan = analyze(model, (x,))
    reads = [layer.input_is_graph_input for layer in plan.layers]
    assert [w.reads_network_input for w in s.sws_widths.layers.values()] == \
        [r and dense_input_layers for r in reads]  # sasify's notion of the raw-input layer
    for (node, w), c in zip(s.sws_widths.layers.items(), built.values()):
        assert c["sparse"] == (w.widened and not (dense_input_layers and w.reads_network_input))
    if dense_input_layers and any(reads):
        assert not all(c["sparse"] for c in built.values())
