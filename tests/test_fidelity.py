"""A converted model is never silently different from what the user built.

sasify, swsify and swatify keep: tied weights tied (one Parameter for every user), frozen
parameters frozen (with their names, dtypes and devices), the user's class where the rewrite
is a module swap, and frozen SWS masks in the state_dict; a model that is already SAS is
refused or reported, never passed over in silence.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.nn.utils import parametrize

import sas_compile
from sas_compile.layers import SASConv2d, SASLinear
from sas_compile.runtime.projection import expand_dense_weight
from sas_compile.swat import BitmaskReLU, SWATLinear
from sas_compile.sws import OneOfMMask, one_of_m_mask


def parameter_holders(model: nn.Module):
    """id(Parameter) -> every name it is held under; a parametrized weight under its module's name."""
    holders = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{path}.{pname}" if path else pname
            if ".parametrizations." in full and full.endswith(".original"):
                full = full.replace(".parametrizations.", ".")[: -len(".original")]
            holders.setdefault(id(p), [])
            if full not in holders[id(p)]:
                holders[id(p)].append(full)
    return holders


def _mlp(*, tie: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                      nn.Linear(8, 3))
    if tie:
        m[4].weight = m[2].weight
    return m


class TiedLM(nn.Module):
    """A language-model shape: the head's weight is the embedding's."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


def _sgd_step(model: nn.Module, x: torch.Tensor) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.zero_grad()
    out = model(x)
    (out.logits if hasattr(out, "logits") else out).square().mean().backward()
    opt.step()


# ------------------------------------------------------------------ 1. tied weights


def test_sasify_tied_linears_share_one_wide_weight_through_training():
    m = _mlp(tie=True)
    x = torch.randn(5, 4)
    s = sas_compile.sasify(m, M=4)
    assert isinstance(s[2], SASLinear) and s[2].weight is s[4].weight
    assert s[2].weight.shape == (8, 32)
    layers = {layer.name: layer for layer in s.sas_plan.layers}
    assert layers["2"].eligible and layers["4"].eligible
    assert layers["2"].shared_with == ("4",) and layers["4"].shared_with == ("2",)
    torch.testing.assert_close(s(x), m(x))
    _sgd_step(s, x)
    assert s[2].weight is s[4].weight and torch.equal(s[2].weight, s[4].weight)
    assert s[2].weight.grad is not None


def test_sasify_tied_biases_stay_one_parameter():
    m = _mlp()
    m[4].bias = m[2].bias
    s = sas_compile.sasify(m, M=2)
    assert isinstance(s[4], SASLinear) and s[2].bias is s[4].bias


def test_sasify_tied_embedding_and_head_stay_tied_and_dense():
    torch.manual_seed(0)
    lm = TiedLM()
    ids = torch.randint(0, 11, (3, 5))
    s = sas_compile.sasify(lm, M=2)
    head = {layer.name: layer for layer in s.sas_plan.layers}["head"]
    assert not head.eligible and "emb" in head.reason and "tie" in head.reason
    assert any("emb" in name for name in head.shared_with)
    assert s.head.weight is s.emb.weight and s.head.weight.shape == (11, 6)
    assert isinstance(s.mid, SASLinear)  # the rest still converts
    torch.testing.assert_close(s(ids), lm(ids))
    _sgd_step(s, ids)
    assert s.head.weight is s.emb.weight


class _ExportOnlyTied(nn.Module):
    """symbolic_trace fails on the shape test; torch.export captures it. mid2 reuses mid's weight."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.mid = nn.Linear(8, 8)
        self.mid2 = nn.Linear(8, 8)
        self.mid2.weight = self.mid.weight
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[0] > 0:
            x = torch.relu(self.stem(x))
        return self.out(self.mid2(torch.tanh(self.mid(x))))


def test_sasify_export_capture_keeps_ties():
    torch.manual_seed(0)
    m = _ExportOnlyTied()
    x = torch.randn(3, 4)
    s = sas_compile.sasify(m, M=2, example_inputs=(x,))
    assert s.sas_plan.capture == "export" and type(s) is _ExportOnlyTied
    assert isinstance(s.mid, SASLinear) and isinstance(s.mid2, SASLinear)
    assert s.mid.weight is s.mid2.weight
    torch.testing.assert_close(s(x), m(x))


def test_sasify_module_registered_under_two_names_is_one_sas_module():
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), shared, nn.Tanh(), shared)
    x = torch.randn(5, 4)
    s = sas_compile.sasify(m, M=2)
    assert type(s) is nn.Sequential and isinstance(s[2], SASLinear) and s[2] is s[4]
    torch.testing.assert_close(s(x), m(x))


def test_swsify_tied_linears_stay_one_parameter():
    m = _mlp(tie=True)
    x = torch.randn(5, 4)
    w = sas_compile.swsify(m, M=4, example_inputs=x)
    a = w.get_submodule("2").parametrizations.weight.original
    b = w.get_submodule("4").parametrizations.weight.original
    assert a is b and a.shape == (16, 16)
    layers = {layer.name: layer for layer in w.sparsify_plan.layers}
    assert layers["2"].shared_with == ("4.weight",) and layers["4"].shared_with == ("2.weight",)
    w.train()
    _sgd_step(w, x)
    assert w.get_submodule("2").parametrizations.weight.original is w.get_submodule("4").parametrizations.weight.original


def test_swsify_tied_embedding_and_head_stay_tied():
    torch.manual_seed(0)
    lm = TiedLM()
    ids = torch.randint(0, 11, (3, 5))
    w = sas_compile.swsify(lm, M=4, example_inputs=ids)
    head_weight = w.head.parametrizations.weight.original if parametrize.is_parametrized(w.head) else w.head.weight
    assert head_weight is w.emb.weight and w.emb.weight.shape == (11, 12)
    assert {layer.name: layer for layer in w.sparsify_plan.layers}["head"].shared_with == ("emb.weight",)
    _sgd_step(w.train(), ids)
    assert (w.head.parametrizations.weight.original if parametrize.is_parametrized(w.head)
            else w.head.weight) is w.emb.weight


def test_swatify_keeps_ties_and_swaps_a_module_under_every_name():
    m = _mlp(tie=True)
    x = torch.randn(5, 4)
    t = sas_compile.swatify(m, sparsity=0.5)
    assert isinstance(t[2], SWATLinear) and t[2].weight is t[4].weight
    assert {layer.name: layer for layer in t.sparsify_plan.layers}["4"].shared_with == ("2.weight",)
    _sgd_step(t.train(), x)
    assert t[2].weight is t[4].weight
    shared, relu = nn.Linear(8, 8), nn.ReLU()
    aliased = nn.Sequential(nn.Linear(4, 8), relu, shared, relu, shared)
    t = sas_compile.swatify(aliased, sparsity=0.5)
    assert isinstance(t[2], SWATLinear) and t[2] is t[4]
    assert isinstance(t[1], BitmaskReLU) and t[1] is t[3]


def test_swatify_erk_counts_a_tied_weight_once():
    m = _mlp(tie=True)
    t = sas_compile.swatify(m, sparsity=0.5, distribution="erk")
    kept = {id(layer.weight): layer.weight_density * layer.weight.numel()
            for layer in (t[0], t[2], t[4], t[6])}
    total = sum(p.numel() for p in {id(layer.weight): layer.weight for layer in (t[0], t[2], t[4], t[6])}.values())
    assert t[2].weight_density == t[4].weight_density
    assert abs(sum(kept.values()) - 0.5 * total) < 1e-6 * total


# ------------------------------------------------------------------ 2. frozen layers


def test_sasify_keeps_requires_grad_names_and_dtypes():
    m = _mlp().double()
    m[2].requires_grad_(False)
    m[6].bias.requires_grad_(False)
    s = sas_compile.sasify(m, M=2)
    before, after = dict(m.named_parameters()), dict(s.named_parameters())
    assert list(after) == list(before)
    for name, p in before.items():
        assert after[name].requires_grad == p.requires_grad, name
        assert after[name].dtype == torch.float64 and after[name].device == p.device
    x = torch.randn(3, 4, dtype=torch.float64)
    frozen = s[2].weight.detach().clone()
    _sgd_step(s, x)
    assert s[2].weight.grad is None and torch.equal(s[2].weight, frozen)


class _Functional(nn.Module):
    """F.linear on its own Parameter, and on a buffer (a weight that never trains)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(4, 6)
        self.w = nn.Parameter(torch.randn(5, 6) * 0.3)
        self.register_buffer("fixed", torch.randn(3, 5) * 0.3)

    def forward(self, x):
        return F.linear(torch.tanh(F.linear(torch.tanh(self.stem(x)), self.w)), self.fixed)


def test_sasify_functional_weights_keep_requires_grad_and_buffers_stay_buffers():
    torch.manual_seed(0)
    m = _Functional()
    m.w.requires_grad_(False)
    x = torch.randn(3, 4)
    s = sas_compile.sasify(m, M=2)
    assert isinstance(s, fx.GraphModule)  # functional calls: the graph itself changed
    assert s.w.shape == (5, 12) and not s.w.requires_grad
    assert "fixed" in dict(s.named_buffers()) and s.fixed.shape == (3, 10)
    assert "fixed" not in dict(s.named_parameters())
    torch.testing.assert_close(s(x), m(x))


def test_swsify_keeps_requires_grad_dtype_and_device():
    m = _mlp().double()
    m[2].requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64)
    w = sas_compile.swsify(m, M=4, example_inputs=x)
    holders = {name: p for p in w.parameters() for name in parameter_holders(w)[id(p)]}
    for name, p in m.named_parameters():
        assert holders[name].requires_grad == p.requires_grad, name
        assert holders[name].dtype == torch.float64 and holders[name].device == p.device, name
    assert holders["2.weight"].shape == (16, 16)  # widened, freshly initialised, still frozen


def test_swatify_keeps_requires_grad():
    m = _mlp()
    m[2].requires_grad_(False)
    t = sas_compile.swatify(m, sparsity=0.5)
    assert [(n, p.requires_grad) for n, p in t.named_parameters()] == \
        [(n, p.requires_grad) for n, p in m.named_parameters()]
    _sgd_step(t.train(), torch.randn(5, 4))
    assert t[2].weight.grad is None


# ------------------------------------------------------------------ 3. frozen SWS masks


def test_swsify_frozen_mask_survives_a_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    m = _mlp()
    x = torch.randn(16, 4)
    w = sas_compile.swsify(m, M=4, example_inputs=x, freeze_mask=True).train()
    assert "2.parametrizations.weight.0.frozen" in w.state_dict()
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    for _ in range(5):  # training moves the weights away from the ones the mask was taken from
        opt.zero_grad()
        w(x).square().mean().backward()
        opt.step()
    torch.save(w.state_dict(), tmp_path / "sws.pt")
    fresh = sas_compile.swsify(m, M=4, example_inputs=x, freeze_mask=True)
    fresh.load_state_dict(torch.load(tmp_path / "sws.pt"))
    w.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), w(x))
    for name in ("2", "4", "6"):
        assert torch.equal(fresh.get_submodule(name).weight, w.get_submodule(name).weight)


def test_user_registered_frozen_mask_loads_before_its_first_forward():
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    parametrize.register_parametrization(layer, "weight", OneOfMMask(4, freeze_mask=True), unsafe=True)
    first = layer.weight != 0
    with torch.no_grad():  # training moves the weights; the frozen mask stays
        layer.parametrizations.weight.original.copy_(torch.randn(4, 8))
    assert not torch.equal(one_of_m_mask(layer.parametrizations.weight.original, 4), first)
    state = layer.state_dict()
    other = nn.Linear(8, 4)
    parametrize.register_parametrization(other, "weight", OneOfMMask(4, freeze_mask=True), unsafe=True)
    other.load_state_dict(state)  # its mask was never taken: the checkpoint's is
    assert torch.equal(other.weight != 0, first)


# ------------------------------------------------------------------ 4. already SAS


def test_swsify_and_swatify_refuse_a_sasified_model():
    sas = sas_compile.sasify(_mlp(), M=2)
    with pytest.raises(ValueError, match=r"already has SAS layers: 2 \(M=2\), 4 \(M=2\), 6 \(M=2\)"):
        sas_compile.swsify(sas, M=4)
    with pytest.raises(ValueError, match=r"already has SAS layers: 2 \(M=2\)"):
        sas_compile.swatify(sas)
    functional = sas_compile.sasify(_Functional(), M=2)  # a GraphModule calling sas:: ops
    with pytest.raises(ValueError, match="already has SAS layers: .*sas::linear"):
        sas_compile.swsify(functional, M=4, example_inputs=torch.randn(2, 4))


def test_sasify_of_a_sas_model_keeps_its_M_and_says_so(caplog):
    m = _mlp()
    x = torch.randn(5, 4)
    sas2 = sas_compile.sasify(m, M=2)
    with caplog.at_level(logging.WARNING, logger="sas_compile"):
        again = sas_compile.sasify(sas2, M=4)
    existing = [layer for layer in again.sas_plan.layers if layer.sas_M]
    assert [(layer.name, layer.sas_M) for layer in existing] == [("2", 2), ("4", 2), ("6", 2)]
    assert all("stays at its M" in layer.reason for layer in existing)
    assert all(again[i].M == 2 for i in (2, 4, 6))
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("sasify(M=4)" in w and "2 (M=2)" in w and "6 (M=2)" in w for w in warning), warning
    torch.testing.assert_close(again(x), m(x))
    # sas:: calls on wide weights (a GraphModule) are listed the same way
    functional = sas_compile.sasify(_Functional(), M=2)
    plan = sas_compile.sasify(functional, M=4).sas_plan
    assert [(layer.name, layer.sas_M, layer.in_channels) for layer in plan.layers if layer.sas_M] == \
        [("w", 2, 6), ("fixed", 2, 5)]


# ------------------------------------------------------------------ 5. the user's class


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1))
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))

    def embed(self, x):
        return self.body(x)


def test_sasify_sequential_keeps_its_class_with_relus_folded_as_identity():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                      nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 5)).eval()
    x = torch.randn(2, 3, 6, 6)
    s = sas_compile.sasify(m, M=4)
    assert type(s) is nn.Sequential and len(s) == len(m)
    assert isinstance(s[2], SASConv2d) and isinstance(s[5], SASConv2d) and isinstance(s[7], SASLinear)
    assert isinstance(s[1], nn.Identity) and isinstance(s[4], nn.Identity)  # the folds
    layers = {layer.name: layer for layer in s.sas_plan.layers}
    assert layers["2"].fold_relu and layers["2"].relu_module == "1"
    # a folded layer reads the pre-ReLU tensor: its wide weight is the folded expansion
    assert torch.equal(s[2].weight, expand_dense_weight(m[2].weight.detach(), 4, fold_relu=True))
    assert not torch.equal(s[7].weight, expand_dense_weight(m[7].weight.detach(), 4, fold_relu=True))
    assert not s.training and all(not mod.training for mod in s.modules())
    with torch.no_grad():
        torch.testing.assert_close(s(x), m(x))
    assert "Identity" in s.sas_plan.graph_after


def test_sasify_custom_class_keeps_its_methods():
    torch.manual_seed(0)
    m = ConvNet()
    x = torch.randn(2, 3, 5, 5)
    s = sas_compile.sasify(m, M=2)
    assert type(s) is ConvNet and isinstance(s.body[2], SASConv2d) and isinstance(s.body[1], nn.Identity)
    torch.testing.assert_close(s.embed(x), m.embed(x))
    torch.testing.assert_close(s(x), m(x))


def test_sasify_gives_a_graph_module_where_the_graph_changes():
    torch.manual_seed(0)
    relu = nn.ReLU()
    shared_relu = nn.Sequential(nn.Linear(4, 8), relu, nn.Linear(8, 8), relu, nn.Linear(8, 3))
    x = torch.randn(5, 4)
    s = sas_compile.sasify(shared_relu, M=2)
    # one ReLU module called at two sites: swapping it for Identity would drop both
    assert isinstance(s, fx.GraphModule)
    assert all(layer.fold_relu and layer.relu_module is None for layer in s.sas_plan.eligible())
    torch.testing.assert_close(s(x), shared_relu(x))

    class ReadTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8)

        def forward(self, x):
            h = self.relu(self.a(x))
            return self.b(h) + h  # the ReLU's output is read by the add too

    m = ReadTwice()
    s = sas_compile.sasify(m, M=2)
    assert isinstance(s, fx.GraphModule) and s.sas_plan.layers[1].fold_relu
    torch.testing.assert_close(s(x), m(x))


# ------------------------------------------------------------------ properties over random models


class RandomNet(nn.Module):
    """Layers and ReLU modules called in the order of ``steps``: a layer or ReLU may be called twice."""

    def __init__(self, layers, relus, steps):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.relus = nn.ModuleList(relus)
        self.steps = steps

    def forward(self, x):
        for kind, i in self.steps:
            if kind == "layer":
                x = self.layers[i](x)
            elif kind == "relu":
                x = self.relus[i](x)
            elif kind == "frelu":
                x = torch.relu(x)
            else:
                x = torch.tanh(x)
        return x


@st.composite
def random_models(draw):
    """A small model of Linear or Conv2d layers with tied weights, frozen parts and repeated calls."""
    conv = draw(st.booleans())
    width, d_in, d_out = draw(st.sampled_from([4, 6])), draw(st.integers(2, 5)), draw(st.integers(2, 4))
    n_hidden = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2 ** 16))
    torch.manual_seed(seed)

    def layer(i, o):
        return nn.Conv2d(i, o, 3, padding=1) if conv else nn.Linear(i, o)

    layers = [layer(d_in, width)] + [layer(width, width) for _ in range(n_hidden)] + [layer(width, d_out)]
    for i in range(2, n_hidden + 1):  # tie a hidden weight (and maybe its bias) to an earlier one
        j = draw(st.integers(0, i))
        if 1 <= j < i:
            layers[i].weight = layers[j].weight
            if draw(st.booleans()):
                layers[i].bias = layers[j].bias
    for lay in layers[:-1]:  # the last layer trains: something for the optimizer step
        if draw(st.integers(0, 3)) == 0:
            lay.requires_grad_(False)
        elif draw(st.integers(0, 4)) == 0:
            lay.bias.requires_grad_(False)
    relus = [nn.ReLU(inplace=draw(st.booleans())) for _ in range(draw(st.integers(1, 3)))]
    hidden = [("layer", i) for i in range(1, n_hidden + 1)]
    hidden += [("layer", draw(st.integers(1, n_hidden))) for _ in range(draw(st.integers(0, 2)))]  # called twice
    steps = [("layer", 0)]
    for step in draw(st.permutations(hidden)):
        act = draw(st.sampled_from(["relu", "relu", "frelu", "tanh", "none"]))
        if act == "relu":
            steps.append(("relu", draw(st.integers(0, len(relus) - 1))))
        elif act != "none":
            steps.append((act, 0))
        steps.append(step)
    steps += [("relu", 0), ("layer", n_hidden + 1)]
    if draw(st.booleans()) and all(kind in ("layer", "relu") for kind, _ in steps):
        model = nn.Sequential(*[(layers if kind == "layer" else relus)[i] for kind, i in steps])
    else:
        model = RandomNet(layers, relus, steps)
    x = torch.randn(2, d_in, 3, 3) if conv else torch.randn(3, d_in)
    return model.double(), x.double(), seed


def _tie_groups(model: nn.Module):
    return [names for names in parameter_holders(model).values() if len(names) > 1]


def _check_converted_model_keeps_the_parameters(model: nn.Module, new: nn.Module) -> None:
    """Flags, dtypes and ties of ``model``'s parameters, looked up by name in ``new``."""
    holders = parameter_holders(new)
    by_name = {name: p for p in new.parameters() for name in holders[id(p)]}
    found = 0
    for name, p in model.named_parameters():
        if name not in by_name:
            continue
        found += 1
        assert by_name[name].requires_grad == p.requires_grad, name
        assert by_name[name].dtype == p.dtype and by_name[name].device == p.device, name
    assert found == len(dict(model.named_parameters())) or isinstance(new, fx.GraphModule)
    for names in _tie_groups(model):
        present = [by_name[n] for n in names if n in by_name]
        assert all(p is present[0] for p in present), names


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models(), st.sampled_from([2, 4]), st.booleans())
def test_property_sasify_preserves_function_flags_ties_and_state(case, M, dense_input_layers):
    model, x, _ = case
    sas = sas_compile.sasify(model, M=M, dense_input_layers=dense_input_layers)
    assert isinstance(sas, fx.GraphModule) or type(sas) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x), rtol=1e-10, atol=1e-10)
    _check_converted_model_keeps_the_parameters(model, sas)
    frozen = {n: p.detach().clone() for n, p in sas.named_parameters() if not p.requires_grad}
    _sgd_step(sas, x)
    _check_converted_model_keeps_the_parameters(model, sas)
    for n, p in sas.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    fresh = sas_compile.sasify(model, M=M, dense_input_layers=dense_input_layers)
    fresh.load_state_dict(sas.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), sas(x))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_models(), st.sampled_from([2, 4]))
def test_property_swsify_frozen_masks_and_ties_survive_a_round_trip(case, M):
    model, x, _ = case
    sws = sas_compile.swsify(model, M=M, example_inputs=x, freeze_mask=True).train()
    _check_converted_model_keeps_the_parameters(model, sws)
    opt = torch.optim.SGD([p for p in sws.parameters() if p.requires_grad], lr=0.2)
    for _ in range(3):
        opt.zero_grad()
        sws(x).square().mean().backward()
        opt.step()
    _check_converted_model_keeps_the_parameters(model, sws)
    state = copy.deepcopy(sws.state_dict())
    fresh = sas_compile.swsify(model, M=M, example_inputs=x, freeze_mask=True)
    fresh.load_state_dict(state)
    sws.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), sws(x))
