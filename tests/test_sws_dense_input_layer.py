"""SWS and the layer on the raw network input: widened output, dense weight by default, as sasify.

SAS keeps the layer reading the raw input dense by default (``dense_input_layers=True``);
SWS must treat it the same way (widen its output, keep its weight dense) so the SAS vs SWS
comparison is fair, and ``report``'s SWS columns must count exactly what ``swsify`` builds
for both settings (checked on the whole test zoo).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import sas_compile
from sas_compile.accounting import sws_width
from sas_compile.api import analyze
from sas_compile.sws import export_sws_weights, measure_sws_model

from sws_checks import CNN1d, assert_report_agrees, by_target, check_one_of_m
from zoo import models as zoo_models

torch.manual_seed(0)


class ScaledInput(nn.Module):
    """Parameter-free ops before the first layer: it still reads the raw input (sasify's notion)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.flatten(x * 2.0, 1))))


# --------------------------------------------------------------------------- the dense input layer


def test_input_layer_is_dense_by_default_and_widens_its_output():
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(CNN1d(), M=4, example_inputs=x)
    first = by_target(s)["net.0.weight"]
    assert first.widened and not first.sparse and first.reads_network_input
    assert first.out_channels == sws_width(32, 4) and first.in_channels == 1
    assert "raw network input" in first.reason and "dense_input_layers" in first.reason
    assert first.nonzeros == first.weight_numel == sws_width(32, 4) * 5
    assert not parametrize.is_parametrized(s.get_submodule("net.0"), "weight")
    costs = measure_sws_model(s)["net_0"]
    assert not costs["sparse"] and costs["nonzeros"] == costs["weight_numel"] == sws_width(32, 4) * 5
    assert export_sws_weights(s, strict=True).keys() == {"net_2", "net_4", "fc"}  # dense layers are not packed
    # every other widened layer is sparse
    assert all(w.sparse for n, w in s.sws_widths.layers.items() if n != "net_0")


def test_dense_input_layers_false_masks_the_input_layer():
    x = torch.randn(3, 1, 40)
    s = sas_compile.swsify(CNN1d(), M=4, example_inputs=x, dense_input_layers=False)
    first = by_target(s)["net.0.weight"]
    assert first.widened and first.sparse and first.reads_network_input is False
    assert "dense" not in (first.reason or "")
    check_one_of_m(s.get_submodule("net.0"), 4)
    assert measure_sws_model(s)["net_0"]["nonzeros"] == math.ceil(sws_width(32, 4) * 5 / 4)


def test_raw_input_through_parameter_free_ops_is_sasify_s_notion():
    x = torch.randn(4, 2, 3)
    s = sas_compile.swsify(ScaledInput(), M=2, example_inputs=x)
    w = by_target(s)
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
    w = by_target(s)
    assert not w["4.weight"].widened and not w["4.weight"].sparse and "filter_fn" in w["4.weight"].reason
    assert w["0.weight"].widened and not w["0.weight"].sparse and "raw network input" in w["0.weight"].reason
    assert w["2.weight"].widened and w["2.weight"].sparse and "filter_fn" in w["2.weight"].reason  # output stays
    assert (w["2.weight"].in_channels, w["2.weight"].out_channels) == (sws_width(16, 2), 16)
    # report passes filter_fn to the SWS widths too: it counts the model swsify builds
    rep = sas_compile.report(model, (x,), M=(2,), filter_fn=keep)
    row = {r["name"]: r for r in rep.layers}["4"]["sws"][2]
    assert (row["in_features"], row["out_features"]) == (16, 16) and row["mults"] == 2 * 16 * 16
    built = measure_sws_model(s, (x,))
    assert [c["mults"] for c in built.values()] == [r["sws"][2]["mults"] for r in rep.layers]


# --------------------------------------------------------------------------- agreement on the zoo


def _agreement_models():
    out = dict(zoo_models())
    # the zoo's resnet18 is sas_compile.models.resnet18(width=16) (10 classes): residual adds, downsample
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dense_input_layers", [True, False])
@pytest.mark.parametrize("name", sorted(_agreement_models()))
def test_report_agrees_with_swsify_on_the_zoo(name, dense_input_layers):
    factory, make_x = _agreement_models()[name]
    torch.manual_seed(0)
    model, x = factory(), make_x()
    M = 4
    _, s, built = assert_report_agrees(model, x, M, dense_input_layers)
    plan = analyze(model, (x,))
    reads = [layer.input_is_graph_input for layer in plan.layers]
    assert [w.reads_network_input for w in s.sws_widths.layers.values()] == \
        [r and dense_input_layers for r in reads]  # sasify's notion of the raw-input layer
    for (node, w), c in zip(s.sws_widths.layers.items(), built.values()):
        assert c["sparse"] == (w.widened and not (dense_input_layers and w.reads_network_input))
    if dense_input_layers and any(reads):
        assert not all(c["sparse"] for c in built.values())
