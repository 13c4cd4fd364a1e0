"""swsify keeps the user's class when the SWS network is the model with modules swapped.

Before, every swsify result was a torch.fx GraphModule: ``sws[0]`` on a Sequential raised
"'Sequential' object is not subscriptable" although its repr said Sequential, a ResNet's
``sws.layer4[-1]`` failed (containers are bare modules there) and the class's own methods were
gone. Each kept-class result here is checked against the GraphModule the same build gives when
the swap is refused (``swap_into_model`` forced to say no): the same parameters from the same
seed, equal outputs in both modes and equal gradients, and the same ``measure_sws_model`` and
``lower_sws`` results.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

import sas_compile
import sas_compile.sws as sws_module
from sas_compile.passes.lower_sws_to_packed import PackedSWSLinear
from sas_compile.sws import export_sws_weights, lower_sws, measure_sws_model

from sws_checks import CNN1d, assert_report_agrees


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class SmallResNet(nn.Module):
    """Containers, a residual add, a method of its own, dropout following the mode."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList([Block(8), Block(8)])
        self.head = nn.Linear(8, 5)

    def features(self, x):
        x = self.stem(x)
        for block in self.layers:
            x = block(x)
        return x.mean((2, 3))

    def forward(self, x):
        return self.head(F.dropout(self.features(x), 0.3, training=self.training))


class SharedAndTied(nn.Module):
    """A module called twice, two linears sharing one weight, a LayerNorm and a transposed conv."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 6, 4, stride=2, padding=1)
        self.inner = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.up(x).transpose(1, 2)
        h = torch.tanh(self.inner(torch.tanh(self.inner(h))))
        h = self.norm(h)
        return self.out(self.a(h) + self.b(h))


class Scaled(nn.Module):
    """Parameters and buffers read by the forward itself (graph get_attr nodes), at the root and nested."""

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.gain = nn.Parameter(torch.rand(6) + 0.5)
            self.register_buffer("shift", torch.randn(6))
            self.register_buffer("scratch", torch.zeros(6), persistent=False)

        def forward(self, x):
            return self.fc(x) * self.gain - self.shift + self.scratch

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.inner = Scaled.Inner()
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.last = nn.Linear(6, 2)

    def forward(self, x):
        return self.last(torch.relu(self.inner(self.first(x) * self.scale)))


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 12)
        self.c = nn.Linear(12, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = checkpoint(lambda t: torch.relu(self.b(t)), h, use_reentrant=False)
        return self.c(h)


def _models():
    return [
        ("sequential", lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                             nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                             nn.Flatten(), nn.Linear(12, 7)), torch.randn(3, 3, 9, 11)),
        ("resnet", SmallResNet, torch.randn(2, 3, 10, 9)),
        ("shared_tied", SharedAndTied, torch.randn(3, 2, 5)),
        ("cnn1d", CNN1d, torch.randn(4, 1, 40)),
        ("scaled", Scaled, torch.randn(4, 5)),
    ]


def _build(factory, x, M, keep_class, monkeypatch, **kw):
    torch.manual_seed(0)
    model = factory()
    with monkeypatch.context() as patch:
        if not keep_class:
            patch.setattr(sws_module, "swap_into_model", lambda *args: "forced for the test")
        torch.manual_seed(1)
        return sas_compile.swsify(model, M=M, example_inputs=(x,), **kw)


def _step(model, x, seed):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("name,factory,x", _models(), ids=[m[0] for m in _models()])
def test_kept_class_computes_what_the_graph_computes(name, factory, x, M, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="sas_compile"):
        kept = _build(factory, x, M, True, monkeypatch)
    assert not [r for r in caplog.records if "GraphModule" in r.getMessage()]
    graph = _build(factory, x, M, False, monkeypatch)
    assert type(kept) is type(factory()) and kept.sws_module_swaps
    assert isinstance(graph, fx.GraphModule) and not getattr(graph, "sws_module_swaps", False)
    # the same parameters from the same seed (the kept model also holds modules the graph never calls)
    graph_state, kept_state = graph.state_dict(), kept.state_dict()
    assert set(graph_state) <= set(kept_state)
    for key, value in graph_state.items():
        assert torch.equal(kept_state[key], value), key
    assert kept.sws_layers == {n: graph.sws_layers[n] for n in kept.sws_layers}
    assert set(kept.sws_layers) == set(graph.sws_layers)
    assert [layer.name for layer in kept.sparsify_plan.layers] == [layer.name for layer in graph.sparsify_plan.layers]
    for mode in ("train", "eval"):
        kept.train(mode == "train")
        graph.train(mode == "train")
        out_k, grads_k = _step(kept, x, 5)
        out_g, grads_g = _step(graph, x, 5)
        assert torch.equal(out_k, out_g), mode
        assert grads_g and set(grads_g) <= set(grads_k)
        for key, grad in grads_g.items():
            torch.testing.assert_close(grads_k[key], grad, rtol=0, atol=0, msg=key)
    assert measure_sws_model(kept, (x,)) == measure_sws_model(graph, (x,))
    kept.eval()
    graph.eval()
    low_k, low_g = lower_sws(kept, target="cpu"), lower_sws(graph, target="cpu")
    assert type(low_k) is type(kept) and low_k is not kept
    assert low_k.sws_lowering.lowered == low_g.sws_lowering.lowered
    assert low_k.sws_lowering.kept == low_g.sws_lowering.kept
    assert all(isinstance(low_k.get_submodule(path), PackedSWSLinear) for path in low_k.sws_lowering.lowered.values())
    assert low_k.sws_lowering.lowered or M == 2  # at M=4 every model here has a masked linear to pack (M=2 widths are odd)
    with torch.no_grad():
        assert torch.equal(low_k(x), low_g(x))
    assert measure_sws_model(low_k, (x,)) == measure_sws_model(low_g, (x,))
    assert export_sws_weights(kept, strict=False).keys() == \
        export_sws_weights(graph, strict=False).keys()


def test_the_users_class_indexes_and_keeps_its_methods():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))
    s = sas_compile.swsify(seq, M=4, example_inputs=(torch.randn(2, 6),))
    assert isinstance(s, nn.Sequential) and len(s) == 5
    assert s[0].out_features == 20 and s[2].in_features == 20 and s[-1].out_features == 3
    assert s[2].parametrizations.weight[0].M == 4  # the 1:M mask on the swapped layer
    assert [type(m) for m in s[1::2]] == [nn.ReLU, nn.ReLU]
    net = SmallResNet()
    s = sas_compile.swsify(net, M=4, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert isinstance(s, SmallResNet) and isinstance(s.layers, nn.ModuleList) and len(s.layers) == 2
    assert s.layers[-1].conv2.out_channels == 16 and s.stem[0].out_channels == 16
    s.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert s.features(x).shape == (2, 16)  # its own method, on the widened modules
        assert torch.equal(s.head(s.features(x)), s(x))
    net.layers[0].conv1.weight.data.zero_()  # the user's model and its SWS model share nothing
    assert s.layers[0].conv1.parametrizations.weight.original.abs().sum() > 0


def test_mode_flags_follow_train_and_eval():
    torch.manual_seed(0)
    s = sas_compile.swsify(SmallResNet().eval(), M=2, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert isinstance(s, SmallResNet) and not s.training
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(s(x), s(x))  # eval: no dropout
        s.train()
        torch.manual_seed(3)
        a = s(x)
        torch.manual_seed(4)
        assert not torch.equal(a, s(x))  # training: dropout draws


def test_submodule_modes_are_the_users():
    """A frozen BatchNorm (eval inside a training model) stays in eval in the SWS model, widened too."""
    torch.manual_seed(0)
    net = SmallResNet().train()
    net.stem[1].eval()
    s = sas_compile.swsify(net, M=4, example_inputs=(torch.randn(2, 3, 8, 8),))
    assert s.training and not s.stem[1].training and s.stem[1].num_features == 16
    assert all(m.training for n, m in s.named_modules() if n != "stem.1" and not n.startswith("stem.1."))


def test_tied_weights_stay_one_tensor():
    torch.manual_seed(0)
    s = sas_compile.swsify(SharedAndTied(), M=4, example_inputs=(torch.randn(2, 2, 5),))
    assert isinstance(s, SharedAndTied)
    assert s.a.parametrizations.weight.original is s.b.parametrizations.weight.original
    assert s.a.weight.shape == (12, 12)


def test_parameters_and_buffers_read_by_the_forward_are_swapped():
    torch.manual_seed(0)
    s = sas_compile.swsify(Scaled(), M=4, example_inputs=(torch.randn(2, 5),))
    assert isinstance(s, Scaled)
    assert isinstance(s.scale, nn.Parameter) and s.scale.shape == (12,) and "scale" in dict(s.named_parameters())
    assert isinstance(s.inner.gain, nn.Parameter) and s.inner.gain.shape == (12,)
    assert s.inner.shift.shape == (12,) and "inner.shift" in s.state_dict()
    assert s.inner.scratch.shape == (12,) and "inner.scratch" not in s.state_dict()  # still not persistent


class Aliased(nn.Module):
    """One layer registered under two names, the forward calling it by the second."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.head = self.b

    def forward(self, x):
        return self.head(torch.relu(self.a(x)))


def test_a_module_registered_twice_is_swapped_under_both_names():
    torch.manual_seed(0)
    s = sas_compile.swsify(Aliased(), M=4)  # without example_inputs: no run to catch it
    assert isinstance(s, Aliased) and s.head is s.b and s.b.in_features == 16
    assert s(torch.randn(3, 4)).shape == (3, 2)


def test_hooks_on_a_widened_layer_keep_running():
    """A swapped module takes the hooks of the one it replaces (as sasify's swaps do)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    seen = []
    model[2].register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    s = sas_compile.swsify(model, M=4, example_inputs=(torch.randn(3, 4),))
    assert isinstance(s, nn.Sequential) and s[2].out_features == 16
    seen.clear()
    s(torch.randn(5, 4))
    assert seen == [(5, 16)]  # the widened layer's output
    model(torch.randn(5, 4))
    assert seen == [(5, 16), (5, 8)]  # the user's model keeps its own hook


def test_checkpoints_stay_in_the_forward(caplog):
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    with caplog.at_level(logging.WARNING, logger="sas_compile"):
        s = sas_compile.swsify(Checkpointed(), M=4, example_inputs=(x,))
    assert isinstance(s, Checkpointed)
    assert not [r for r in caplog.records if "checkpoint" in r.getMessage()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        s(x).sum().backward()
    with_checkpoint = len(saved)
    saved.clear()
    s.forward = lambda t: s.c(torch.relu(s.b(torch.relu(s.a(t)))))  # the same network without it
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        s(x).sum().backward()
    assert with_checkpoint < len(saved)  # the checkpointed part keeps none of its activations


class FixedReshape(nn.Module):
    """A reshape naming a width: the rewrite changes its argument, which no module swap can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).reshape(x.shape[0], 8 * 4 * 4))


def test_a_graph_change_gives_a_graph_module_and_says_why(caplog):
    x = torch.randn(2, 3, 6, 6)
    with caplog.at_level(logging.WARNING, logger="sas_compile"):
        s = sas_compile.swsify(FixedReshape(), M=4, example_inputs=(x,))
    assert isinstance(s, fx.GraphModule) and not getattr(s, "sws_module_swaps", False)
    messages = [r.getMessage() for r in caplog.records if "GraphModule" in r.getMessage()]
    assert len(messages) == 1 and "FixedReshape" in messages[0] and "reshape" in messages[0], messages
    assert s(x).shape == (2, 5) and s.fc.in_features == 16 * 4 * 4


@pytest.mark.parametrize("factory, x", [
    (FixedReshape, torch.randn(2, 3, 6, 6)),  # the graph changes: no swap is tried
    (lambda: TracedOtherwise(), torch.randn(3, 4)),  # swapped, then refused by the output check
], ids=["graph-change", "refused-swap"])
def test_a_graph_module_result_runs_the_hooks_of_its_widened_layers(factory, x):
    """Hooks on a widened layer run whichever the result is: before, a GraphModule result ran them
    on the layers it kept and dropped them, silently, on the ones it widened."""
    torch.manual_seed(0)
    model = factory()
    widened = "fc" if isinstance(model, FixedReshape) else "a"
    seen = []
    getattr(model, widened).register_forward_hook(lambda mod, args, out: seen.append(out.shape[-1]))
    s = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert isinstance(s, fx.GraphModule) and not getattr(s, "sws_module_swaps", False)
    seen.clear()
    s(x)
    assert getattr(s, widened) is not getattr(model, widened)  # a module the rewrite rebuilt
    assert seen == [getattr(s, widened).out_features]
    model(x)
    assert seen[1:] == [getattr(model, widened).out_features]  # the user's model keeps its own hook


class TracedOtherwise(nn.Module):
    """A forward whose eager run differs from its trace: the check refuses the swap."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x)) * (1.0 if torch.fx._symbolic_trace.is_fx_tracing() else 2.0)


def test_a_forward_the_graph_does_not_hold_gives_the_graph(caplog):
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger="sas_compile"):
        s = sas_compile.swsify(TracedOtherwise(), M=4, example_inputs=(x,))
    assert isinstance(s, fx.GraphModule)
    assert any("does not give the widened graph's outputs" in r.getMessage() for r in caplog.records)


def test_without_example_inputs_copies_and_checkpoints():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    s = sas_compile.swsify(seq, M=4)  # traced without inputs: the structural check alone
    assert isinstance(s, nn.Sequential) and s[2].in_features == 32
    x = torch.randn(5, 8)
    s.eval()
    with torch.no_grad():
        ref = s(x)
        copied = copy.deepcopy(s)
        assert copied.sws_module_swaps and torch.equal(copied(x), ref)
    fresh = sas_compile.swsify(seq, M=4)
    fresh.load_state_dict(s.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)
    assert measure_sws_model(s, (x,))["_2"]["positions"] == 5


def test_report_agrees_with_a_kept_class_model():
    x = torch.randn(2, 3, 8, 8)
    assert_report_agrees(SmallResNet(), x, 4, True)


class ExportOnly(nn.Module):
    """A shape test in forward: symbolic tracing fails, torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h * 2 if x.shape[0] > 1 else h)


def test_an_export_capture_says_so_at_info_level(caplog):
    """An export graph leaves the user no choice: the GraphModule result is logged at INFO, not warned."""
    with caplog.at_level(logging.INFO, logger="sas_compile"):
        s = sas_compile.swsify(ExportOnly(), M=4, example_inputs=(torch.randn(3, 4),))
    assert isinstance(s, fx.GraphModule) and s.sparsify_plan.capture == "export"
    about = [r for r in caplog.records if "the result is a torch.fx.GraphModule" in r.getMessage()]
    assert len(about) == 1 and about[0].levelno == logging.INFO and "torch.export" in about[0].getMessage()
