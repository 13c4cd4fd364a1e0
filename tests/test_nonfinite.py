"""Non-finite inputs: a SAS model equals the dense one on +-inf and NaN too.

The projection never forms ``0 * inf`` (an infinite value stays in its slot, every other slot
is exactly 0), and slots whose weight column is all zero (a folded ReLU's negative slots
right after conversion) read 0 when an input is infinite, as the dense ``W relu(-inf) = 0``.
Checked on every target: the PyTorch formulation, the kernels through the emulator, the
ops taking a dense weight (``backend="sas"``) and the aten form the GPU lowering writes.
"""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sas_compile
from sas_compile.runtime import emulator, sas_matmul
from sas_compile.runtime.projection import expand_dense_weight, project

INF, NAN = float("inf"), float("nan")


def same_function(out: torch.Tensor, ref: torch.Tensor, rtol=1e-5) -> bool:
    """NaN exactly where the reference is NaN, the same infinities, close finite values."""
    if not torch.equal(torch.isnan(out), torch.isnan(ref)):
        return False
    if not torch.equal(torch.isinf(out) & (out > 0), torch.isinf(ref) & (ref > 0)):
        return False
    if not torch.equal(torch.isinf(out) & (out < 0), torch.isinf(ref) & (ref < 0)):
        return False
    finite = torch.isfinite(ref)
    if not finite.any():
        return True
    return torch.allclose(out[finite], ref[finite], rtol=rtol, atol=rtol * (1 + ref[finite].abs().max().item()))


def poisoned(shape, generator):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    flat = x.view(-1)
    picks = torch.randperm(flat.numel(), generator=generator)[:3]
    flat[picks[0]], flat[picks[1]], flat[picks[2]] = INF, -INF, NAN
    return x


@pytest.mark.parametrize("M", [2, 4, 8])
def test_projection_never_forms_nan_from_inf(M):
    x = torch.tensor([[INF, -INF, 1.0, -2.0, 0.0, 3.0]], dtype=torch.float64)
    for grad in (False, True):
        wide = project(x.clone().requires_grad_(grad), M)
        assert not torch.isnan(wide).any()
        assert torch.isinf(wide).sum() == 2  # each infinity in exactly one slot


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("M", [2, 4, 8])
def test_sasified_models_match_dense_on_nonfinite_inputs(M, fold):
    torch.manual_seed(M)
    linear = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3)).double().eval()
    conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 2, 1)).double().eval()
    g = torch.Generator().manual_seed(1)
    for model, x in ((linear, poisoned((7, 6), g)), (conv, poisoned((2, 3, 5, 5), g))):
        sas = sas_compile.sasify(model, M=M, dense_input_layers=False, fold_relu=fold)
        with torch.no_grad():
            ref, out = model(x), sas(x)
        assert same_function(out, ref), (out, ref)


def test_hidden_overflow_in_half_precision_matches_dense():
    """fp16 overflow makes a hidden -inf that the dense ReLU zeroes: the SAS model gives the same 0."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(-3e4)
    sas = sas_compile.sasify(model, M=2, dense_input_layers=False)
    x = torch.full((2, 4), 10.0)
    with torch.no_grad():
        ref, out = model.half()(x.half()), sas.half()(x.half())
    assert torch.isfinite(ref).all() and same_function(out.float(), ref.float(), rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("M", [2, 4])
def test_emulated_kernels_on_infinite_inputs(M, dtype, caplog, monkeypatch):
    if not emulator.available()[0]:
        pytest.skip(emulator.available()[1])
    from sas_compile.runtime import execution_targets

    monkeypatch.setattr(execution_targets, "tf32_allowed", lambda: True)
    g = torch.Generator().manual_seed(M)
    x = torch.randn(20, 12, generator=g)
    x[0, 0], x[3, 5], x[7, 11] = INF, -INF, INF
    weight = torch.randn(9, 12 * M, generator=g)
    ref = torch.nn.functional.linear(project(x.double(), M), weight.double())
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x.to(dtype), weight.to(dtype), M=M, target="emulator")
    assert "falls back" not in caplog.text  # no zero column: the kernel itself ran
    assert same_function(out.double(), ref, rtol=2e-2)
    # a folded conversion's zero columns meet an infinity: the call falls back, with the reason
    dense_w = torch.randn(9, 12, generator=g)
    folded = expand_dense_weight(dense_w, M, fold_relu=True)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x.to(dtype), folded.to(dtype), M=M, target="emulator")
    assert "0 * inf" in caplog.text
    dense = torch.nn.functional.linear(x.double().relu(), dense_w.to(dtype).double())
    assert same_function(out.double(), dense, rtol=2e-2)


@pytest.mark.parametrize("M", [2, 4])
def test_ops_from_a_dense_weight_and_the_gpu_lowering_on_infinite_inputs(M):
    from sas_compile.runtime import sas_ops

    g = torch.Generator().manual_seed(3)
    x = poisoned((5, 6), g)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    for fold in (True, False):
        ref = torch.nn.functional.linear(x.relu() if fold else x, w)
        out = torch.ops.sas.linear_from_dense(x, w, None, M, fold, "sign_pattern", False)
        assert same_function(out, ref)
        wide = expand_dense_weight(w, M, fold_relu=fold)
        assert same_function(sas_ops.projected_linear(x, wide, None, M, "sign_pattern"), ref)
    xc = poisoned((2, 3, 4, 4), g)
    wc = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
    ref = torch.nn.functional.conv2d(xc.relu(), wc, None, 1, 1)
    out = torch.ops.sas.conv2d_from_dense(xc, wc, None, [1, 1], [1, 1], [1, 1], 1, M, True, "sign_pattern", False)
    assert same_function(out, ref)
    wide = expand_dense_weight(wc, M, fold_relu=True)
    assert same_function(sas_ops.projected_conv2d(xc, wide, None, [1, 1], [1, 1], [1, 1], 1, M, "sign_pattern"), ref)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), M=st.sampled_from([2, 4, 8]),
       fold=st.booleans(), seed=st.integers(0, 2**31 - 1), n_bad=st.integers(1, 4))
def test_property_random_stacks_with_nonfinite_inputs(widths, M, fold, seed, n_bad):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).double().eval()
    sas = sas_compile.sasify(model, M=M, dense_input_layers=False, fold_relu=fold)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, widths[0], generator=g, dtype=torch.float64)
    flat = x.view(-1)
    for i in torch.randint(0, flat.numel(), (n_bad,), generator=g).tolist():
        flat[i] = (INF, -INF, NAN)[i % 3]
    with torch.no_grad():
        assert same_function(sas(x), model(x))


@settings(max_examples=20, deadline=None)
@given(widths=st.lists(st.integers(2, 6), min_size=3, max_size=4), tie=st.booleans(), twice=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_property_report_counts_every_parameter_once(widths, tie, twice, seed):
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(widths[0], widths[1])
            self.mid = nn.Linear(widths[1], widths[1])
            self.again = nn.Linear(widths[1], widths[1])
            self.norm = nn.LayerNorm(widths[1])
            self.head = nn.Linear(widths[1], widths[2])
            if tie:
                self.again.weight = self.mid.weight

        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.first(x))))
            if twice:
                h = torch.relu(self.mid(h))
            return self.head(self.norm(self.again(h)))

    model = Net()
    rep = sas_compile.report(model, (torch.randn(3, widths[0]),), M=(2,))
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("M", [2, 4])
def test_grouped_and_depthwise_convs_on_infinite_inputs(M):
    """A grouped conv's dead slots are judged per group (a column is read by its group's rows only)."""
    from sas_compile.runtime import sas_ops

    torch.manual_seed(M)
    dense = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(6, 4, 1)).double()
    gen = torch.Generator().manual_seed(M)
    x = poisoned((2, 4, 5, 5), gen)
    with torch.no_grad():
        ref = dense(x)
        assert same_function(sas_compile.sasify(dense, M=M)(x), ref)
        torch._dynamo.reset()
        compiled = torch.compile(dense, backend="sas", options={"M": M, "inner": "eager"})
        assert same_function(compiled(x), ref)
        # the aten form the GPU lowering writes, on one grouped layer after a ReLU
        conv = dense[4]  # Conv2d(8, 6, groups=2), after a ReLU it folds
        pre = poisoned((2, 8, 5, 5), gen)
        wide = expand_dense_weight(conv.weight, M, fold_relu=True, groups=2)
        out = sas_ops.projected_conv2d(pre, wide, conv.bias, [1, 1], [1, 1], [1, 1], 2, M, "sign_pattern")
        assert same_function(out, conv(torch.relu(pre)))


@settings(max_examples=20, deadline=None)
@given(width=st.integers(2, 6), M=st.sampled_from([2, 4]), tie=st.booleans(), freeze=st.booleans(),
       twice=st.booleans(), n_bad=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_property_ties_frozen_parts_calls_twice_and_nonfinite_inputs(width, M, tie, freeze, twice, n_bad, seed):
    """The issue's property, all at once: the converted model equals the dense one (NaN where it
    is NaN, the same infinities), report's parameter total is the model's, frozen parameters stay
    frozen, and a state_dict round trip into a freshly converted model gives the same outputs."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(3, width)
            self.mid = nn.Linear(width, width)
            self.again = nn.Linear(width, width)
            self.head = nn.Linear(width, 2)
            if tie:
                self.again.weight = self.mid.weight
            if freeze:
                self.first.requires_grad_(False)

        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.first(x))))
            if twice:
                h = torch.relu(self.mid(h))
            return self.head(torch.relu(self.again(h)))

    torch.manual_seed(seed)
    model = Net().double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    flat = x.view(-1)
    for i in torch.randint(0, flat.numel(), (n_bad,), generator=g).tolist():
        flat[i] = (INF, -INF, NAN)[i % 3]

    sas = sas_compile.sasify(model, M=M, example_inputs=(x,))
    with torch.no_grad():
        assert same_function(sas(x), model(x))
    rep = sas_compile.report(model, (x,), M=(M,))
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())
    frozen = {n for n, p in sas.named_parameters() if not p.requires_grad}
    assert bool(frozen) == freeze and all(n.startswith("first.") for n in frozen)
    if tie:  # one wide Parameter serves both call sites, or the group stays dense with a reason
        assert sas.mid.weight is sas.again.weight
    torch.manual_seed(seed + 1)  # a differently initialised model of the same architecture
    fresh = sas_compile.sasify(Net().double().eval(), M=M, example_inputs=(x,))
    fresh.load_state_dict(sas.state_dict())
    with torch.no_grad():
        assert same_function(fresh(x), sas(x))
