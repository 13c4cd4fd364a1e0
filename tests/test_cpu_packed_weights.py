"""CPU inference on packed weights: under ``torch.inference_mode`` a SAS convolution whose wide
weight has at least as many values as its wide input (and at least ``PACK_MIN_WEIGHT_VALUES``,
set to 0 here so that small test weights take the path) runs oneDNN's convolution on the weight
packed once per weight version (``runtime/sas_ops.py``, ``_packed_cpu_weight``).

Every case is checked against a float64 reference on random inputs, and each test asserts
which path ran, so a path that silently stopped being taken fails here.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sas_compile
from sas_compile.runtime import sas_ops
from sas_compile.runtime.projection import reference_project

RULE = "sign_pattern"

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch built with oneDNN")


@pytest.fixture
def packed_calls(monkeypatch):
    """Records, per call of the packing decision, whether a packed weight came back."""
    calls = []
    real = sas_ops._packed_cpu_weight

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(sas_ops, "_packed_cpu_weight", spy)
    monkeypatch.setattr(sas_ops, "PACK_MIN_WEIGHT_VALUES", 0)  # small test weights take the packed path too
    sas_ops.clear_wide_weight_cache()
    return calls


def _reference(x, weight, bias, stride, padding, dilation, groups, M):
    wide = reference_project(x.double(), M, 1)
    return F.conv2d(wide, weight.double(), None if bias is None else bias.double(), stride, padding, dilation, groups)


def _close(out, ref):
    scale = ref.abs().max().item() + 1.0
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4 * scale)


CASES = [
    # (batch, channels, size, out, kernel, stride, padding, dilation, groups, M, bias)
    (1, 16, 4, 32, 3, 1, 1, 1, 1, 4, True),
    (3, 16, 4, 32, 3, 1, 1, 1, 1, 4, False),
    (1, 5, 3, 7, 3, 1, 1, 1, 1, 2, True),      # ragged: 5 channels, 3x3 image, 7 outputs
    (1, 5, 6, 9, 3, 2, 0, 1, 1, 4, True),      # stride 2, no padding, a partial last channel group
    (2, 8, 5, 16, 3, 1, 2, 2, 1, 2, False),    # dilation 2
    (1, 8, 4, 12, 3, 1, 1, 1, 2, 2, True),     # two groups
    (1, 24, 6, 16, 1, 2, 0, 1, 1, 2, True),    # strided 1x1: only the positions it reads are projected
    (2, 12, 3, 40, 1, 1, 0, 1, 1, 8, False),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_inference_mode_packs_and_matches_float64(packed_calls, case, channels_last):
    batch, channels, size, out, k, stride, padding, dilation, groups, M, has_bias = case
    torch.manual_seed(0)
    x = torch.randn(batch, channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out, channels * M // groups, k, k) * 0.2
    bias = torch.randn(out) if has_bias else None
    args = ([stride, stride], [padding, padding], [dilation, dilation], groups, M, RULE)
    with torch.inference_mode():
        got = torch.ops.sas.conv2d(x, weight, bias, *args)
    assert packed_calls == [True]
    ref = _reference(x, weight, bias, stride, padding, dilation, groups, M)
    _close(got, ref)
    assert got.shape == ref.shape
    expected_format = torch.channels_last if channels_last and got.shape[1] > 1 else torch.contiguous_format
    assert got.is_contiguous(memory_format=expected_format)
    with torch.no_grad():  # the plain path: not packed, the same values
        plain = torch.ops.sas.conv2d(x, weight, bias, *args)
    assert packed_calls == [True, False]
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)


def test_a_weight_written_in_place_is_packed_again(packed_calls):
    torch.manual_seed(1)
    x = torch.randn(1, 16, 4, 4)
    weight = torch.randn(32, 64, 3, 3) * 0.2
    args = ([1, 1], [1, 1], [1, 1], 1, 4, RULE)
    before = weight.clone()
    with torch.inference_mode():
        first = torch.ops.sas.conv2d(x, weight, None, *args)
    with torch.no_grad():
        weight.mul_(-0.5).add_(0.01)  # an optimizer step's kind of write: the version counter moves
    with torch.inference_mode():
        second = torch.ops.sas.conv2d(x, weight, None, *args)
    assert packed_calls == [True, True]
    _close(first, _reference(x, before, None, 1, 1, 1, 1, 4))
    _close(second, _reference(x, weight, None, 1, 1, 1, 1, 4))


def test_other_batch_and_image_sizes_reuse_the_pack_exactly(packed_calls, monkeypatch):
    torch.manual_seed(2)
    weight = torch.randn(24, 64, 3, 3) * 0.2
    packs = []
    real_reorder = torch._C._nn.mkldnn_reorder_conv2d_weight
    monkeypatch.setattr(torch._C._nn, "mkldnn_reorder_conv2d_weight",
                        lambda *a: packs.append(a[-1]) or real_reorder(*a))
    args = ([1, 1], [1, 1], [1, 1], 1, 4, RULE)
    with torch.inference_mode():
        for batch, size in ((1, 4), (3, 4), (1, 5), (2, 3), (1, 4)):
            x = torch.randn(batch, 16, size, size)
            _close(torch.ops.sas.conv2d(x, weight, None, *args), _reference(x, weight, None, 1, 1, 1, 1, 4))
    assert packed_calls == [True] * 5
    assert len(packs) == 1  # one pack per weight version, whatever the batch and image sizes


@pytest.mark.parametrize("why", ["no_grad", "float64", "weight smaller than input", "small weight", "env"])
def test_what_stays_on_the_plain_convolution(packed_calls, monkeypatch, why):
    torch.manual_seed(3)
    x, weight = torch.randn(1, 16, 4, 4), torch.randn(32, 64, 3, 3) * 0.2
    if why == "small weight":  # the default threshold: 18,432 values, where packing measured slower
        monkeypatch.setattr(sas_ops, "PACK_MIN_WEIGHT_VALUES", 1 << 18)
    if why == "float64":
        x, weight = x.double(), weight.double()
    if why == "weight smaller than input":
        x, weight = torch.randn(2, 4, 16, 16), torch.randn(4, 16, 3, 3) * 0.2
    if why == "env":
        monkeypatch.setenv(sas_ops.ENV_CPU_PACK, "0")
    args = ([1, 1], [1, 1], [1, 1], 1, 4, RULE)
    context = torch.no_grad() if why == "no_grad" else torch.inference_mode()
    with context:
        got = torch.ops.sas.conv2d(x, weight, None, *args)
    assert packed_calls == [False]
    _close(got, _reference(x, weight, None, 1, 1, 1, 1, 4))


def test_sasified_model_and_compiled_dense_model_under_inference_mode(packed_calls):
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 8, 1),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 5),
    ).eval()
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        dense = model(x)
    sas = sas_compile.sasify(model, M=4)
    with torch.inference_mode():
        got = sas(x)
    assert any(packed_calls), packed_calls  # the deep, weight-heavy convolutions were packed
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    packed_calls.clear()
    compiled = torch.compile(model, backend="sas", options={"M": 4})
    with torch.inference_mode():
        got = compiled(x)
    assert any(packed_calls), packed_calls  # sas::conv2d_from_dense packs its cached expansion
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_conv1d_packs_its_kernel_of_height_one(packed_calls):
    torch.manual_seed(5)
    x = torch.randn(1, 6, 5)
    weight = torch.randn(10, 12, 3) * 0.2
    with torch.inference_mode():
        got = sas_ops.sas_conv1d_call(x, weight, None, 1, 1, 1, 1, 2, RULE)
    assert packed_calls == [True]
    ref = F.conv1d(reference_project(x.double(), 2, 1), weight.double(), None, 1, 1)
    _close(got, ref)


def test_weights_made_under_inference_mode_are_not_cached(packed_calls):
    """An inference tensor has no version counter: a weight created under inference_mode is
    used as it is on every call (nothing cached against it), and a write to it is seen."""
    torch.manual_seed(6)
    x = torch.randn(1, 16, 4, 4)
    with torch.inference_mode():
        weight = torch.randn(32, 64, 3, 3) * 0.2
        first = torch.ops.sas.conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], 1, 4, RULE)
        _close(first, _reference(x, weight, None, 1, 1, 1, 1, 4))
        weight.mul_(2.0)  # allowed in inference mode, invisible to a version counter
        second = torch.ops.sas.conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], 1, 4, RULE)
        _close(second, _reference(x, weight, None, 1, 1, 1, 1, 4))
    assert packed_calls == [False, False]


def test_values_cached_under_inference_mode_serve_a_training_step():
    """Per-weight values (dead slots, expansions, packs) made first under inference_mode are normal
    tensors: a later training step of the same model can use and save them."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 16, 3))
    sas = sas_compile.sasify(model, M=2)  # fold_relu: the slots of negative values start dead
    x = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        sas.eval()(x)
    sas.train()
    loss = sas(x.requires_grad_()).square().mean()
    loss.backward()
    assert x.grad is not None and all(p.grad is not None for p in sas.parameters() if p.requires_grad)
    sas_ops.clear_wide_weight_cache()


def test_a_failing_packed_op_falls_back_once_and_logs(monkeypatch, caplog):
    """The packed ops are PyTorch internals: if one fails (another PyTorch version), the plain
    convolution gives the values, packing stops for the process, and the reason is logged once.
    A caller's own error (a wrong input) is still the plain convolution's, and stops nothing."""
    monkeypatch.setitem(sas_ops._packing, "failed", None)
    monkeypatch.setattr(sas_ops, "PACK_MIN_WEIGHT_VALUES", 0)
    sas_ops.clear_wide_weight_cache()
    torch.manual_seed(8)
    x, weight = torch.randn(1, 16, 4, 4), torch.randn(32, 64, 3, 3) * 0.2
    args = ([1, 1], [1, 1], [1, 1], 1, 4, RULE)
    with torch.inference_mode():
        with pytest.raises(RuntimeError):  # 16 channels against a weight of 8 x 4 wide inputs: the caller's error
            torch.ops.sas.conv2d(torch.randn(1, 8, 4, 4), torch.randn(32, 64, 3, 3), None, *args)
    assert sas_ops._packing["failed"] is None

    def broken(*a, **k):
        raise RuntimeError("no such overload in this PyTorch")

    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", broken)
    with caplog.at_level("WARNING", logger="sas_compile.runtime"), torch.inference_mode():
        first = torch.ops.sas.conv2d(x, weight, None, *args)
        second = torch.ops.sas.conv2d(x, weight, None, *args)
    _close(first, _reference(x, weight, None, 1, 1, 1, 1, 4))
    torch.testing.assert_close(first, second)
    assert "no such overload" in sas_ops._packing["failed"]
    assert sum("weight packing failed" in r.getMessage() for r in caplog.records) == 1
    with torch.inference_mode():  # packing stays off: no more packs are made
        assert sas_ops._packed_cpu_weight(torch.randn(1, 64, 4, 4), weight, [1, 1], [1, 1], [1, 1], 1) is None


@pytest.mark.parametrize("compiled", [False, True])
def test_training_does_not_hold_the_packs_of_an_inference_pass(packed_calls, compiled):
    """Validation under inference_mode during training packs the weight-heavy layers. A sasified
    model's training forward frees each trainable layer's pack; a dense model compiled with
    backend="sas" packs its cached expansions, which die with them at the first forward after an
    optimizer step. Either way the training steps that follow do not hold stale packs."""
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Linear(32 * 16, 3))
    x = torch.randn(1, 3, 4, 4)
    if compiled:
        net = torch.compile(model, backend="sas", options={"M": 4, "train_dense": True})
    else:
        net = sas_compile.sasify(model, M=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.inference_mode():
        net(x)
    assert any(packed_calls)
    assert sas_ops._packed_cache.holds_values()
    for _ in range(2):
        net(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not sas_ops._packed_cache.holds_values()
    torch._dynamo.reset()


def test_a_packed_op_that_computes_something_else_is_caught_before_use(monkeypatch, caplog):
    """Each pack is checked once against F.conv2d on the call's own input: a packed op that runs
    but computes something else (another PyTorch version reading its arguments differently) never
    gives a result; the plain convolution does, and packing stops with the reason logged."""
    monkeypatch.setitem(sas_ops._packing, "failed", None)
    monkeypatch.setattr(sas_ops, "PACK_MIN_WEIGHT_VALUES", 0)
    sas_ops.clear_wide_weight_cache()
    real = torch.ops.mkldnn._convolution_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", lambda *a: real(*a) * 1.01)
    torch.manual_seed(10)
    x, weight = torch.randn(1, 16, 4, 4), torch.randn(32, 64, 3, 3) * 0.2
    with caplog.at_level("WARNING", logger="sas_compile.runtime"), torch.inference_mode():
        got = torch.ops.sas.conv2d(x, weight, None, [1, 1], [1, 1], [1, 1], 1, 4, RULE)
    _close(got, _reference(x, weight, None, 1, 1, 1, 1, 4))
    assert "disagrees with F.conv2d" in sas_ops._packing["failed"]
    assert sum("weight packing failed" in r.getMessage() for r in caplog.records) == 1


def test_non_finite_inputs_pass_the_check_and_match_the_plain_path(packed_calls, monkeypatch):
    """+-inf and NaN land in the same outputs on both paths, so the once-per-pack check accepts
    them and packing stays on."""
    monkeypatch.setitem(sas_ops._packing, "failed", None)
    torch.manual_seed(11)
    x, weight = torch.randn(1, 16, 4, 4), torch.randn(32, 64, 3, 3) * 0.2
    x[0, 3, 1, 2], x[0, 7, 0, 0], x[0, 9, 3, 3] = float("inf"), float("-inf"), float("nan")
    args = ([1, 1], [1, 1], [1, 1], 1, 4, RULE)
    with torch.inference_mode():
        got = torch.ops.sas.conv2d(x, weight, None, *args)
    with torch.no_grad():
        plain = torch.ops.sas.conv2d(x, weight, None, *args)
    assert packed_calls == [True, False] and sas_ops._packing["failed"] is None
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert got.isnan().any() and got.isinf().any()
