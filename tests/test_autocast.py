"""Mixed precision: sasify, swsify and swatify models train under torch.autocast.

The ``sas::`` and ``swat::`` ops cast their operands as ``aten::linear`` does, so a few SGD
steps under autocast follow the float32 run within mixed-precision tolerance. The CPU
(bfloat16) cases run in CI; the CUDA cases (float16 with GradScaler, bfloat16) and the
float32 CPU-vs-CUDA agreement run in the GPU suite.
"""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch import nn

import sas_compile
import sas_compile.layers  # noqa: F401  (registers the sas:: ops the tests call directly)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CONVERSIONS = ("dense", "sasify", "swsify", "swatify")
STEPS = 5


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def convert(kind: str, model: nn.Module, x: torch.Tensor) -> nn.Module:
    if kind == "sasify":
        return sas_compile.sasify(model, M=2)
    if kind == "swsify":
        return sas_compile.swsify(model, M=4, example_inputs=(x,))
    if kind == "swatify":
        return sas_compile.swatify(model, sparsity=0.5)
    return copy.deepcopy(model)


def data(device: str):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    return x.to(device), y.to(device)


def train_losses(kind: str, device: str, autocast_dtype=None, steps: int = STEPS):
    """Losses of ``steps`` SGD steps of the converted small CNN (float32 or under autocast)."""
    x, y = data("cpu")
    model = convert(kind, small_cnn(), x).to(device).train()
    x, y = x.to(device), y.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=autocast_dtype == torch.float16)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            out = model(x)
            if autocast_dtype is not None:
                assert out.dtype == autocast_dtype, f"{kind}: the output is {out.dtype} under autocast"
            loss = nn.functional.cross_entropy(out.float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must not change parameter dtypes"
    return losses


@contextlib.contextmanager
def full_float32():
    """float32 matmuls and convolutions in full precision (no tf32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(saved[1])
        torch.backends.cuda.matmul.allow_tf32 = saved[0]


def max_rel_dev(a, b) -> float:
    return max(abs(u - v) / abs(v) for u, v in zip(a, b))


@pytest.mark.parametrize("kind", CONVERSIONS)
def test_cpu_autocast_bf16_follows_float32(kind):
    reference = train_losses(kind, "cpu")
    mixed = train_losses(kind, "cpu", torch.bfloat16)
    assert reference[-1] < reference[0], "the float32 run must learn for the comparison to mean anything"
    assert max_rel_dev(mixed, reference) < 5e-2, (mixed, reference)


@pytest.mark.parametrize("op", ["linear", "conv2d", "conv3d", "conv_transpose", "conv_transpose_from_dense"])
def test_sas_ops_cast_like_aten_under_autocast(op):
    x = torch.randn(4, 6, 5, 5)
    if op == "linear":
        x = x.flatten(1)
        w = torch.randn(3, 2 * x.shape[1], requires_grad=True)
        call = lambda: torch.ops.sas.linear(x, w, None, 2, "sign_pattern")  # noqa: E731
    elif op == "conv3d":  # the conv2d op on a 5-D weight
        x = torch.randn(2, 6, 4, 5, 3)
        w = torch.randn(3, 12, 3, 3, 3, requires_grad=True)
        call = lambda: torch.ops.sas.conv2d(x, w, None, [1, 1, 1], [1, 1, 1], [1, 1, 1], 1, 2,  # noqa: E731
                                            "sign_pattern")
    elif op == "conv_transpose":
        w = torch.randn(12, 3, 3, 3, requires_grad=True)
        call = lambda: torch.ops.sas.conv_transpose(x, w, None, [2, 2], [1, 1], [1, 1], [1, 1], 1, 2,  # noqa: E731
                                                    "sign_pattern")
    elif op == "conv_transpose_from_dense":
        w = torch.randn(6, 3, 3, 3, requires_grad=True)
        call = lambda: torch.ops.sas.conv_transpose_from_dense(  # noqa: E731
            x, w, None, [2, 2], [1, 1], [1, 1], [1, 1], 1, 2, False, "sign_pattern", True)
    else:
        w = torch.randn(3, 12, 3, 3, requires_grad=True)
        call = lambda: torch.ops.sas.conv2d(x, w, None, [1, 1], [1, 1], [1, 1], 1, 2, "sign_pattern")  # noqa: E731
    reference = call()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max().item())
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    # float64 is left alone, as autocast leaves it
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.sas.linear(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64),
                                    None, 2, "sign_pattern").dtype == torch.float64


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("kind", CONVERSIONS)
def test_cuda_float32_training_matches_cpu(kind):
    cpu = train_losses(kind, "cpu")
    with full_float32():
        gpu = train_losses(kind, "cuda")
    assert max_rel_dev(gpu, cpu) < 1e-3, (gpu, cpu)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", CONVERSIONS)
def test_cuda_autocast_follows_float32(kind, dtype):
    with full_float32():
        reference = train_losses(kind, "cuda")
    mixed = train_losses(kind, "cuda", dtype)
    assert max_rel_dev(mixed, reference) < 5e-2, (mixed, reference)


def test_inference_under_autocast_casts_each_weight_once(monkeypatch):
    """Without autograd a parameter's cast is reused across calls, so the per-weight caches
    (dead slots here) hit: a fresh cast per call rescanned every weight on every call (and on
    a GPU synchronised with the host at every layer). Training still casts per call."""
    from sas_compile.runtime import projection

    torch.manual_seed(0)
    model = sas_compile.sasify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), M=2,
                               dense_input_layers=False)
    x = torch.randn(4, 16)
    scans = []
    real = projection.zero_columns
    monkeypatch.setattr(projection, "zero_columns", lambda *a, **k: scans.append(1) or real(*a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = model(x)
        assert first.dtype == torch.bfloat16
        scanned = len(scans)
        for _ in range(3):
            torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    assert scanned == 2 and len(scans) == scanned  # one scan per weight, none on later calls
    with torch.no_grad():
        model[-1].weight.mul_(0.5)  # a new version: cast and scanned again
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)
    assert len(scans) == scanned + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # training: gradients reach the float32 weights
        model(x).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_inference_under_autocast(backend):
    """Under a compiler's tracing the parameters are fake tensors: the inference cast cache is
    for eager parameters only (it read a fake tensor's data pointer and failed the compile)."""
    torch.manual_seed(0)
    model = sas_compile.sasify(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), M=2,
                               dense_input_layers=False)
    x = torch.randn(4, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()
