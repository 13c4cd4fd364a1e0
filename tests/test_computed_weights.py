"""Layers whose weight is computed before each call: weight_norm, spectral_norm, parametrizations.

``torch.nn.utils.weight_norm`` (deprecated, common in audio models) recomputes ``weight`` from
``weight_g`` and ``weight_v`` in a forward pre-hook and keeps it as a non-leaf tensor, which
``copy.deepcopy`` refuses: ``sasify`` crashed with a TypeError. The parametrization versions
compute it on access. A wide copy of such a weight would bypass (or be overwritten by) that
computation, so every conversion keeps these layers dense and says why; the rest converts.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations

import sas_compile
from sas_compile.runtime.layers import SAS_LAYERS

NORMS = {
    "weight_norm": lambda m: nn.utils.weight_norm(m),
    "parametrizations.weight_norm": parametrizations.weight_norm,
    "spectral_norm": lambda m: nn.utils.spectral_norm(m),
    "parametrizations.spectral_norm": parametrizations.spectral_norm,
}


def _model(norm: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight_norm's deprecation
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), NORMS[norm](nn.Linear(8, 3)),
                             nn.ReLU(), nn.Conv1d(1, 2, 3, padding=1)).eval()


class Unsqueeze(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


@pytest.mark.parametrize("norm", list(NORMS))
def test_sasify_keeps_a_computed_weight_dense_and_converts_the_rest(norm):
    model = _model(norm)
    model.insert(6, Unsqueeze())
    x = torch.randn(5, 4)
    sas = sas_compile.sasify(model, M=2)
    layers = {layer.name: layer for layer in sas.sas_plan.layers}
    assert not layers["4"].eligible and "computed" in layers["4"].reason
    assert layers["2"].eligible and isinstance(sas[2], SAS_LAYERS) and isinstance(sas[7], SAS_LAYERS)
    assert not isinstance(sas[4], SAS_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x), rtol=1e-5, atol=1e-6)
    sas.train()
    sas(x).sum().backward()
    assert all(p.grad is not None for p in sas.parameters() if p.requires_grad)


@pytest.mark.parametrize("norm", list(NORMS))
def test_report_counts_each_parameter_once(norm):
    model = _model(norm)[:5]
    x = torch.randn(5, 4)
    report = sas_compile.report(model, (x,), M=2)
    assert report.totals["base"]["params"] == sum(p.numel() for p in model.parameters())
    assert report.totals["base"]["mults"] == 5 * (4 * 8 + 8 * 8 + 8 * 3)


@pytest.mark.parametrize("norm", ["weight_norm", "parametrizations.weight_norm"])
def test_swatify_and_swsify_keep_it_as_it_is(norm):
    model = _model(norm)[:5].train()
    x = torch.randn(5, 4)
    swat = sas_compile.swatify(model, sparsity=0.5)
    swat(x).sum().backward()
    listed = {layer.name: layer for layer in swat.sparsify_plan.layers}
    assert "4" not in listed or not listed["4"].eligible
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    layers = {layer.name: layer for layer in sws.sparsify_plan.layers}
    assert not layers["4"].eligible and "computed before each call" in layers["4"].reason
    assert sws(x).shape == (5, 3)


def test_the_backend_keeps_it_dense():
    model = _model("parametrizations.weight_norm")[:5]
    x = torch.randn(5, 4)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
