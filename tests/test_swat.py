"""SWAT ops and swatify: gradients against float64 references built from explicit masks."""
from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sas_compile
from sas_compile.runtime import swat as ops
from sas_compile.swat import (
    SWATConv1d,
    SWATConv2d,
    SWATConv3d,
    SWATConvTranspose,
    SWATLayer,
    SWATLinear,
    erk_densities,
    swat_costs,
    swat_layers,
    swatify,
)

STRUCTURES = ("unstructured", "channel")


# ---------------------------------------------------------------- explicit reference masks


def topk_weight_mask(weight: torch.Tensor, density: float, structure: str) -> torch.Tensor:
    """The kept weights as a 0/1 float64 tensor, chosen with torch.topk (no thresholds)."""
    w = weight.detach().double()
    if structure == "unstructured":
        flat = w.abs().reshape(-1)
        keep = torch.zeros_like(flat)
        keep[torch.topk(flat, ops.topk_count(density, flat.numel())).indices] = 1
        return keep.view_as(w)
    scores = w.abs().transpose(0, 1).reshape(w.shape[1], -1).mean(1)
    keep = torch.zeros_like(scores)
    keep[torch.topk(scores, ops.topk_count(density, scores.numel())).indices] = 1
    return keep.view(1, -1, *([1] * (w.dim() - 2))).expand_as(w).clone()


def topk_activation_mask(x: torch.Tensor, density: float, structure: str, channel_dim: int) -> torch.Tensor:
    """The kept activations as a 0/1 float64 tensor; a channel is one sample's feature map."""
    a = x.detach().double().abs()
    if structure == "channel":
        channel_dim %= x.dim()
        trailing = list(range(channel_dim + 1, x.dim()))
        scores = a.mean(trailing) if trailing else a
    else:
        scores = a
    flat = scores.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat, ops.topk_count(density, flat.numel())).indices] = 1
    keep = keep.view_as(scores)
    while keep.dim() < x.dim():
        keep = keep.unsqueeze(-1)
    return keep.expand_as(x).clone()


def fresh_thresholds(x, weight, wd, ad, structure, channel_dim):
    w_thr, a_thr = torch.zeros(()), torch.zeros(())
    step = torch.zeros((), dtype=torch.int64)
    torch.ops.swat.refresh_thresholds(x, weight, w_thr, a_thr, step, 1, wd, ad, structure,
                                      channel_dim, False)
    return w_thr, a_thr


def saved_bytes(fn, model):
    """Bytes of the distinct non-parameter storages autograd saves while ``fn()`` runs."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out


# ---------------------------------------------------------------- ops


@pytest.mark.parametrize("structure", STRUCTURES)
def test_linear_gradients_match_masked_float64_reference(structure):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 13, requires_grad=True)
    w = torch.randn(7, 13, requires_grad=True)
    b = torch.randn(7, requires_grad=True)
    wd, ad = 0.3, 0.4
    w_thr, a_thr = fresh_thresholds(x, w, wd, ad, structure, -1)
    y = ops.swat_linear(x, w, b, w_thr, a_thr, structure)
    gy = torch.randn_like(y)
    y.backward(gy)

    mw = topk_weight_mask(w, wd, structure)
    ma = topk_activation_mask(x, ad, structure, -1)
    x64, w64, b64, gy64 = x.detach().double(), w.detach().double(), b.detach().double(), gy.double()
    ref_y = x64 @ (w64 * mw).t() + b64
    ref_gx = gy64 @ (w64 * mw)
    ref_gw = gy64.reshape(-1, 7).t() @ (x64 * ma).reshape(-1, 13)
    torch.testing.assert_close(y.double(), ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), gy64.reshape(-1, 7).sum(0), rtol=1e-5, atol=1e-5)
    # the weight gradient is dense: every weight gets updated, also the masked-out ones
    assert (w.grad[mw == 0] != 0).any()


def check_conv_against_reference(x, w, b, stride, padding, dilation, groups, structure, conv):
    """swat::conv2d (``conv``: F.conv2d or F.conv3d by the weight's rank) against float64 references
    built from topk masks: forward and input gradient on the kept weights, weight gradient on the
    kept activations. Returns the weight mask."""
    wd, ad = 0.35, 0.25
    w_thr, a_thr = fresh_thresholds(x, w, wd, ad, structure, 1)
    y = ops.swat_conv2d(x, w, b, w_thr, a_thr, stride, padding, dilation, groups, structure)
    gy = torch.randn_like(y)
    y.backward(gy)

    mw = topk_weight_mask(w, wd, structure)
    ma = topk_activation_mask(x, ad, structure, 1)
    x64, w64, b64, gy64 = (t.detach().double() for t in (x, w, b, gy))
    x_ref = x64.clone().requires_grad_(True)
    w_ref = (w64 * mw).requires_grad_(True)
    ref_y = conv(x_ref, w_ref, b64, stride, padding, dilation, groups)
    ref_gx, = torch.autograd.grad(ref_y, x_ref, gy64)
    xk = (x64 * ma).requires_grad_(True)
    wv = w64.clone().requires_grad_(True)
    ref_gw, = torch.autograd.grad(conv(xk, wv, b64, stride, padding, dilation, groups), wv, gy64)
    assert_matches(y, x, w, b, gy64, ref_y, ref_gx, ref_gw, ma, mw)
    return mw


def assert_matches(y, x, w, b, gy64, ref_y, ref_gx, ref_gw, ma, mw):
    """A SWAT op's output and gradients against their float64 references; both masks keep some
    values and drop some (a check that cannot pass by keeping everything)."""
    assert y.shape == ref_y.shape
    torch.testing.assert_close(y.double(), ref_y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), gy64.sum([0, *range(2, gy64.dim())]), rtol=1e-5, atol=1e-5)
    assert 0 < int(ma.sum()) < ma.numel() and 0 < int(mw.sum()) < mw.numel()


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("stride,padding,dilation,groups", [((1, 1), (1, 1), (1, 1), 1),
                                                            ((2, 1), (0, 2), (1, 2), 2)])
def test_conv2d_gradients_match_masked_float64_reference(structure, stride, padding, dilation, groups):
    torch.manual_seed(1)
    x = torch.randn(3, 6, 9, 7, requires_grad=True)
    w = torch.randn(10, 6 // groups, 3, 2, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    mw = check_conv_against_reference(x, w, b, stride, padding, dilation, groups, structure, F.conv2d)
    if structure == "channel":
        # the same input channels are removed across all filters
        kept = (mw != 0).any(dim=(0, 2, 3))
        assert ((mw != 0) == kept.view(1, -1, 1, 1)).all()
        assert int(kept.sum()) == ops.topk_count(0.35, w.shape[1])


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("stride,padding,dilation,groups", [((1, 1, 1), (1, 1, 1), (1, 1, 1), 1),
                                                            ((2, 1, 1), (0, 2, 1), (1, 2, 1), 3)])
def test_conv3d_gradients_match_masked_float64_reference(structure, stride, padding, dilation, groups):
    """swat::conv2d on a 5-D weight is a SWAT conv3d: ragged volumes, strides, dilation, groups."""
    torch.manual_seed(21)
    x = torch.randn(2, 6, 7, 5, 6, requires_grad=True)
    w = torch.randn(9, 6 // groups, 3, 2, 3, requires_grad=True)
    b = torch.randn(9, requires_grad=True)
    check_conv_against_reference(x, w, b, stride, padding, dilation, groups, structure, F.conv3d)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_opcheck_conv3d(structure):
    torch.manual_seed(22)
    x = torch.randn(2, 4, 5, 4, 6, requires_grad=True)
    w = torch.randn(3, 4, 3, 2, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    w_thr, a_thr = fresh_thresholds(x, w, 0.5, 0.3, structure, 1)
    torch.library.opcheck(torch.ops.swat.conv2d.default,
                          (x, w, b, w_thr, a_thr, [2, 1, 1], [1, 0, 1], [1, 1, 1], 1, structure))
    y = ops.swat_conv2d(x, w, b, w_thr, a_thr, [2, 1, 1], [1, 0, 1], [1, 1, 1], 1, structure)
    values, bits = ops.compress_activation(x.detach(), a_thr, structure, 1)
    torch.library.opcheck(torch.ops.swat.conv2d_backward.default,
                          (torch.randn_like(y), w.detach(), w_thr, values, bits, list(x.shape), [2, 1, 1],
                           [1, 0, 1], [1, 1, 1], 1, structure, True, True, True))


def test_swatify_trains_conv3d_and_transposed_convolutions():
    """Before, swatify skipped nn.Conv3d and nn.ConvTranspose*d without a word: its plan said
    "0 of 0 conv/linear layers". Both now train with SWAT, Conv3d with any padding mode."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv3d(2, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv3d(8, 8, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                          nn.ConvTranspose3d(8, 4, 2, stride=2))
    x = torch.randn(3, 2, 5, 4, 6)
    sw = swatify(model, sparsity=0.75, example_inputs=(x,))
    assert isinstance(sw[0], SWATConv3d) and isinstance(sw[2], SWATConv3d) and isinstance(sw[4], SWATConvTranspose)
    plan = {layer.name: layer for layer in sw.sparsify_plan.layers}
    assert set(plan) == {"0", "2", "4"} and all(layer.eligible for layer in plan.values())
    assert sw[0].weight_density == 1.0 and sw[2].weight_density == 0.25  # the raw-input layer stays dense
    sw.train()
    out = sw(x)
    out.square().mean().backward()
    assert sw[2].weight.grad is not None and int(sw[2].step) == 1 and int(sw[4].step) == 1
    # eval: the layer computes with its top-K weights, padded as the source pads
    sw.eval()
    h = F.relu(sw[0](x))
    kept = sw[2].weight * topk_weight_mask(sw[2].weight, 0.25, "unstructured").float()
    ref = F.conv3d(F.pad(h, (1, 1, 1, 1, 1, 1), mode="reflect"), kept, sw[2].bias)
    torch.testing.assert_close(sw[2](h), ref)
    rep = sas_compile.report(sw, (x,), M=(2,), symbolic=False)
    swat_row = {r["name"]: r["swat"][0.75] for r in rep.layers}
    assert swat_row["2"]["forward_mults"] == swat_costs(sw[2], output_positions=3 * 5 * 4 * 6)["forward_mults"]
    # a transposed convolution multiplies per input position
    assert swat_row["4"]["forward_mults"] == swat_costs(sw[4], output_positions=3 * 5 * 4 * 6)["forward_mults"] \
        == ops.topk_count(0.25, 8 * 4 * 8) * 3 * 5 * 4 * 6


def transposed_weight_mask(weight, density, structure):
    """topk_weight_mask of a transposed convolution's weight, ranked with input channels on dim 1."""
    return topk_weight_mask(weight.transpose(0, 1), density, structure).transpose(0, 1)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("dims,stride,padding,output_padding,dilation,groups", [
    (1, (2,), (1,), (1,), (1,), 1),
    (2, (2, 1), (0, 1), (1, 0), (1, 2), 2),
    (3, (1, 2, 2), (1, 0, 1), (0, 1, 0), (2, 1, 1), 3),
])
def test_conv_transpose_gradients_match_masked_float64_reference(structure, dims, stride, padding, output_padding,
                                                                  dilation, groups):
    """swat::conv_transpose against float64 references from topk masks: ragged sizes, output
    padding, dilation, groups; the channel structure removes input channels (dim 0 of the weight)."""
    torch.manual_seed(30 + dims)
    x = torch.randn(2, 6, *(5, 4, 3)[:dims], requires_grad=True)
    w = torch.randn(6, 10 // groups if groups != 3 else 3, *(3, 2, 3)[:dims], requires_grad=True)
    out_channels = w.shape[1] * groups
    b = torch.randn(out_channels, requires_grad=True)
    wd, ad = 0.35, 0.25
    w_thr, a_thr = fresh_thresholds(x, ops.in_channel_view(w), wd, ad, structure, 1)
    y = ops.swat_conv_transpose(x, w, b, w_thr, a_thr, stride, padding, output_padding, dilation, groups, structure)
    gy = torch.randn_like(y)
    y.backward(gy)

    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
    mw = transposed_weight_mask(w, wd, structure)
    ma = topk_activation_mask(x, ad, structure, 1)
    x64, w64, b64, gy64 = (t.detach().double() for t in (x, w, b, gy))
    x_ref = x64.clone().requires_grad_(True)
    ref_y = conv(x_ref, w64 * mw, b64, stride, padding, output_padding, groups, dilation)
    ref_gx, = torch.autograd.grad(ref_y, x_ref, gy64)
    wv = w64.clone().requires_grad_(True)
    ref_gw, = torch.autograd.grad(conv(x64 * ma, wv, b64, stride, padding, output_padding, groups, dilation), wv, gy64)
    assert_matches(y, x, w, b, gy64, ref_y, ref_gx, ref_gw, ma, mw)
    if structure == "channel":  # whole input channels kept or removed
        kept = (mw != 0).flatten(1).any(1)
        assert ((mw != 0) == kept.view(-1, *([1] * (w.dim() - 1)))).all()
        assert int(kept.sum()) == ops.topk_count(wd, w.shape[0])


@pytest.mark.parametrize("structure", STRUCTURES)
def test_opcheck_conv_transpose(structure):
    torch.manual_seed(24)
    x = torch.randn(2, 4, 5, 3, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    args = ([2, 1], [1, 0], [1, 0], [1, 1], 2, structure)
    w_thr, a_thr = fresh_thresholds(x, ops.in_channel_view(w), 0.5, 0.3, structure, 1)
    torch.library.opcheck(torch.ops.swat.conv_transpose.default, (x, w, b, w_thr, a_thr, *args))
    y = ops.swat_conv_transpose(x, w, b, w_thr, a_thr, *args)
    values, bits = ops.compress_activation(x.detach(), a_thr, structure, 1)
    torch.library.opcheck(torch.ops.swat.conv_transpose_backward.default,
                          (torch.randn_like(y), w.detach(), w_thr, values, bits, list(x.shape), *args,
                           True, True, True))


def test_swat_conv_transpose_takes_output_size_and_eval_uses_sparse_weights():
    torch.manual_seed(25)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, groups=2))
    sw = swatify(model, sparsity=0.5, structure="channel")
    layer = sw[2]
    x = torch.randn(2, 8, 4, 5, requires_grad=True)
    layer.train()
    y = layer(x, output_size=[8, 10])  # output_padding (1, 1), resolved as ConvTranspose2d does
    assert y.shape == (2, 4, 8, 10) and y.shape == model[2](x, output_size=[8, 10]).shape
    y.sum().backward()
    layer.eval()
    kept = layer.weight * transposed_weight_mask(layer.weight, 0.5, "channel").float()
    with torch.no_grad():
        torch.testing.assert_close(layer(x, output_size=[8, 10]),
                                   F.conv_transpose2d(x, kept, layer.bias, 2, 1, (1, 1), 2))
        assert int((kept != 0).flatten(1).any(1).sum()) == 4  # half the input channels


@pytest.mark.parametrize("structure", STRUCTURES)
def test_opcheck(structure):
    torch.manual_seed(2)
    x = torch.randn(4, 11, requires_grad=True)
    w = torch.randn(5, 11, requires_grad=True)
    w_thr, a_thr = fresh_thresholds(x, w, 0.5, 0.3, structure, -1)
    torch.library.opcheck(torch.ops.swat.linear.default, (x, w, None, w_thr, a_thr, structure))
    xc = torch.randn(2, 5, 6, 7, requires_grad=True)
    wc = torch.randn(4, 5, 3, 3, requires_grad=True)
    bc = torch.randn(4, requires_grad=True)
    w_thr, a_thr = fresh_thresholds(xc, wc, 0.5, 0.3, structure, 1)
    torch.library.opcheck(torch.ops.swat.conv2d.default,
                          (xc, wc, bc, w_thr, a_thr, [2, 1], [1, 0], [1, 1], 1, structure))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_roundtrip(n):
    torch.manual_seed(n)
    mask = torch.rand(n) > 0.6
    bits = ops.pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == math.ceil(n / 8)
    assert torch.equal(ops.unpack_bits(bits, (n,)), mask)


@pytest.mark.parametrize("structure", STRUCTURES)
def test_compressed_activation_is_small_and_exact(structure):
    torch.manual_seed(3)
    x = torch.randn(4, 16, 10, 10)
    thr = ops.kth_largest(ops.activation_scores(x, structure, 1), 0.1)
    values, bits = ops.compress_activation(x, thr, structure, 1)
    back = ops.decompress_activation(values, bits, x.shape, structure, 1)
    ma = topk_activation_mask(x, 0.1, structure, 1)
    torch.testing.assert_close(back.double(), x.double() * ma)
    stored = values.numel() * values.element_size() + bits.numel()
    assert stored < 0.15 * x.numel() * x.element_size()


# ---------------------------------------------------------------- swatify


class SmallNet(nn.Module):
    """conv -> relu -> conv(groups) -> relu -> pool -> linear -> relu -> linear, ragged sizes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.conv2 = nn.Conv2d(10, 14, 3, stride=2, padding=1, groups=2, bias=False)
        self.fc1 = nn.Linear(14 * 4 * 4, 33)
        self.fc2 = nn.Linear(33, 5)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


def capture_inputs(model):
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[0].detach()))
             for name, m in swat_layers(model).items()]
    return seen, hooks


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_weight_and_activation_densities_per_layer(distribution, structure):
    torch.manual_seed(4)
    base = SmallNet()
    model = swatify(base, sparsity=0.8, distribution=distribution, structure=structure, period=5)
    assert all(type(m) is not SWATLayer for m in base.modules())  # original untouched
    layers = swat_layers(model)
    assert list(layers) == ["conv1", "conv2", "fc1", "fc2"]
    if distribution == "uniform":
        assert layers["conv1"].weight_density == 1.0
        assert all(layers[n].weight_density == pytest.approx(0.2) for n in ["conv2", "fc1", "fc2"])
    else:
        numel = sum(m.weight.numel() for m in layers.values())
        kept = sum(m.weight.numel() * m.weight_density for m in layers.values())
        assert kept / numel == pytest.approx(0.2)
    seen, hooks = capture_inputs(model)
    x = torch.randn(6, 3, 8, 8)
    model(x).sum().backward()
    for h in hooks:
        h.remove()
    for name, layer in layers.items():
        d = layer.weight_density
        assert layer.activation_density == d
        if d == 1.0:
            continue
        mw = ops.weight_mask(layer.weight, layer.weight_threshold, structure).expand_as(layer.weight)
        assert torch.equal(mw.double(), topk_weight_mask(layer.weight, d, structure))
        xin = seen[name]
        if isinstance(layer, SWATConv2d) and layer.pre_pad is not None:
            xin = F.pad(xin, layer.pre_pad)
        cdim = layer.channel_dim
        ma = ops.activation_mask(xin, layer.activation_threshold, structure, cdim)
        scores = ops.activation_scores(xin, structure, cdim)
        nonzero = int((scores > 0).sum())
        assert int(ma.sum()) == min(ops.topk_count(d, scores.numel()), nonzero), name


def _train(model, steps, lr=1e-2, seed=0, batch=32):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    x = torch.randn(batch, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (batch,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_thresholds_change_only_every_period_steps():
    torch.manual_seed(5)
    model = swatify(SmallNet(), sparsity=0.8, period=3)
    layer = swat_layers(model)["fc1"]
    history = []
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(8):
        opt.zero_grad()
        x = torch.randn(8, 3, 8, 8, generator=g)  # a new batch every step
        model(x).pow(2).mean().backward()
        opt.step()
        history.append((float(layer.weight_threshold), float(layer.activation_threshold)))
    assert int(layer.step) == 8
    for step in range(1, 8):
        changed = history[step] != history[step - 1]
        assert changed == (step % 3 == 0), (step, history)
    # no grad, eval: neither refresh nor count
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    assert int(layer.step) == 8


def test_eval_uses_sparse_weights():
    torch.manual_seed(6)
    model = swatify(nn.Sequential(nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 4)), sparsity=0.75).eval()
    layer = model[2]
    x = torch.randn(5, 9)
    ref = F.linear(F.relu(model[0](x)), layer.weight * topk_weight_mask(layer.weight, 0.25, "unstructured").float(),
                   layer.bias)
    torch.testing.assert_close(model(x), ref)
    assert isinstance(model[0], SWATLinear) and model[0].is_dense


@pytest.mark.slow
@pytest.mark.parametrize("structure", STRUCTURES)
def test_training_lowers_the_loss(structure):
    torch.manual_seed(7)
    model = swatify(SmallNet(), sparsity=0.8, structure=structure, period=4)
    losses = _train(model, 40)
    assert losses[-1] < 0.1 * losses[0]


def test_saved_bytes_drop_against_dense():
    torch.manual_seed(8)
    dense = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))
    sparse = swatify(dense, sparsity=0.9, distribution="erk", period=10)
    x = torch.randn(64, 256)
    dense_bytes, out_d = saved_bytes(lambda: dense(x), dense)
    sparse_bytes, out_s = saved_bytes(lambda: sparse(x), sparse)
    out_s.sum().backward()
    # what the layers themselves hold: dense saves x per layer, SWAT ~10% values + 1/8 bitmask
    one = nn.Linear(256, 256)
    one_swat = swatify(nn.Sequential(one), sparsity=0.9, distribution="erk")[0]
    # a lone layer is the first layer: ERK gives it the overall density
    assert one_swat.weight_density == pytest.approx(0.1)
    xr = torch.randn(64, 256, requires_grad=False)
    d1, _ = saved_bytes(lambda: one(xr), one)
    s1, _ = saved_bytes(lambda: one_swat(xr), one_swat)
    act_bytes = xr.numel() * 4
    assert d1 == act_bytes
    # 10% of the values (4 bytes each) + 1 bit per activation + 2 scalar thresholds
    assert act_bytes * 0.1 + act_bytes / 32 <= s1 < act_bytes * 0.1 + act_bytes / 32 + 64
    # the tanh outputs are saved by tanh as well: the network saving is smaller than per layer
    assert sparse_bytes < 0.8 * dense_bytes


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(9)
    base = SmallNet()
    eager = swatify(base, sparsity=0.8, structure="channel", period=2)
    compiled_model = swatify(base, sparsity=0.8, structure="channel", period=2)
    compiled = torch.compile(compiled_model, backend="aot_eager", fullgraph=True)
    le = _train(eager, 3)
    lc = _train(compiled, 3)
    assert le == pytest.approx(lc, rel=1e-5)
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for (n, p), (_, q) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    assert int(swat_layers(compiled_model)["fc1"].step) == 3


def test_compile_with_graph_breaks_matches_eager():
    """Without fullgraph dynamo breaks the graph at each SWAT layer; results stay the same."""
    torch.manual_seed(15)
    base = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 5))
    eager = swatify(base, sparsity=0.6, period=2)
    other = swatify(base, sparsity=0.6, period=2)
    compiled = torch.compile(other, backend="aot_eager")
    x = torch.randn(10, 12)
    for _ in range(3):
        le, lc = eager(x).pow(2).mean(), compiled(x).pow(2).mean()
        le.backward()
        lc.backward()
        assert lc.item() == pytest.approx(le.item(), rel=1e-6)
    for (n, p), (_, q) in zip(eager.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_conv1d_and_padding_modes():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv1d(2, 6, 5, padding="same", padding_mode="circular"), nn.ReLU(),
                          nn.Conv1d(6, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, 2, 17))
    sw = swatify(model, sparsity=0.5, structure="channel")
    assert isinstance(sw[0], SWATConv1d) and isinstance(sw[2], SWATConv1d)
    x = torch.randn(4, 2, 17, requires_grad=True)
    out = sw(x)
    out.sum().backward()
    # channel-structured weights: half of the input channels are removed in every filter
    ref = F.conv1d(F.relu(model[0](x)), sw[2].weight * topk_weight_mask(sw[2].weight, 0.5, "channel").float(),
                   sw[2].bias, stride=2)
    torch.testing.assert_close(sw[2].eval()(F.relu(sw[0](x))), ref)


def test_erk_densities_by_hand():
    # (Co+Ci+k+k)/(Co*Ci*k*k): conv 4x2x3x3 -> 12/72, linear 100x200 -> 300/20000
    shapes = {"a": (4, 2, 3, 3), "b": (100, 200)}
    eps = 0.1 * (72 + 20000) / (12 + 300)
    assert eps * 12 / 72 > 1  # so "a" is capped at dense and "b" takes the rest of the budget
    d = erk_densities(shapes, 0.1)
    assert d["a"] == 1.0
    assert d["b"] == pytest.approx((0.1 * 20072 - 72) / 20000)
    # no cap: densities proportional to the ERK ratio
    d = erk_densities(shapes, 0.05)
    eps = 0.05 * 20072 / 312
    assert d["a"] == pytest.approx(eps / 6) and d["b"] == pytest.approx(eps * 0.015)
    d = erk_densities({"a": (100, 100), "b": (10, 1000)}, 0.1)
    assert d["a"] / d["b"] == pytest.approx((200 / 10000) / (1010 / 10000))
    assert (d["a"] * 10000 + d["b"] * 10000) / 20000 == pytest.approx(0.1)


def test_swat_costs():
    layer = nn.Conv2d(16, 8, 3)
    c = swat_costs(layer, 0.25, 0.1, output_positions=100)
    assert c == {"forward_mults": 288 * 100, "backward_input_mults": 288 * 100,
                 "backward_weight_mults": round(0.1 * 1152 * 100)}
    c = swat_costs(layer, 0.25, 0.5, structure="channel", output_positions=10)
    assert c["forward_mults"] == 8 * 4 * 9 * 10 and c["backward_weight_mults"] == 1152 * 10 // 2
    sw = swatify(nn.Sequential(nn.Linear(3, 3), nn.Linear(20, 5)), sparsity=0.9)[1]
    assert swat_costs(sw) == {"forward_mults": 10, "backward_input_mults": 10, "backward_weight_mults": 10}
    dense = swat_costs(layer, 1.0, 1.0, output_positions=7)
    assert set(dense.values()) == {1152 * 7}
    from sas_compile.plan import LayerPlan

    plan = LayerPlan(name="c", node="c", op="conv2d", eligible=True, reason=None, in_channels=16,
                     out_channels=8, kernel_size=(3, 3), output_shape=(2, 8, 5, 5))
    assert swat_costs(plan, 0.25, 0.1)["forward_mults"] == 288 * 50
    with pytest.raises(ValueError, match="weight_density"):
        swat_costs(layer)


@pytest.mark.parametrize("kwargs,match", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
    ({"distribution": "random"}, "distribution"), ({"structure": "block"}, "structure"),
    ({"period": 0}, "period"), ({"period": 2.5}, "period"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        swatify(SmallNet(), **kwargs)


def test_filter_fn_picks_layers():
    model = swatify(SmallNet(), filter_fn=lambda m, name: isinstance(m, nn.Linear))
    assert list(swat_layers(model)) == ["fc1", "fc2"]
    # conv1 reads the raw input but is filtered out: no converted layer stays dense
    assert model.fc1.weight_density == pytest.approx(0.1)
    assert model.fc2.weight_density == pytest.approx(0.1)


def test_bitmask_relu_is_exact_and_saves_one_bit_per_value():
    torch.manual_seed(12)
    x = torch.randn(3, 5, 7, 11, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    held, y = saved_bytes(lambda: ops.swat_relu(x), nn.Module())
    g = torch.randn_like(y)
    y.backward(g)
    torch.relu(x_ref).backward(g)
    assert torch.equal(y, torch.relu(x_ref))
    assert torch.equal(x.grad, x_ref.grad)
    assert held == math.ceil(x.numel() / 8)
    torch.library.opcheck(torch.ops.swat.relu.default, (x,))


def test_relu_bitmask_makes_the_network_saving_real():
    """With torch's ReLU the dense layer inputs stay alive (ReLU saves them); swapped, they go."""
    torch.manual_seed(13)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                          nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 36, 5))
    x = torch.randn(8, 3, 6, 6)
    d, out_d = saved_bytes(lambda: dense(x), dense)
    torch_relu = swatify(dense, sparsity=0.9, relu_bitmask=False)
    kept, _ = saved_bytes(lambda: torch_relu(x), torch_relu)
    sw = swatify(dense, sparsity=0.9)
    s, out_s = saved_bytes(lambda: sw(x), sw)
    act = 8 * 16 * 36 * 4  # one hidden activation in bytes
    assert d == x.numel() * 4 + 3 * act  # the input (first conv) + the three ReLU outputs
    assert kept > d  # the ReLUs still hold the dense tensors, plus SWAT's compressed copies
    assert s < 0.35 * d
    out_s.sum().backward()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_opcheck_backward_ops(structure):
    torch.manual_seed(14)
    x, w, gy = torch.randn(4, 9), torch.randn(6, 9), torch.randn(4, 6)
    w_thr, a_thr = fresh_thresholds(x, w, 0.5, 0.3, structure, -1)
    values, bits = ops.compress_activation(x, a_thr, structure, -1)
    torch.library.opcheck(torch.ops.swat.linear_backward.default,
                          (gy, w, w_thr, values, bits, [4, 9], structure, True, True, True))
    xc, wc = torch.randn(2, 4, 5, 5), torch.randn(3, 4, 3, 3)
    w_thr, a_thr = fresh_thresholds(xc, wc, 0.5, 0.3, structure, 1)
    values, bits = ops.compress_activation(xc, a_thr, structure, 1)
    gc = torch.randn(2, 3, 3, 3)
    torch.library.opcheck(torch.ops.swat.conv2d_backward.default,
                          (gc, wc, w_thr, values, bits, [2, 4, 5, 5], [1, 1], [0, 0], [1, 1], 1,
                           structure, True, False, True))


def test_example_mnist1d_main_quick():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "swat_mnist1d.py"
    spec = importlib.util.spec_from_file_location("swat_mnist1d", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    res = example.main(["--seeds", "2", "--steps", "3", "--samples", "200", "--channels", "4",
                        "--batch", "16", "--no-progress"])
    assert list(res) == ["dense", "SWAT 80%", "SWAT 90%"]
    for r in res.values():
        assert len(r["accuracies"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracies"])


class HeadFirst(nn.Module):
    """Registers the head before the stem: only the graph knows which layer reads the input."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Linear(5, 8)

    def forward(self, x):
        return self.head(torch.relu(self.stem(x)))


def test_example_inputs_find_the_layer_on_the_raw_input():
    by_order = swatify(HeadFirst(), sparsity=0.5)
    assert by_order.head.weight_density == 1.0 and by_order.stem.weight_density == 0.5
    by_graph = swatify(HeadFirst(), sparsity=0.5, example_inputs=(torch.randn(2, 5),))
    assert by_graph.stem.weight_density == 1.0 and by_graph.head.weight_density == 0.5


# ---------------------------------------------------------------- DDP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 8, 3, 8, 8, generator=g), torch.randint(0, 5, (4, 8), generator=g)


def _ddp_model(structure):
    torch.manual_seed(11)
    return swatify(SmallNet(), sparsity=0.7, structure=structure, period=2)


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for structure in STRUCTURES:
            model = _ddp_model(structure)
            ddp = DistributedDataParallel(model)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            xs, ys = _ddp_data()
            per = xs.shape[1] // world
            for x, y in zip(xs, ys):
                opt.zero_grad()
                part = slice(rank * per, (rank + 1) * per)
                F.cross_entropy(ddp(x[part]), y[part]).backward()
                opt.step()
            if rank == 0:
                torch.save(model.state_dict(), os.path.join(out_dir, f"{structure}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_gloo_ranks_match_one_process():
    """Each rank sees half of every batch; thresholds are taken over both halves."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_worker, args=(2, _free_port(), tmp), nprocs=2, join=True)
        ddp_states = {s: torch.load(os.path.join(tmp, f"{s}.pt")) for s in STRUCTURES}
    for structure in STRUCTURES:
        model = _ddp_model(structure)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        xs, ys = _ddp_data()
        for x, y in zip(xs, ys):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        for name, value in model.state_dict().items():
            torch.testing.assert_close(ddp_states[structure][name], value, rtol=1e-4, atol=1e-5,
                                       msg=f"{structure}: {name}")


def test_conv_transpose_under_autocast_and_create_graph():
    """swat::conv_transpose casts like aten::linear under autocast, and refuses a double backward
    (its backward is SWAT's training gradient, not the forward's derivative)."""
    torch.manual_seed(26)
    sw = swatify(nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.ConvTranspose1d(6, 4, 3, stride=2)), sparsity=0.5)
    sw.train()
    x = torch.randn(2, 3, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sw(x)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert sw[2].weight.grad.dtype == torch.float32 and sw[2].weight.grad.abs().sum() > 0
    xs = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(sw(xs).sum(), xs, create_graph=True)
