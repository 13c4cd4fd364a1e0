"""SWS widens and masks transposed convolutions.

Before: the SWS width analysis stopped at every ``nn.ConvTranspose*d`` / ``F.conv_transpose*d``
("SWS does not widen or mask a transposed convolution") and fixed every width touching it, so
an encoder-decoder (a U-Net, an autoencoder, a GAN generator) got no SWS layer at all. Now a
transposed convolution is a layer like any other: its input width ties dim 0 of its
``[in, out/groups, *kernel]`` weight, its output width is ``groups * dim 1``, both widen by
sqrt(M), and its weight carries a 1:M mask taken in the ``[out, in/groups * kernel]`` view
(the chunks run along the channels the layer sums over, as a convolution's do). The report
counts what the built model costs, layer by layer.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.accounting import sws_width
from sas_compile.runtime.sws_mask import conv_to_transposed_layout, transposed_to_conv_layout
from sas_compile.sws import OneOfMMask, export_sws_weights, lower_sws, measure_sws_model, one_of_m_mask, sws_mask_of

from sws_checks import assert_report_agrees, forward_backward, reference_mask

DT = torch.float64


def reference_conv_layout(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """``[in, out/groups, *k]`` -> ``[out, in/groups, *k]`` by explicit indexing: output channel
    ``g * og + o`` and input channel ``g * ig + i`` of group ``g``."""
    cin, og = weight.shape[:2]
    ig = cin // groups
    out = torch.empty(groups * og, ig, *weight.shape[2:], dtype=weight.dtype)
    for g in range(groups):
        for o in range(og):
            for i in range(ig):
                out[g * og + o, i] = weight[g * ig + i, o]
    return out


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("shape,groups", [((6, 4, 3, 3), 1), ((6, 5, 2, 3), 2), ((9, 1, 3), 9), ((4, 3, 2, 1, 3), 4),
                                          ((7, 3, 5), 1)])
def test_transposed_mask_is_one_of_m_along_the_summed_channels(M, shape, groups):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=DT)
    conv = reference_conv_layout(w, groups)
    assert torch.equal(transposed_to_conv_layout(w, groups), conv)
    assert torch.equal(conv_to_transposed_layout(conv, groups), w)
    mask = one_of_m_mask(w, M, transposed_groups=groups)
    assert mask.shape == w.shape
    # the float64 reference of the 1:M rule, applied in the conv-layout view
    assert torch.equal(reference_conv_layout(mask.to(DT), groups).bool(), reference_mask(conv, M))
    assert int(mask.sum()) == math.ceil(w.numel() / M)
    # not the row-major mask of the stored layout (that would chunk across output channels)
    if groups == 1 and shape[1] > 1 and M <= shape[1]:
        assert not torch.equal(mask, one_of_m_mask(w, M))


def test_transposed_groups_argument_is_checked():
    with pytest.raises(ValueError, match="transposed_groups"):
        OneOfMMask(2, transposed_groups=0)
    with pytest.raises(ValueError, match="do not split"):
        one_of_m_mask(torch.randn(5, 2, 3), 2, transposed_groups=2)


class Decoder(nn.Module):
    """Encoder-decoder with a skip: conv, strided conv, transposed conv back up, add, 1x1 head."""

    def __init__(self, up_groups=1):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(32)
        self.up = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, groups=up_groups)
        self.b3 = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        b = F.relu(self.b2(self.c2(a)))
        c = F.relu(self.b3(self.up(b)))
        return self.out(c + a)


@pytest.mark.parametrize("dense_input_layers", [True, False])
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("up_groups", [1, 2, 16])
def test_decoder_widens_and_masks_its_transposed_convolution(M, up_groups, dense_input_layers):
    torch.manual_seed(1)
    model = Decoder(up_groups).eval()  # groups=16 of 32 inputs: grouped, not depthwise
    x = torch.randn(2, 3, 10, 12)
    rep, s, built = assert_report_agrees(model, x, M, dense_input_layers)
    up = s.up
    assert isinstance(up, nn.ConvTranspose2d)
    w16, w32 = sws_width(16, M), sws_width(32, M)
    if w32 % up_groups or w16 % up_groups:  # at M = 2 (45 and 23) the groups do not split the widths
        assert (up.in_channels, up.out_channels, sws_mask_of(up)) == (32, 16, None)
        assert "does not split into" in s.sws_widths.layers[_node_of(s, "up.weight")].reason
        forward_backward(s, x)
        return
    assert up.in_channels == w32 and up.out_channels == w16 and up.groups == up_groups
    # the decoder's stride, padding, output_padding and dilation stay
    assert (up.stride, up.padding, up.output_padding, up.dilation) == ((2, 2), (1, 1), (1, 1), (1, 1))
    mask = sws_mask_of(up)
    assert mask is not None and mask.transposed_groups == up.groups
    dense_w = up.parametrizations.weight.original.detach()
    want = dense_w * conv_to_transposed_layout(reference_mask(transposed_to_conv_layout(dense_w, up.groups), M),
                                               up.groups)
    assert torch.equal(up.weight.detach(), want)
    assert int((up.weight != 0).sum()) == math.ceil(up.weight.numel() / M)
    row = next(r for r in rep.layers if r["name"] == "up")
    assert row["sws"][M]["mults"] == built[_node_of(s, "up.weight")]["mults"] == 2 * 5 * 6 * -(-up.weight.numel() // M)
    out = forward_backward(s, x)
    assert out.shape == model(x).shape


def _node_of(s, weight_target):
    return next(n for n, t in s.sws_layers.items() if t == weight_target)


def _depthwise_decoder():
    class DepthwiseUp(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose2d(16, 32, 2, stride=2, groups=16)  # depthwise, multiplier 2
            self.out = nn.Conv2d(32, 3, 1)

        def forward(self, x):
            h = F.relu(self.c2(F.relu(self.c1(x))))
            return self.out(F.relu(self.up(h)))

    return DepthwiseUp()


def test_depthwise_transposed_convolution_keeps_its_multiplier():
    torch.manual_seed(2)
    model = _depthwise_decoder().eval()
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(model, M=4, example_inputs=(x,))
    w16 = sws_width(16, 4)
    assert (s.up.in_channels, s.up.out_channels, s.up.groups) == (w16, 2 * w16, w16)
    assert s.up.weight.shape == (w16, 2, 2, 2)
    assert s(x).shape == (2, 3, 8, 8)


@pytest.mark.parametrize("fn,dims", [(F.conv_transpose1d, 1), (F.conv_transpose2d, 2), (F.conv_transpose3d, 3)])
def test_functional_transposed_convolution_with_graph_parameters(fn, dims):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
            self.inp = conv(2, 6, 1)
            self.w = nn.Parameter(torch.randn(6, 4, *(2,) * dims))  # [in, out, *k]
            self.b = nn.Parameter(torch.randn(4))
            self.dw = nn.Parameter(torch.randn(4, 1, *(3,) * dims))  # depthwise: groups=4
            self.head = conv(4, 3, 1)

        def forward(self, x):
            h = F.relu(self.inp(x))
            h = F.relu(fn(h, self.w, self.b, stride=2))
            h = F.relu(fn(h, self.dw, None, 1, 1, 0, 4))
            return self.head(h)

    torch.manual_seed(3)
    model = Net().eval()
    x = torch.randn(2, 2, *(4,) * dims)
    rep, s, built = assert_report_agrees(model, x, 4, True)
    assert s.w.shape == (12, 8, *(2,) * dims) and s.b.shape == (8,)
    assert s.dw.shape == (8, 1, *(3,) * dims)
    assert s(x).shape == model(x).shape
    node = next(n for n in s.graph.nodes if n.op == "call_function" and len(n.args) > 1
                and getattr(n.args[1], "target", None) == "dw")
    assert (node.args[6] if len(node.args) > 6 else node.kwargs["groups"]) == 8  # groups follow the width
    forward_backward(s, x)


def test_export_packs_a_transposed_weight_in_its_summed_layout():
    from sas_compile.runtime.packing import unpack_sws_weight

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(),
                          nn.Conv2d(8, 4, 1)).eval()
    s = sas_compile.swsify(model, M=4, example_inputs=torch.randn(1, 3, 4, 4))
    packed = export_sws_weights(s)
    node = _node_of(s, "2.weight")
    weight = s.get_submodule("2").weight.detach()
    conv = transposed_to_conv_layout(weight, 1)
    assert torch.equal(unpack_sws_weight(packed[node]), conv.reshape(conv.shape[0], -1))


def test_frozen_transposed_mask_survives_a_checkpoint_and_lowering_leaves_it_dense():
    torch.manual_seed(5)
    model = Decoder().eval()
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(model, M=4, example_inputs=(x,), freeze_mask=True)
    frozen = s.up.parametrizations.weight[0].frozen.clone()
    state = s.state_dict()
    t = sas_compile.swsify(model, M=4, example_inputs=(x,), freeze_mask=True)
    t.load_state_dict(state)
    assert torch.equal(t.up.parametrizations.weight[0].frozen, frozen)
    with torch.no_grad():
        torch.testing.assert_close(t(x), s(x))
    lowered = lower_sws(s)
    up_node = _node_of(s, "up.weight")
    assert "convolution" in lowered.sws_lowering.kept[up_node]
    assert sws_mask_of(lowered.up) is not None


def test_measure_sws_model_counts_a_single_transposed_layer():
    layer = nn.ConvTranspose2d(8, 6, 3, groups=2)
    costs = measure_sws_model(layer)[""]
    assert (costs["in_channels"], costs["out_channels"], costs["groups"]) == (8, 6, 2)
    assert costs["fan_in"] == 4 * 9 and costs["weight_numel"] == 8 * 3 * 9 == costs["nonzeros"]


def test_widths_agree_between_symbolic_and_exported_graphs():
    """The aten spellings an exported graph holds (``aten.conv_transpose2d.input``) get the same widths."""
    from torch import fx

    from sas_compile.passes.tie_channel_widths import sws_layer_widths

    torch.manual_seed(6)
    model = Decoder(2).eval()
    x = torch.randn(2, 3, 8, 8)
    traced = sws_layer_widths(fx.symbolic_trace(model), 4, (x,))
    exported = sws_layer_widths(torch.export.export(model, (x,), strict=False).module(), 4)
    pick = lambda ws: [(w.op, w.in_channels, w.out_channels, w.fan_in, w.groups, w.sparse)  # noqa: E731
                       for w in ws.values()]
    assert pick(traced) == pick(exported)
    assert ("conv_transpose2d", 64, 32, 32 * 9, 2, True) in pick(traced)
