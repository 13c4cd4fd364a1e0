"""SWS reaches its kernel: ``lower_sws`` puts masked linears on the packed 1:M weight and ``sws_matmul``.

The lowered model computes what the masked model computes (float64 and float32 on the CPU
target, float16 through the emulator of the CUDA kernel), its packed weights are buffers
(``state_dict``, ``.to()``), and what stays on the masked weight says why: convolutions, rows
that do not fit 2:4 (``fan_in % M != 0``), dense layers.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sas_compile
from sas_compile.passes import lower_sws_to_packed as lowering
from sas_compile.passes.lower_sws_to_packed import CONV_STAYS, PackedSWSLinear
from sas_compile.runtime import emulator
from sas_compile.runtime.packing import unpack_sws_weight
from sas_compile.sws import export_sws_weights, lower_sws, measure_sws_model

from zoo import models as zoo_models

torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 4))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoderLayer: swsify exports it, so its linears are functional calls on parameters."""

    def __init__(self, dim=16):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _sparse_layers(s):
    return {n for n, w in s.sws_widths.layers.items() if w.sparse}


def _count_sws_matmul(monkeypatch):
    calls = []
    original = lowering.sws_matmul

    def counting(*args, **kwargs):
        calls.append(kwargs.get("target"))
        return original(*args, **kwargs)

    monkeypatch.setattr(lowering, "sws_matmul", counting)
    return calls


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lowered_linears_equal_the_masked_model(M, dtype, monkeypatch):
    x = torch.randn(5, 8)
    s = sas_compile.swsify(mlp(), M=M, example_inputs=x).to(dtype).eval()
    low = lower_sws(s, target="cpu")
    summary = low.sws_lowering
    assert set(summary.lowered) == _sparse_layers(s) and len(summary.lowered) == 2
    assert summary.kept == {"_0": "dense weight (no 1:M mask): nothing to pack"}  # the dense input layer
    calls = _count_sws_matmul(monkeypatch)
    with torch.no_grad():
        for shape in ((5, 8), (1, 8), (2, 3, 8)):
            xi = torch.randn(*shape, dtype=dtype)
            torch.testing.assert_close(low(xi), s(xi), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)
    assert calls == ["cpu"] * 6  # two packed layers, three inputs: every call through sws_matmul
    for node, path in summary.lowered.items():
        packed = low.get_submodule(path)
        assert isinstance(packed, PackedSWSLinear) and packed.M == M
        owner = s.get_submodule(s.sws_layers[node].rsplit(".", 1)[0])
        assert torch.equal(unpack_sws_weight(packed.packed_weight()), owner.weight.detach())
        assert packed.kept == -(-owner.weight.numel() // M)
    keys = set(low.state_dict())
    assert {"2.values", "2.meta", "2.bias", "4.values", "4.meta"} <= keys
    assert not any("parametrizations" in k for k in keys if k.startswith(("2.", "4.")))
    assert any("parametrizations" in k for k in s.state_dict())  # the masked model is untouched


def test_packed_buffers_move_with_to_and_round_trip_through_state_dict():
    x = torch.randn(5, 8)
    s = sas_compile.swsify(mlp(), M=4, example_inputs=x).eval()
    low = lower_sws(s, target="cpu")
    wide = copy.deepcopy(low).to(torch.float64)
    layer = wide.get_submodule("2")
    assert layer.values.dtype == torch.float64 and layer.meta.dtype == torch.int16
    assert layer.packed_weight().values is layer.values  # the packed view follows the moved buffers
    with torch.no_grad():
        torch.testing.assert_close(wide(x.double()), s.double()(x.double()))
    other = lower_sws(sas_compile.swsify(mlp(), M=4, example_inputs=x).eval(), target="cpu")
    other.load_state_dict(low.state_dict())
    with torch.no_grad():
        assert torch.equal(other(x), low(x))


def test_convolutions_stay_on_the_masked_weight_and_say_so():
    factory, make_x = zoo_models()["vgg"]
    x = make_x()
    s = sas_compile.swsify(factory(), M=4, example_inputs=x).eval()
    low = lower_sws(s)
    summary = low.sws_lowering
    convs = [n for n, w in s.sws_widths.layers.items() if w.op == "conv2d" and w.sparse]
    assert convs and all(summary.kept[n] == CONV_STAYS for n in convs)
    assert "im2col" in CONV_STAYS
    assert list(summary.lowered) == ["head"]
    with torch.no_grad():
        torch.testing.assert_close(low(x), s(x), rtol=0, atol=1e-6)
    assert "stays: convolution" in str(summary)


def test_rows_that_do_not_fit_2_4_stay_with_the_reason():
    model = nn.Sequential(nn.Linear(8, 15), nn.ReLU(), nn.Linear(15, 4))  # in = 21 at M = 2
    x = torch.randn(3, 8)
    s = sas_compile.swsify(model, M=2, example_inputs=x).eval()
    low = lower_sws(s)
    assert not low.sws_lowering.lowered
    assert "21 weights per row, not a multiple of M=2" in low.sws_lowering.kept["_2"]
    assert "straddle" in low.sws_lowering.kept["_2"]
    assert isinstance(low.get_submodule("2"), nn.Linear)  # still the masked module
    with torch.no_grad():
        assert torch.equal(low(x), s(x))


def test_functional_linears_of_an_exported_model():
    x = torch.randn(2, 5, 6)
    s = sas_compile.swsify(TorchEncoder(dim=16), M=4, example_inputs=x).eval()
    low = lower_sws(s, target="cpu")
    assert set(low.sws_lowering.lowered) == _sparse_layers(s) and len(low.sws_lowering.lowered) == 5
    with torch.no_grad():
        torch.testing.assert_close(low(x), s(x), rtol=0, atol=1e-6)
        s(x)  # the original keeps its masked weights (its parametrized classes are not shared with the copy)
    keys = set(low.state_dict())
    assert "layer.linear1.weight_packed.values" in keys and "layer.linear1.parametrizations.weight.original" not in keys
    before, after = measure_sws_model(s, x), measure_sws_model(low, x)
    assert before == after  # same names, widths, nonzeros and mults
    packed_before, packed_after = export_sws_weights(s), export_sws_weights(low)
    assert packed_before.keys() == packed_after.keys()
    for node in packed_before:
        assert torch.equal(packed_before[node].values, packed_after[node].values)
        assert torch.equal(packed_before[node].meta, packed_after[node].meta)


class SharedWeight(nn.Module):
    """``fc.weight`` read by the module call ``fc(h)`` and by ``F.linear(h, fc.weight[, bias])``, in either order."""

    def __init__(self, functional_first, functional_bias):
        super().__init__()
        self.functional_first, self.functional_bias = functional_first, functional_bias
        self.embed, self.fc, self.head = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.embed(x))
        for functional in (self.functional_first, not self.functional_first):
            if functional:
                h = F.linear(h, self.fc.weight, self.fc.bias if self.functional_bias else None)
            else:
                h = self.fc(h)
            h = torch.relu(h)
        return self.head(h)


@pytest.mark.parametrize("functional_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("functional_first", [True, False], ids=["functional_then_module", "module_then_functional"])
def test_a_weight_read_by_a_module_call_and_a_functional_call(functional_first, functional_bias):
    # the module call is lowered first whatever the graph order (functional first used to pack beside
    # the module, leave its call on the dropped weight and fail), and the functional call adds only
    # its own bias (it used to add the module's when it had none)
    x = torch.randn(5, 8)
    s = sas_compile.swsify(SharedWeight(functional_first, functional_bias), M=4, example_inputs=x).eval()
    low = lower_sws(s, target="cpu")
    with torch.no_grad():
        for shape in ((5, 8), (2, 3, 8)):
            xi = torch.randn(*shape)
            torch.testing.assert_close(low(xi), s(xi), rtol=0, atol=1e-6)
    summary = low.sws_lowering
    assert set(summary.lowered) == _sparse_layers(s) and len(summary.lowered) == 3
    assert {path for node, path in summary.lowered.items() if s.sws_layers[node] == "fc.weight"} == {"fc"}
    assert isinstance(low.get_submodule("fc"), PackedSWSLinear)  # one packed copy, in the module's place


def test_a_model_whose_own_weights_are_masked_lowers_as_a_copy_and_in_place():
    """torch cannot deepcopy a GraphModule whose own weights are parametrized: lower_sws used to
    refuse to copy it (inplace=True only). Its copy now rebuilds the graph over copied tensors."""
    factory, make_x = zoo_models()["functional_conv"]
    x = make_x()
    s = sas_compile.swsify(factory(), M=4, example_inputs=x).eval()
    with torch.no_grad():
        want = s(x)
    masked = measure_sws_model(s, x)
    before = {k: v.clone() for k, v in s.state_dict().items()}
    copied = lower_sws(s)
    assert copied is not s and list(copied.sws_lowering.lowered) == ["linear"]
    assert torch.nn.utils.parametrize.is_parametrized(s, "w") and not hasattr(s, "w_packed")  # untouched
    assert s.state_dict().keys() == before.keys() and all(torch.equal(s.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(copied(x), want, rtol=0, atol=1e-6)
        assert torch.equal(s(x), want)
    assert measure_sws_model(copied, x) == masked
    # the copy shares no tensor with the model
    assert not {t.data_ptr() for t in s.state_dict().values()} & {t.data_ptr() for t in copied.state_dict().values()}
    low = lower_sws(s, inplace=True)
    assert low is s and list(low.sws_lowering.lowered) == ["linear"]
    with torch.no_grad():
        torch.testing.assert_close(low(x), want, rtol=0, atol=1e-6)
    assert "w" not in dict(low.named_parameters()) and "w_packed.values" in low.state_dict()
    assert measure_sws_model(low, x) == masked


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="swsify"):
        lower_sws(mlp())
    s = sas_compile.swsify(mlp(), M=2, example_inputs=torch.randn(2, 8))
    with pytest.raises(ValueError, match="'gpu'"):
        lower_sws(s, target="gpu")


emulator_ok, emulator_why = emulator.available()


# CI (CI=true) must run the kernels: there a missing host compiler is a failure, not a skip
@pytest.mark.skipif(not emulator_ok and not os.environ.get("CI"), reason=emulator_why)
@pytest.mark.parametrize("M", [2, 4])
def test_float16_through_the_emulated_kernel(M, monkeypatch):
    torch.manual_seed(M)
    x = torch.randn(6, 8)
    # frozen masks: the float16 reference keeps the weights the float32 lowering packed
    s = sas_compile.swsify(mlp(), M=M, example_inputs=x, freeze_mask=True).eval()
    reference = copy.deepcopy(s).half().float()  # float16-rounded weights, float32 arithmetic
    low = lower_sws(s, target="emulator").half()
    kernel_calls = []
    original = emulator.sws_gemm
    monkeypatch.setattr(emulator, "sws_gemm", lambda *a, **k: kernel_calls.append(1) or original(*a, **k))
    with torch.no_grad():
        got = low(x.half())
        want = reference(x.half().float())
    assert got.dtype == torch.float16 and len(kernel_calls) == len(low.sws_lowering.lowered) == 2
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
    for layer in (low.get_submodule(p) for p in low.sws_lowering.lowered.values()):
        layer.target = "cpu"  # the target is the layer's attribute
    with torch.no_grad():
        low(x.half())
    assert len(kernel_calls) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("M", [2, 4])
def test_float16_on_the_cuda_kernel(M, monkeypatch):
    from sas_compile.runtime import cuda as cuda_kernels

    torch.manual_seed(M)
    x = torch.randn(64, 8, device="cuda")
    s = sas_compile.swsify(mlp(), M=M, example_inputs=x.cpu(), freeze_mask=True).eval()
    reference = copy.deepcopy(s).half().float().cuda()  # float16-rounded weights, float32 arithmetic
    low = lower_sws(s, target="cuda").half().cuda()
    kernel_calls = []
    original = cuda_kernels.sws_gemm
    monkeypatch.setattr(cuda_kernels, "sws_gemm", lambda *a, **k: kernel_calls.append(1) or original(*a, **k))
    with torch.no_grad():
        got = low(x.half())
        want = reference(x.half().float())
    assert got.is_cuda and got.dtype == torch.float16 and len(kernel_calls) == 2
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


class _RootAndTiedWeights(nn.Module):
    """A masked weight of the root itself, and a module whose weight the graph also reads."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8) * 0.1)
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(F.linear(x, self.w))
        h = torch.relu(self.fc(h)) + F.linear(h, self.fc.weight)
        return self.out(h)


def test_copying_a_root_masked_graph_masks_every_weight_once():
    from torch.nn.utils import parametrize

    from sas_compile.sws import _copy

    torch.manual_seed(0)
    x = torch.randn(5, 8)
    s = sas_compile.swsify(_RootAndTiedWeights(), M=4, example_inputs=x, dense_input_layers=False).eval()
    assert isinstance(s, torch.fx.GraphModule) and parametrize.is_parametrized(s, "w")
    copied = _copy(s)
    masks = {(path, name): len(plist) for path, m in copied.named_modules() if parametrize.is_parametrized(m)
             for name, plist in m.parametrizations.items()}
    assert masks == {("", "w"): 1, ("fc", "weight"): 1, ("out", "weight"): 1}
    assert type(copied).__name__ == type(s).__name__
    with torch.no_grad():
        want = s(x)
        assert torch.equal(copied(x), want)
        low = lower_sws(s, target="cpu")
        torch.testing.assert_close(low(x), want, rtol=0, atol=1e-6)
        assert torch.equal(s(x), want)  # the model itself is untouched
    assert len(low.sws_lowering.lowered) == 4
