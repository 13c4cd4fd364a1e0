"""The C host kernels (M = 2: interleaved pairs and NCHW planes) against the PyTorch formulation they replace."""
from __future__ import annotations

import logging
import platform

import pytest
import torch

from sas_compile.runtime import host_kernels, sas_ops  # noqa: F401  (sas_ops registers torch.ops.sas.*)
from sas_compile.runtime.projection import project

RULE = "sign_pattern"

needs_compiler = pytest.mark.skipif(host_kernels._compiler() is None,
                                    reason="no host C compiler: the PyTorch formulation is used (tested elsewhere)")


def _special(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype)
    flat = x.view(-1)
    flat[::97] = 0.0
    flat[1::101] = -0.0
    flat[2::103] = float("inf")
    flat[3::107] = float("-inf")
    flat[4::109] = float("nan")
    return x


def _torch_formulation(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setenv("SAS_COMPILE_HOST_KERNELS", "0")
        return fn()


@needs_compiler
def test_the_library_builds_and_loads_here():
    ok, where = host_kernels.available()
    assert ok, where


CASES = [((4099,), -1), ((37, 131), -1), ((3, 29, 71), -1), ((3, 29, 71), 1), ((4, 33, 7, 5), 1), ((5, 1, 3000), 1),
         ((2, 3, 4, 700), 2),
         # an even C along the last dim: at M = 4 the vector kernel (AVX-512 builds), ranges that end mid-step
         ((37, 130), -1), ((2, 7, 5, 66), -1)]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_projection_equals_the_torch_formulation(monkeypatch, dtype, shape, dim, threads):
    x = _special(shape, dtype, seed=len(shape) + dim)
    expected = _torch_formulation(monkeypatch, lambda: project(x, 2, dim))
    wide_shape = list(shape)
    wide_shape.insert(dim % len(shape) + 1, 2)
    out = torch.empty(wide_shape, dtype=dtype)
    assert host_kernels.project_m2(x, out, dim, check_finite=True, threads=threads) is False  # x holds inf, NaN
    torch.testing.assert_close(out.flatten(dim % len(shape), dim % len(shape) + 1), expected, rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(project(x, 2, dim), expected, rtol=0, atol=0, equal_nan=True)  # project() uses it


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("threads", [None, 1, 4])
def test_slot_gradient_equals_the_torch_formulation(monkeypatch, dtype, shape, dim, threads):
    x = _special(shape, dtype, seed=7 + dim)
    d = dim % len(shape)
    wide_shape = list(shape)
    wide_shape[d] *= 2
    g = torch.randn(wide_shape, dtype=dtype)
    expected = _torch_formulation(monkeypatch, lambda: sas_ops.slot_grad(g.clone(), x, 2, RULE, d))
    got = host_kernels.slot_grad_m2(g, x, dim, threads=threads)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    per_slot = g.unflatten(d, (shape[d], 2))
    slow = torch.where(x <= 0, -per_slot.select(d + 1, 1), per_slot.select(d + 1, 0))  # NaN is not <= 0: slot 0
    torch.testing.assert_close(got, slow, rtol=0, atol=0)


def _count_kernel_calls(monkeypatch, project_name: str, grad_name: str):
    """Counts of the calls of ``host_kernels.<project_name>`` / ``<grad_name>`` that ran a kernel."""
    calls = {"project": 0, "grad": 0}
    real_project, real_grad = getattr(host_kernels, project_name), getattr(host_kernels, grad_name)

    def project_spy(*args, **kwargs):
        done = real_project(*args, **kwargs)
        calls["project"] += done is not None
        return done

    def grad_spy(*args, **kwargs):
        out = real_grad(*args, **kwargs)
        calls["grad"] += out is not None
        return out

    monkeypatch.setattr(host_kernels, project_name, project_spy)
    monkeypatch.setattr(host_kernels, grad_name, grad_spy)
    return calls


def _pattern_by_definition(x: torch.Tensor, dim: int, M: int) -> torch.Tensor:
    """The sign pattern written out from its definition, one group at a time (float64 loops):
    bits b = log2(M); slot of every channel of group g = sum_j [x_(g*b+j) <= 0] 2^j."""
    bits = M.bit_length() - 1
    xm = x.movedim(dim, -1)
    slot = torch.zeros(xm.shape, dtype=torch.int64)
    for c0 in range(0, xm.shape[-1], bits):
        pattern = sum((xm[..., c0 + j] <= 0).to(torch.int64) << j for j in range(min(bits, xm.shape[-1] - c0)))
        slot[..., c0:c0 + bits] = pattern.unsqueeze(-1)
    wide = torch.zeros(*xm.shape, M, dtype=x.dtype)
    wide.scatter_(-1, slot.unsqueeze(-1), xm.abs().unsqueeze(-1))
    return wide.movedim((-2, -1), (dim, dim + 1)), slot.movedim(-1, dim)


@needs_compiler
@pytest.mark.parametrize("M", [4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, dim", CASES)
@pytest.mark.parametrize("threads", [None, 1, 3])
def test_sign_pattern_kernels_equal_the_torch_formulation(monkeypatch, M, dtype, shape, dim, threads):
    """M >= 4 (each log2(M) has its own compiled function): groups of log2(M) channels, partial
    last groups (131 channels at M = 8), planes longer than the kernel's chunk (700 > 256),
    +-0, +-inf and NaN."""
    x = _special(shape, dtype, seed=M + len(shape) + dim)
    d = dim % len(shape)
    wide_shape = list(shape)
    wide_shape.insert(d + 1, M)
    out = torch.full(wide_shape, 7.0, dtype=dtype)  # every value must be written
    assert host_kernels.project_sign(x, out, dim, M, check_finite=True, threads=threads) is False  # inf, NaN
    expected = _torch_formulation(monkeypatch, lambda: project(x, M, dim))
    torch.testing.assert_close(out.flatten(d, d + 1), expected, rtol=0, atol=0, equal_nan=True)
    by_definition, slot = _pattern_by_definition(x, d, M)
    torch.testing.assert_close(out, by_definition, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(project(x, M, dim), expected, rtol=0, atol=0, equal_nan=True)  # project() uses it

    g = torch.randn(out.flatten(d, d + 1).shape, dtype=dtype)
    got = host_kernels.slot_grad_sign(g, x, dim, M, threads=threads)
    expected_grad = _torch_formulation(monkeypatch, lambda: sas_ops.slot_grad(g.clone(), x, M, RULE, d))
    torch.testing.assert_close(got, expected_grad, rtol=0, atol=0)
    at_slot = g.unflatten(d, (shape[d], M)).gather(d + 1, slot.unsqueeze(d + 1)).squeeze(d + 1)
    torch.testing.assert_close(got, torch.where(x <= 0, -at_slot, at_slot), rtol=0, atol=0)


@needs_compiler
@pytest.mark.parametrize("M", [2, 4, 8, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, dim", [((37, 131), -1), ((37, 130), -1), ((3, 29, 71), 1), ((2, 3, 4, 700), 2)])
@pytest.mark.parametrize("threads", [1, 3])
def test_the_projection_reports_exactly_whether_x_is_finite(M, dtype, shape, dim, threads):
    """The flag a layer with all-zero weight columns relies on (project_transient masks their
    slots only when it is False): False for one +inf, -inf or NaN anywhere (first and last value,
    inside a partial last group, in every thread's range, in every block of the check), True
    for finite values up to the largest, whose sum would overflow. Unasked, no check: True."""
    d = dim % len(shape)
    wide_shape = list(shape)
    wide_shape.insert(d + 1, M)
    out = torch.empty(wide_shape, dtype=dtype)
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(M + len(shape)))
    assert host_kernels.project_sign(x, out, dim, M, check_finite=True, threads=threads) is True
    huge = x.sign() * torch.finfo(dtype).max  # finite: a sum-based check would call it infinite
    assert host_kernels.project_sign(huge, out, dim, M, check_finite=True, threads=threads) is True
    n = x.numel()
    for index in sorted({0, n - 1, n // 3, n // 2, 2 * n // 3, n - 2, 2047, 2048, 4095}):
        for bad in (float("inf"), float("-inf"), float("nan")):
            y = x.clone()
            y.view(-1)[index] = bad
            assert host_kernels.project_sign(y, out, dim, M, check_finite=True, threads=threads) is False, (index, bad)
            torch.testing.assert_close(out.flatten(d, d + 1), _pattern_or_pair(y, d, M), rtol=0, atol=0,
                                       equal_nan=True)
            assert host_kernels.project_sign(y, out, dim, M, threads=threads) is True  # not asked: not checked


def _pattern_or_pair(x: torch.Tensor, dim: int, M: int) -> torch.Tensor:
    if M == 2:
        return torch.stack([x.clamp_min(0), (-x).clamp_min(0)], dim + 1).flatten(dim, dim + 1)
    return _pattern_by_definition(x, dim, M)[0].flatten(dim, dim + 1)


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


@needs_compiler
def test_the_vector_kernel_is_built_where_the_cpu_has_it_and_a_build_without_it_agrees(monkeypatch, tmp_path):
    """M = 4, float32, an even C along the last dim: AVX-512 builds (``-march=native`` on a CPU
    with it) take the vector kernel; a build without it (``-mno-avx512f``) the generic loop. Both
    write the definition's values bit for bit, report non-finite x exactly and give the same
    input gradient."""
    assert host_kernels._library().sas_host_avx512() == int(_has_avx512() and platform.machine() == "x86_64")
    shape = (37, 130)
    x = _special(shape, torch.float32, seed=11)
    expected, slot = _pattern_by_definition(x, 1, 4)
    g = torch.randn(shape[0], shape[1] * 4, generator=torch.Generator().manual_seed(3))
    at_slot = g.unflatten(1, (shape[1], 4)).gather(2, slot.unsqueeze(2)).squeeze(2)
    expected_grad = torch.where(x <= 0, -at_slot, at_slot)
    outputs = []
    flag_sets = [[*flags, "-mno-avx512f"] for flags in host_kernels._flag_sets()] if _has_avx512() else None
    for variant in ("native", "without") if flag_sets else ("native",):
        if variant == "without":
            _fresh_library(monkeypatch, tmp_path)
            monkeypatch.setattr(host_kernels, "_flag_sets", lambda: flag_sets)
            assert host_kernels._library().sas_host_avx512() == 0
        for threads in (1, 2, 3):
            out = torch.full((*shape, 4), 7.0)
            assert host_kernels.project_sign(x, out, -1, 4, check_finite=True, threads=threads) is False
            torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
            outputs.append(out.view(torch.int32).clone())
            finite = x.nan_to_num(posinf=1.0, neginf=-1.0)
            assert host_kernels.project_sign(finite, out, -1, 4, check_finite=True, threads=threads) is True
            grad = host_kernels.slot_grad_sign(g, x, -1, 4, threads=threads)
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
            outputs.append(grad.view(torch.int32).clone())
    assert all(torch.equal(outputs[i % 2], o) for i, o in enumerate(outputs))  # bits, NaN's and -0's included


@needs_compiler
def test_sign_pattern_kernels_decline_what_they_do_not_cover():
    x = torch.randn(64, 96)
    assert host_kernels.project_sign(x, torch.empty(64, 96 * 256), -1, 256) is None  # a slot needs more than a byte
    assert host_kernels.project_sign(x.to(torch.float16), torch.empty(64, 384, dtype=torch.float16), -1, 4) is None
    assert host_kernels.project_sign(x.t(), torch.empty(96, 256), -1, 4) is None  # not contiguous
    assert host_kernels.project_sign(torch.randn(0, 8), torch.empty(0, 32), -1, 4) is None  # empty: PyTorch's ops
    assert host_kernels.slot_grad_sign(torch.randn(0, 16), torch.randn(0, 8), -1, 2) is None
    assert host_kernels.slot_grad_sign(torch.randn(64, 96 * 4).t(), x, -1, 4) is None  # not contiguous


@needs_compiler
@pytest.mark.parametrize("M", [2, 4, 8])
def test_small_inputs_take_the_kernels(monkeypatch, M):
    """A layer of a few values (batch-1 inference, tiny models) is projected and folded by the
    kernels too: their call measured cheaper than PyTorch's ops at every size."""
    x = torch.randn(3, 5)
    x[0, 0], x[1, 2] = 0.0, -0.0
    out = torch.full((3, 5 * M), 7.0)
    assert host_kernels.project_sign(x, out, -1, M) is True
    expected = _torch_formulation(monkeypatch, lambda: project(x, M, -1, RULE))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    g = torch.randn(3, 5 * M)
    folded = host_kernels.slot_grad_sign(g, x, -1, M)
    assert folded is not None
    expected_grad = _torch_formulation(monkeypatch, lambda: sas_ops.slot_grad(g.clone(), x, M, RULE, 1))
    torch.testing.assert_close(folded, expected_grad, rtol=0, atol=0)


@needs_compiler
@pytest.mark.parametrize("M", [4, 8])
def test_the_ops_use_the_sign_pattern_kernels_and_match_float64(monkeypatch, M):
    calls = _count_kernel_calls(monkeypatch, "project_sign", "slot_grad_sign")
    torch.manual_seed(M)
    x = torch.randn(70, 91, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 91 * M, dtype=torch.float64, requires_grad=True)
    out = torch.ops.sas.linear(x, w, None, M, RULE)
    out.backward(torch.ones_like(out))
    wide = _pattern_by_definition(x.detach(), 1, M)[0].flatten(1, 2)
    torch.testing.assert_close(out, wide @ w.detach().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, torch.ones(70, 11, dtype=torch.float64).T @ wide, rtol=1e-12, atol=1e-12)
    assert calls == {"project": 2, "grad": 1}  # forward, the backward's recomputation, the input gradient
    for memory_format in (torch.contiguous_format, torch.channels_last):  # NCHW planes and NHWC groups
        xc = torch.randn(2, 25, 9, 10, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
        wc = torch.randn(5, 25 * M, 3, 3, dtype=torch.float64, requires_grad=True)
        before = dict(calls)
        out = torch.ops.sas.conv2d(xc, wc, None, [1, 1], [1, 1], [1, 1], 1, M, RULE)
        out.sum().backward()
        assert calls["project"] == before["project"] + 2 and calls["grad"] == before["grad"] + 1
        planes = _pattern_by_definition(xc.detach(), 1, M)[0].flatten(1, 2)
        torch.testing.assert_close(out, torch.nn.functional.conv2d(planes, wc.detach(), None, 1, 1), rtol=1e-12,
                                   atol=1e-12)
    small = (x.detach()[:4, :].clone().requires_grad_(), w.detach()[:3].clone().requires_grad_())
    with monkeypatch.context() as m:
        m.setattr(host_kernels, "MIN_VALUES", 1)  # gradcheck's small inputs through the kernels too
        assert torch.autograd.gradcheck(lambda a, b: torch.ops.sas.linear(a, b, None, M, RULE), small, fast_mode=True)


@needs_compiler
def test_the_ops_use_the_kernels_and_match_float64(monkeypatch):
    calls = _count_kernel_calls(monkeypatch, "project_m2", "slot_grad_m2")
    torch.manual_seed(0)
    x = torch.randn(70, 90, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 180, dtype=torch.float64, requires_grad=True)
    out = torch.ops.sas.linear(x, w, None, 2, RULE)
    out.backward(torch.ones_like(out))
    wide = torch.stack([x.detach().clamp_min(0), (-x.detach()).clamp_min(0)], -1).flatten(-2)
    torch.testing.assert_close(out, wide @ w.detach().T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.grad, torch.ones(70, 11, dtype=torch.float64).T @ wide, rtol=1e-12, atol=1e-12)
    assert calls == {"project": 2, "grad": 1}  # forward, the backward's recomputation, the input gradient
    # a channels_last convolution's pairs too
    xc = torch.randn(2, 48, 9, 10, dtype=torch.float64).to(memory_format=torch.channels_last).requires_grad_()
    wc = torch.randn(5, 96, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.ops.sas.conv2d(xc, wc, None, [1, 1], [1, 1], [1, 1], 1, 2, RULE).sum().backward()
    assert calls["project"] == 4 and calls["grad"] == 2
    # and an NCHW one's planes
    xn = xc.detach().contiguous().requires_grad_()
    out = torch.ops.sas.conv2d(xn, wc, None, [1, 1], [1, 1], [1, 1], 1, 2, RULE)
    out.sum().backward()
    assert calls["project"] == 6 and calls["grad"] == 3
    planes = torch.stack([xn.detach().clamp_min(0), (-xn.detach()).clamp_min(0)], 2).flatten(1, 2)
    reference = torch.nn.functional.conv2d(planes, wc.detach(), None, 1, 1)
    torch.testing.assert_close(out, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.sas.conv2d(a, b, None, [1, 1], [1, 1], [1, 1], 1, 2, RULE),
                                    (xc.detach()[:1, :, :5, :5].clone().requires_grad_(), wc.detach().clone()
                                     .requires_grad_()), fast_mode=True)


def test_a_failed_build_leaves_the_torch_formulation(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("SAS_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails
    monkeypatch.setattr(host_kernels, "_state", {"lib": None, "error": None, "values_per_thread": 1 << 19})
    x = torch.randn(64, 80)
    with caplog.at_level(logging.WARNING, logger="sas_compile.runtime"):
        out = project(x, 2)
    assert "host kernels unavailable" in caplog.text
    ok, reason = host_kernels.available()
    assert not ok and "failed" in reason
    torch.testing.assert_close(out, torch.stack([x.clamp_min(0), (-x).clamp_min(0)], -1).flatten(-2), rtol=0, atol=0)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("SAS_COMPILE_HOST_KERNELS", "0")
    assert host_kernels.available() == (False, "disabled by SAS_COMPILE_HOST_KERNELS=0")
    assert host_kernels.project_m2(torch.randn(5000), torch.empty(5000, 2), -1) is None


def test_a_failed_build_leaves_no_partial_file(monkeypatch, tmp_path):
    monkeypatch.setenv("SAS_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(host_kernels, "_state", {"lib": None, "error": None, "values_per_thread": 1 << 19})
    assert not host_kernels.available()[0]
    # nothing loadable is left: only the markers that spare later processes the failing compile
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.endswith(".failed")]


def _gomp_libraries():
    with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if "libgomp" in line}


@needs_compiler
@pytest.mark.skipif(not host_kernels.torch_uses_libgomp(), reason="PyTorch here does not run on libgomp")
def test_built_with_openmp_on_pytorchs_own_runtime():
    before = _gomp_libraries()
    assert host_kernels.available()[0]
    assert host_kernels._library().sas_host_openmp() == 1
    assert _gomp_libraries() == before and len(before) == 1  # no second OpenMP runtime was loaded


def _fresh_library(monkeypatch, tmp_path):
    monkeypatch.setenv("SAS_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(host_kernels, "_state", {"lib": None, "error": None, "values_per_thread": 1 << 19})


def _check_threaded_kernels(monkeypatch):
    x = _special((6, 40, 9, 11), torch.float32, seed=5)
    g = torch.randn(6, 80, 9, 11)
    expected = _torch_formulation(monkeypatch, lambda: project(x, 2, 1))
    expected_grad = _torch_formulation(monkeypatch, lambda: sas_ops.slot_grad(g.clone(), x, 2, RULE, 1))
    out = torch.empty(6, 40, 2, 9, 11)
    assert host_kernels.project_m2(x, out, 1, check_finite=True, threads=2) is False  # x holds inf and NaN
    torch.testing.assert_close(out.flatten(1, 2), expected, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(host_kernels.slot_grad_m2(g, x, 1, threads=2), expected_grad, rtol=0, atol=0,
                               equal_nan=True)
    for layout in ((6, 40, 9, 11), (120, 40)):  # the sign pattern at M = 4: planes and groups
        x4 = _special(layout, torch.float32, seed=9)
        g4 = torch.randn(x4.shape[0], 160, *x4.shape[2:])
        out4 = torch.empty(x4.shape[0], 40, 4, *x4.shape[2:])
        assert host_kernels.project_sign(x4, out4, 1, 4, check_finite=True, threads=2) is False
        assert host_kernels.project_sign(x4.nan_to_num(), torch.empty_like(out4), 1, 4, check_finite=True,
                                         threads=2) is True
        torch.testing.assert_close(out4.flatten(1, 2), _torch_formulation(monkeypatch, lambda: project(x4, 4, 1)),
                                   rtol=0, atol=0, equal_nan=True)
        expected4 = _torch_formulation(monkeypatch, lambda: sas_ops.slot_grad(g4.clone(), x4, 4, RULE, 1))
        torch.testing.assert_close(host_kernels.slot_grad_sign(g4, x4, 1, 4, threads=2), expected4, rtol=0, atol=0)


@needs_compiler
def test_pthreads_where_pytorch_has_no_libgomp(monkeypatch, tmp_path):
    _fresh_library(monkeypatch, tmp_path)
    monkeypatch.setattr(host_kernels, "torch_uses_libgomp", lambda: False)
    assert host_kernels.available()[0]
    assert host_kernels._library().sas_host_openmp() == 0
    assert host_kernels._state["values_per_thread"] == 1 << 19
    _check_threaded_kernels(monkeypatch)


@needs_compiler
@pytest.mark.skipif(not host_kernels.torch_uses_libgomp(), reason="PyTorch here does not run on libgomp")
def test_a_failed_openmp_build_falls_back_to_pthreads(monkeypatch, tmp_path):
    _fresh_library(monkeypatch, tmp_path)
    monkeypatch.setattr(host_kernels, "OPENMP_FLAGS", [*host_kernels.OPENMP_FLAGS, "-fno-such-option-sas"])
    assert host_kernels.available()[0]
    assert host_kernels._library().sas_host_openmp() == 0
    _check_threaded_kernels(monkeypatch)
    # a later process neither retries the failed OpenMP build nor rebuilds the pthread one
    builds = []
    monkeypatch.setattr(host_kernels, "_build", lambda path, flags: builds.append(flags))
    monkeypatch.setattr(host_kernels, "_state", {"lib": None, "error": None, "values_per_thread": 1 << 19})
    assert host_kernels.available()[0] and host_kernels._library().sas_host_openmp() == 0
    assert builds == []


@needs_compiler
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("layer", ["linear", "conv", "conv_channels_last"])
def test_all_zero_weight_columns_cost_no_finiteness_pass_and_stay_exact_on_nonfinite_inputs(monkeypatch, M, layer):
    """A folded ReLU's negative slots start with all-zero weight columns. On finite inputs their
    slots may keep |x| (0 * finite = 0): the kernels' own flag says so, with no second pass over x
    (``_all_finite`` is never called). On +-inf and NaN the slots are zeroed, forward and in the
    backward's recomputed projection, giving exactly what the PyTorch formulation gives."""
    from sas_compile.runtime import projection
    from sas_compile.runtime.projection import dead_slots, expand_dense_weight

    g = torch.Generator().manual_seed(M)
    if layer == "linear":
        x = torch.randn(64, 96, dtype=torch.float64, generator=g)
        w = expand_dense_weight(torch.randn(7, 96, dtype=torch.float64, generator=g), M, fold_relu=True)

        def op(a, b):
            return torch.ops.sas.linear(a, b, None, M, RULE)

        def dense(a, b):
            return torch.nn.functional.linear(a.relu(), b)
    else:
        x = torch.randn(4, 24, 9, 8, dtype=torch.float64, generator=g)
        if layer == "conv_channels_last":
            x = x.to(memory_format=torch.channels_last)
        w = expand_dense_weight(torch.randn(5, 24, 3, 3, dtype=torch.float64, generator=g), M, fold_relu=True)

        def op(a, b):
            return torch.ops.sas.conv2d(a, b, None, [1, 1], [1, 1], [1, 1], 1, M, RULE)

        def dense(a, b):
            return torch.nn.functional.conv2d(a.relu(), b, None, 1, 1)
    dense_w = w.unflatten(1, (-1, M))[:, :, 0] if M == 2 else None
    assert dead_slots(w) is not None
    checks = []
    real_all_finite = projection._all_finite
    monkeypatch.setattr(projection, "_all_finite", lambda t: checks.append(t.shape) or real_all_finite(t))
    calls = _count_kernel_calls(monkeypatch, "project_sign", "slot_grad_sign")

    def run(inp):
        a, b = inp.clone().requires_grad_(), w.clone().requires_grad_()
        out = op(a, b)
        out.backward(torch.ones_like(out))
        return out.detach(), a.grad, b.grad

    finite = run(x)
    assert checks == [] and calls["project"] == 2  # forward and the backward's recomputation, no check
    if dense_w is not None:  # at M = 2 the even columns are the dense weight: the dense layer's output
        torch.testing.assert_close(finite[0], dense(x, dense_w), rtol=1e-12, atol=1e-12)
    expected = _torch_formulation(monkeypatch, lambda: run(x))
    for got, want in zip(finite, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    bad = x.clone()  # keeps x's memory format
    for position, value in zip((5, x.numel() // 2, x.numel() - 1), (float("inf"), float("-inf"), float("nan"))):
        bad[torch.unravel_index(torch.tensor(position), x.shape)] = value
    poisoned = run(bad)
    expected = _torch_formulation(monkeypatch, lambda: run(bad))
    for got, want in zip(poisoned, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    if dense_w is not None:
        torch.testing.assert_close(poisoned[0], dense(bad, dense_w), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.isfinite(poisoned[2][:, dead_slots(w)]).all()  # the dead columns' gradient: 0 * inf never formed


@needs_compiler
def test_project_itself_still_zeroes_the_dead_slots_of_finite_values():
    from sas_compile.runtime.projection import project_transient

    x = torch.randn(64, 96)
    dead = torch.zeros(96 * 4, dtype=torch.bool)
    dead[1::4] = True
    expected = project(x, 4, -1).view(64, 96, 4)
    expected[:, :, 1] = 0
    torch.testing.assert_close(project(x, 4, -1, RULE, dead).view(64, 96, 4), expected, rtol=0, atol=0)
    # the transient form may leave them (its one reader multiplies them by zero columns)
    torch.testing.assert_close(project_transient(x, 4, -1, RULE, dead), project(x, 4, -1), rtol=0, atol=0)
