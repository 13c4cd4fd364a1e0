"""Analysis once, decision per M: ``analyze_channel_widths`` walks a graph once, ``.at(M)`` decides widths.

Which widths are tied and which must stay does not depend on M; only the final widths do.
The decision at one M must not leak into another (a width that does not split into the heads
at M = 2 does at M = 4), ``report`` at several M walks the graph once, and the thin wrappers
``tie_channel_widths`` / ``sws_layer_widths`` give what ``.at(M)`` gives.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import sas_compile
from sas_compile.passes import sws_width_rules
from sas_compile.passes.costs import sws_layer_shape, sws_width
from sas_compile.passes.tie_channel_widths import (
    ChannelWidthAnalysis,
    analyze_channel_widths,
    sws_layer_widths,
    tie_channel_widths,
)

from zoo import models as zoo_models

torch.manual_seed(0)


class Encoder(nn.Module):
    """Attention over 2 heads and an MLP: at dim 16 the heads split at M = 4 but not at M = 2."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.head(x.mean(1))


def _summary(cw):
    return {n: (w.in_channels, w.out_channels, w.fan_in, w.groups, w.widened, w.sparse, w.reason)
            for n, w in cw.layers.items()}


def _fresh(x):
    return analyze_channel_widths(fx.symbolic_trace(Encoder()), (x,))


def test_decisions_at_one_M_do_not_leak_into_another():
    x = torch.randn(2, 5, 6)
    analysis = _fresh(x)
    at2 = analysis.at(2)
    assert at2.layers["qkv"].out_channels == 48 and "does not split" in at2.layers["qkv"].reason
    at4 = analysis.at(4)  # after M = 2 fixed the attention widths in its own copy of the groups
    assert at4.layers["qkv"].out_channels == 96 and at4.layers["proj"].in_channels == 32
    assert _summary(at4) == _summary(_fresh(x).at(4))
    assert _summary(analysis.at(8)) == _summary(_fresh(x).at(8))
    assert _summary(analysis.at(2)) == _summary(_fresh(x).at(2))
    assert analysis.at(4) is at4  # decided once per M
    assert at2.layers["fc1"].out_channels == sws_width(32, 2)  # the MLP widens at every M


def test_the_walk_runs_once_for_every_M(monkeypatch):
    runs = []
    original = sws_width_rules.WidthWalk.run

    def counting(self):
        runs.append(self)
        return original(self)

    monkeypatch.setattr(sws_width_rules.WidthWalk, "run", counting)
    x = torch.randn(2, 5, 6)
    analysis = analyze_channel_widths(fx.symbolic_trace(Encoder()), (x,))
    for m in (2, 4, 8, 16):
        analysis.at(m)
    assert len(runs) == 1
    runs.clear()
    rep = sas_compile.report(Encoder(), (x,), M=(2, 4, 8), symbolic=False)
    assert len(runs) == 1  # report: one analysis, decided per M
    assert {m: rep.totals["sws"][m]["mults"] for m in (2, 4, 8)} == {
        m: sum(r["sws"][m]["mults"] for r in rep.layers) for m in (2, 4, 8)}


@pytest.mark.parametrize("name", sorted(zoo_models()))
def test_the_wrappers_give_what_at_M_gives(name):
    factory, make_x = zoo_models()[name]
    torch.manual_seed(0)
    model, x = factory(), make_x()
    analysis = analyze_channel_widths(fx.symbolic_trace(model), (x,))
    assert isinstance(analysis, ChannelWidthAnalysis) and analysis.layer_names
    for m in (2, 4, 8):
        once = analysis.at(m)
        assert _summary(tie_channel_widths(fx.symbolic_trace(model), m, (x,))) == _summary(once)
        assert {n: w.fan_in for n, w in sws_layer_widths(fx.symbolic_trace(model), m, (x,)).items()} == \
            {n: w.fan_in for n, w in once.layers.items()}
        for node in analysis.layer_names:
            assert once.shape_of(node) is not None


def test_report_columns_at_several_M_equal_one_M_at_a_time():
    x = torch.randn(2, 5, 6)
    together = sas_compile.report(Encoder(), (x,), M=(2, 4, 8), symbolic=False)
    for m in (2, 4, 8):
        alone = sas_compile.report(Encoder(), (x,), M=(m,), symbolic=False)
        assert [r["sws"][m] for r in together.layers] == [r["sws"][m] for r in alone.layers]


def test_a_bad_M_is_refused_by_the_decision():
    analysis = _fresh(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="M=3"):
        analysis.at(3)


def test_layer_widths_fields():
    x = torch.randn(2, 5, 6)
    w = _fresh(x).at(4).layers["fc1"]
    assert w.fan_in == w.in_channels == sws_width(16, 4) and w.in_features == w.fan_in  # old name kept
    assert w.nonzeros == math.ceil(w.fan_in * w.out_features / 4)


# --------------------------------------------------------------------------- the one per-layer rule


def _old_standalone_rule(in_channels, out_channels, groups, M, widen_in, widen_out):
    """accounting._sws_conv_widths as it was before the rule moved to passes/costs.py."""
    if groups > 1 and groups == in_channels == out_channels:
        width = sws_width(in_channels, M) if (widen_in and widen_out) else in_channels
        return width, width, width
    cin = groups * sws_width(in_channels // groups, M) if widen_in else in_channels
    cout = groups * sws_width(out_channels // groups, M) if widen_out else out_channels
    return cin, cout, groups


@pytest.mark.parametrize("M", [2, 4, 8])
def test_the_standalone_rule_is_the_one_accounting_used(M):
    for cin, cout, groups in [(32, 64, 1), (8, 12, 4), (16, 16, 16), (16, 32, 16), (3, 8, 1), (6, 6, 3)]:
        for widen_in in (True, False):
            for widen_out in (True, False):
                for kernel in (1, 9):
                    got = sws_layer_shape(cin, cout, M, groups=groups, kernel=kernel, widen_in=widen_in,
                                          widen_out=widen_out)
                    c_in, c_out, g = _old_standalone_rule(cin, cout, groups, M, widen_in, widen_out)
                    assert got == (c_in, c_out, g, c_in // g * kernel)


def test_the_rule_with_whole_graph_widths():
    # the paper's conv (Cin 32, 3x3, Co 64, M = 8) built: channels widen, round(sqrt(8) * 32) = 91, fan-in 91 * 9
    assert sws_layer_shape(32, 64, 8, kernel=9) == (91, 181, 1, 819)
    assert sws_layer_shape(32, 64, 8, kernel=9, in_width=91, out_width=181).fan_in == 819
    # a depthwise conv whose width the graph decided: its groups follow the width, also with a multiplier
    assert sws_layer_shape(8, 16, 4, groups=8, kernel=9, in_width=16, out_width=32) == (16, 32, 16, 9)
    assert sws_layer_shape(8, 8, 4, groups=2, kernel=9, in_width=16, out_width=16) == (16, 16, 2, 72)
    with pytest.raises(ValueError, match="both"):
        sws_layer_shape(8, 8, 2, in_width=11)


class ChannelsLastPad(nn.Module):
    """Swin's window padding: ``F.pad`` of an ``[N, H, W, C]`` tensor, (0, 0) on the channels."""

    def __init__(self, pad_channels: bool = False):
        super().__init__()
        self.first, self.second = nn.Linear(6, 8), nn.Linear(10 if pad_channels else 8, 5)
        self.pad_channels = pad_channels

    def forward(self, x):  # x: [N, H, W, 6]
        h = torch.relu(self.first(x))
        h = F.pad(h, (1, 1, 0, 1, 1, 0) if self.pad_channels else (0, 0, 0, 1, 1, 0))
        n, hh, ww, c = h.shape
        h = h.view(n, hh * ww, c)  # a view with the channel count as a number, as export writes it
        return self.second(h)


@pytest.mark.parametrize("pad_channels", [False, True])
def test_pad_passes_an_unpadded_channel_dim_and_holds_a_padded_one(pad_channels):
    torch.manual_seed(0)
    model = ChannelsLastPad(pad_channels).eval()
    x = torch.randn(2, 3, 4, 6)
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert sws(x).shape == (2, 4 * 5, 5)  # runs: the widened model's view matches its widths
    layers = {layer.name: layer for layer in sws.sparsify_plan.layers}
    if pad_channels:  # a padded channel dim cannot widen: the first layer's output stays 8
        assert layers["first"].out_channels == 8 and "padded" in (layers["first"].reason or "")
    else:  # channels pass the pad: the hidden width 8 widens to 16
        assert layers["first"].out_channels == 16 and layers["second"].in_channels == 16


def test_swin_widens_and_runs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                           num_heads=[2, 2], window_size=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert sum(layer.eligible for layer in sws.sparsify_plan.layers) == 13
    out = sws(x)
    assert (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).shape == (2, 16, 32)
