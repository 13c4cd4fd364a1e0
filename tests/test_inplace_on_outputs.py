"""A layer's output may be written in place, as with the dense layer it replaces.

Models write into a layer's output: ``hidden[mask] = embedding`` (wav2vec2's time masking),
``out += residual``. Autograd forbids that on a custom op's output that is a view (it cannot
rebase a view made inside the op onto the op's backward), and ``F.linear`` on a 3-D input with
a bias returns a view of its 2-D product. Every op must hand back a tensor of its own; these
write into each layer's output in a training step and check the gradients against float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sas_compile
from sas_compile.runtime.projection import expand_dense_weight, reference_project


def _write_into(y: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    y[mask] = fill  # index_put_ on the op's output, as wav2vec2 does
    y += 0.25  # and an in-place add
    return y


def _masked(shape, generator):
    mask = torch.rand(shape[:-1], generator=generator) < 0.4
    mask.view(-1)[0] = True
    return mask


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_sas_linear_output_written_in_place(M, bias):
    g = torch.Generator().manual_seed(M)
    dense = nn.Linear(12, 7, bias=bias)
    sas = sas_compile.sasify(nn.Sequential(nn.Identity(), dense), M=M, dense_input_layers=False)[1]
    x = torch.randn(3, 5, 12, generator=g)
    mask = _masked((3, 5, 7), g)
    fill = torch.randn(7, generator=g)
    weights = torch.randn(3, 5, 7, generator=g)

    xs = x.clone().requires_grad_()
    (_write_into(sas(xs), mask, fill) * weights).sum().backward()

    x64 = x.double().requires_grad_()
    w64 = sas.weight.detach().double().requires_grad_()
    b64 = sas.bias.detach().double().requires_grad_() if bias else None
    ref = F.linear(reference_project(x64, M, -1), w64, b64)
    (_write_into(ref, mask, fill.double()) * weights.double()).sum().backward()

    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sas.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(sas.bias.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)


def test_linear_from_dense_output_written_in_place():
    """The op ``torch.compile(backend="sas")`` calls on a dense model, with ``train_dense``."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 10, generator=g)
    weight = torch.randn(9, 10, generator=g)
    bias = torch.randn(9, generator=g)
    mask = _masked((2, 6, 9), g)
    fill = torch.randn(9, generator=g)

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, weight, bias))
    y = torch.ops.sas.linear_from_dense(xs, ws, bs, 2, False, "sign_pattern", True)
    _write_into(y, mask, fill).sum().backward()

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, weight, bias))
    ref = F.linear(reference_project(x64, 2, -1), expand_dense_weight(w64, 2), b64)
    _write_into(ref, mask, fill.double()).sum().backward()
    for got, want in ((xs, x64), (ws, w64), (bs, b64)):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_swat_output_written_in_place(kind):
    g = torch.Generator().manual_seed(2)
    # a layer before it: the one reading the raw input stays dense under the uniform distribution
    if kind == "linear":
        first, layer = nn.Linear(16, 16), nn.Linear(16, 8)
        x = torch.randn(4, 3, 16, generator=g)
        out_shape = (4, 3, 8)
    else:
        first, layer = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 8, 3, padding=1)
        x = torch.randn(2, 6, 5, 5, generator=g)
        out_shape = (2, 8, 5, 5)
    model = sas_compile.swatify(nn.Sequential(first, layer), sparsity=0.5, distribution="uniform",
                                relu_bitmask=False, filter_fn=lambda module, fqn: fqn == "1")
    swat = model[1]
    swat.train()
    if kind == "linear":
        mask, fill = _masked(out_shape, g), torch.randn(out_shape[-1], generator=g)
    else:
        mask, fill = torch.rand(out_shape, generator=g) < 0.4, torch.tensor(0.5)
    xs = x.clone().requires_grad_()
    y = swat(xs)
    _write_into(y, mask, fill).sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()
    # the input gradient is the dense one through the sparse weight: the written positions pass none
    kept = swat.sparse_weight().detach()
    assert (kept == 0).any() and (kept != 0).any()
    x64 = x.double().requires_grad_()
    if kind == "linear":
        ref = F.linear(x64, kept.double(), swat.bias.detach().double())
    else:
        ref = F.conv2d(x64, kept.double(), swat.bias.detach().double(), padding=1)
    _write_into(ref, mask, fill.double()).sum().backward()
    torch.testing.assert_close(xs.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
