"""SWS on Conv1d: ``nn.Conv1d``, ``F.conv1d`` and ``torch.conv1d`` widen like their Conv2d counterparts.

The widened network runs and trains, hidden conv1d weights carry exact 1:M masks, ``report``
counts what ``swsify`` builds, and conv1d weights pack as ``[out, in * k]``.
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
from sas_compile.sws import export_sws_weights, measure_sws_model

from sws_checks import CNN1d, assert_report_agrees, by_target, check_one_of_m, forward_backward

torch.manual_seed(0)


# --------------------------------------------------------------------------- models


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


# --------------------------------------------------------------------------- Conv1d widening


@pytest.mark.parametrize("M", [2, 4])
def test_conv1d_cnn_widens_like_its_conv2d_counterpart(M):
    model = CNN1d()
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(model, M=M, example_inputs=x)
    wide = sws_width(32, M)
    w = by_target(s)
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
    forward_backward(s, x)
    # hidden conv1d weights and the linear carry exact 1:M masks; the input conv stays dense
    for name in ("net.2", "net.4", "fc"):
        check_one_of_m(s.get_submodule(name), M)
    assert not parametrize.is_parametrized(s.get_submodule("net.0"), "weight")
    assert model.net[0].out_channels == 32  # the original is untouched


def test_conv1d_widths_match_the_conv2d_version():
    """The same network as Conv2d over a 1 x L image gets the same widths and mults."""
    conv2d = nn.Sequential(nn.Conv2d(1, 32, (1, 5), stride=(1, 2)), nn.ReLU(), nn.Conv2d(32, 32, (1, 3), stride=(1, 2)),
                           nn.ReLU(), nn.Conv2d(32, 32, (1, 3), stride=(1, 2)), nn.ReLU(), nn.Flatten(), nn.Linear(96, 10))
    m1 = CNN1d()
    s1 = measure_sws_model(sas_compile.swsify(m1, M=4, example_inputs=torch.randn(2, 1, 40)), (torch.randn(2, 1, 40),))
    s2 = measure_sws_model(sas_compile.swsify(conv2d, M=4, example_inputs=torch.randn(2, 1, 1, 40)),
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
    forward_backward(s, x)
    check_one_of_m(s.conv, 2)
    assert_report_agrees(PooledCNN1d(c=12), x, 2, True)


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
    forward_backward(s, x)
    assert_report_agrees(FunctionalConv1d(), x, 4, True)


@pytest.mark.parametrize("dense_input_layers", [True, False])
@pytest.mark.parametrize("M", [2, 4, 8])
def test_conv1d_report_agrees_with_swsify(M, dense_input_layers):
    x = torch.randn(2, 1, 40)
    rep, s, built = assert_report_agrees(CNN1d(), x, M, dense_input_layers)
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
