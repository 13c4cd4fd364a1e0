"""Each SAS pass on its own: a small graph in, a plan or a graph out.

The passes all have the signature ``pass_(graph_module, plan, config) -> plan`` and run in
the order of ``passes/pipeline.py``; here each is run alone on a hand-made graph.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.runtime import sas_ops
from sas_compile.passes import pipeline
from sas_compile.passes.find_foldable_relus import find_foldable_relus
from sas_compile.passes.find_sas_layers import find_sas_layers
from sas_compile.passes.plan import Plan
from sas_compile.passes.rewrite_layers_to_sas import rewrite_layers_to_sas
from sas_compile.runtime.layers import SASConv2d, SASLinear

CONFIG = SimpleNamespace(M=2, rule="sign_pattern", filter_fn=None, dense_input_layers=True, fold_relu=True)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head_w = nn.Parameter(torch.randn(5, 6))

    def forward(self, x):
        z = self.stem(x)
        y = self.conv(F.relu(z))
        pooled = y.mean((2, 3))
        return F.linear(pooled, self.head_w) + z.mean()


def traced():
    torch.manual_seed(0)
    model = Net().eval()
    return model, fx.symbolic_trace(model)


def analysed(config=CONFIG):
    model, gm = traced()
    plan = find_sas_layers(gm, Plan(layers=[], capture="symbolic_trace", model=model), config)
    return model, gm, plan


def test_find_sas_layers_lists_every_call_with_its_reason():
    _, _, plan = analysed()
    layers = {layer.name: layer for layer in plan.layers}
    assert list(layers) == ["stem", "conv", "head_w"]
    assert not layers["stem"].eligible and "input layer" in layers["stem"].reason
    assert layers["conv"].eligible and layers["conv"].weight_kind == "module"
    assert layers["head_w"].eligible and layers["head_w"].weight_kind == "attr" and layers["head_w"].op == "linear"
    assert layers["conv"].call.module is not None  # the matched call is kept by the plan
    assert plan.M is None  # the analysis knows no M
    assert plan.graph_before is None  # the pass writes no code (the torch.compile backend has no reader for it)


def test_analyze_graph_keeps_the_code_before_the_rewrite():
    from sas_compile.passes.pipeline import analyze_graph

    model, gm = traced()
    plan = analyze_graph(gm, "symbolic_trace", CONFIG, model=model)
    assert plan.graph_before == gm.code and "conv" in plan.graph_before


def test_find_sas_layers_reads_filter_fn_and_the_input_policy_from_config():
    config = SimpleNamespace(**{**vars(CONFIG), "dense_input_layers": False,
                                "filter_fn": lambda module, fqn: fqn != "conv"})
    _, _, plan = analysed(config)
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["stem"].eligible
    assert not layers["conv"].eligible and layers["conv"].reason == "excluded by filter_fn"


def test_find_foldable_relus_marks_the_fold_and_the_reasons():
    _, gm, plan = analysed()
    plan = find_foldable_relus(gm, plan, CONFIG)
    layers = {layer.name: layer for layer in plan.layers}
    assert layers["conv"].fold_relu and layers["conv"].relu_node is not None
    assert not layers["head_w"].fold_relu and layers["head_w"].fold_relu_reason == "input is not a ReLU"
    no_fold = find_foldable_relus(gm, plan, SimpleNamespace(**{**vars(CONFIG), "fold_relu": False}))
    assert all(not layer.fold_relu for layer in no_fold.layers)
    export = find_foldable_relus(gm, Plan(layers=plan.layers, capture="export"), CONFIG)
    assert "module swap" in {layer.name: layer for layer in export.layers}["conv"].fold_relu_reason


def test_rewrite_layers_to_sas_changes_the_graph_and_keeps_the_function():
    model, gm, plan = analysed()
    plan = find_foldable_relus(gm, plan, CONFIG)
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    plan = rewrite_layers_to_sas(gm, plan, CONFIG)
    assert isinstance(gm.conv, SASConv2d) and gm.conv.M == 2
    assert gm.head_w.shape == (5, 12)  # the functional weight became its wide version
    assert any(n.target is sas_ops.sas_linear_call for n in gm.graph.nodes)  # the op through its entry point
    assert "sas_linear_call" in plan.graph_after
    # the folded ReLU is gone from the SAS layer's input, the stem's other consumer still reads z
    assert not any(n.op == "call_function" and n.target is F.relu for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


def test_pipeline_runs_the_passes_in_its_order():
    model, _ = traced()
    plan = pipeline.analyze_model(model, None, CONFIG)
    assert [p.__name__ for p in pipeline.ANALYSIS] == ["find_sas_layers", "find_foldable_relus"]
    assert [p.__name__ for p in pipeline.SAS_REWRITE] == ["rewrite_layers_to_sas"]
    assert [p.__name__ for p in pipeline.GPU_LOWERING] == ["lower_sas_to_projection"]
    assert {layer.name: layer.fold_relu for layer in plan.layers}["conv"]


def test_module_plan_without_a_graph_keeps_the_capture_error():
    from sas_compile.passes.capture import CaptureError

    error = CaptureError("cannot trace")
    plan = pipeline.module_plan(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), CONFIG, error)
    assert plan.capture == "modules" and plan.capture_error is error
    assert [layer.eligible for layer in plan.layers] == [False, True]


def test_every_pass_has_the_pipeline_signature():
    import inspect

    for pass_ in (*pipeline.ANALYSIS, *pipeline.SAS_REWRITE, *pipeline.GPU_LOWERING):
        assert list(inspect.signature(pass_).parameters) == ["gm", "plan", "config"], pass_.__name__


@pytest.mark.parametrize("M", [2, 4])
def test_sasified_linear_module_swap_equals_dense(M):
    from sas_compile.passes.rewrite_layers_to_sas import sas_module

    dense = nn.Linear(6, 3)
    x = torch.randn(4, 6)
    layer = sas_module(dense, M, False, "sign_pattern")
    assert isinstance(layer, SASLinear)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)


def _sasified_mlp():
    import sas_compile

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    return sas_compile.sasify(dense, M=2)


def test_backend_lists_the_sas_layers_of_a_sasified_model(monkeypatch, capsys):
    # SASLinear.forward calls the packet torch.ops.sas.linear, the spelling dynamo records
    from sas_compile import backend

    sas = _sasified_mlp()
    plans = []
    explain = backend._explain
    monkeypatch.setattr(backend, "_explain", lambda plan, *a: plans.append(plan) or explain(plan, *a))
    torch._dynamo.reset()
    x = torch.randn(2, 4)
    compiled = torch.compile(sas, backend="sas", options={"inner": "eager", "explain": True})
    torch.testing.assert_close(compiled(x), sas(x))
    torch._dynamo.reset()
    (plan,) = plans
    assert any(n.target is torch.ops.sas.linear for n in plan.gm.graph.nodes if n.op == "call_function")
    existing = [(layer.name, layer.op, layer.sas_M, layer.in_channels, layer.out_channels)
                for layer in plan.layers if layer.sas_M]
    assert existing == [("2", "linear", 2, 8, 8), ("4", "linear", 2, 8, 3)]
    assert all(not layer.eligible and "already a SAS layer (M=2)" in layer.reason
               for layer in plan.layers if layer.sas_M)
    assert all(layer.parameter_sources == (f"{layer.name}.weight", f"{layer.name}.bias")
               for layer in plan.layers if layer.sas_M)
    out = capsys.readouterr().out
    assert "0 of 3 conv/linear layers" in out and "dense      4 (linear): already a SAS layer" in out


@pytest.mark.parametrize("spelling", ["packet", "default"])
def test_find_sas_layers_and_the_lowering_read_either_spelling_of_a_sas_op(spelling):
    from sas_compile.passes.find_sas_layers import sas_op
    from sas_compile.passes.lower_sas_to_projection import lower_sas_to_projection
    from sas_compile.runtime import sas_ops

    def spelled(packet):
        return packet if spelling == "packet" else packet.default

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(5, 12))
            self.dense_w = nn.Parameter(torch.randn(4, 5))

        def forward(self, x):
            y = spelled(torch.ops.sas.linear)(x, self.w, None, 2, "sign_pattern")
            return spelled(torch.ops.sas.linear_from_dense)(y, self.dense_w, None, 2, False, "sign_pattern", False)

    model = Functional()
    gm = fx.symbolic_trace(model)
    x = torch.randn(3, 6)
    want = model(x)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert calls == [spelled(torch.ops.sas.linear), spelled(torch.ops.sas.linear_from_dense)]
    assert [sas_op(target).kind for target in calls] == ["linear", "linear_from_dense"]
    plan = find_sas_layers(gm, Plan(layers=[], capture="symbolic_trace", model=model), CONFIG)
    assert [(layer.name, layer.sas_M, layer.in_channels, layer.out_channels) for layer in plan.layers] == \
        [("w", 2, 6, 5)]  # the from-dense call is a rewrite's output, not an existing wide weight
    # the lowering only retargets the calls: it runs on this machine when told the graph's device
    plan = lower_sas_to_projection(gm, plan, SimpleNamespace(device="cuda", measure_kernels=False))
    assert plan.lowered == 2
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [sas_ops.projected_linear, sas_ops.dense_linear_through]
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
