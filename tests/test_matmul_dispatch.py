"""sas_matmul / sws_matmul: targets, dispatch, fallbacks and errors, against float64 references."""
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch

import sas_compile.runtime.matmul as matmul
import sas_compile.runtime.execution_targets as targets_module
from sas_compile.runtime import sas_matmul, sws_matmul, targets
from sas_compile.runtime.packing import pack_sws_weight, unpack_sws_weight

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def nonzero_randn(*shape, generator, dtype=torch.float32):
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    return (x + x.sign() * 0.05).to(dtype)


def wide_by_hand(x, M):
    """The projection written from its definition, channel by channel, in float64.

    Groups of b = log2(M) neighbouring channels; pattern I = sum_j [x_(g*b+j) <= 0] 2^j over
    the channels the group has; channel c puts |x_c| in slot I at wide index c*M + I.
    """
    b = M.bit_length() - 1
    rows = x.reshape(-1, x.shape[-1]).double()
    k = rows.shape[1]
    wide = torch.zeros(rows.shape[0], k * M, dtype=torch.float64)
    for r in range(rows.shape[0]):
        for c in range(k):
            first = (c // b) * b
            pattern = sum(int(rows[r, j] <= 0) << (j - first) for j in range(first, min(first + b, k)))
            wide[r, c * M + pattern] = abs(rows[r, c])
    return wide.reshape(*x.shape[:-1], k * M)


def sas_reference(x, weight, bias, M):
    out = wide_by_hand(x, M) @ weight.double().t()
    return out if bias is None else out + bias.double()


def sparse_weight(n, k, M, generator, dtype):
    """A 1:M weight whose chunks lie inside rows (K % M == 0) or a 2:4 weight for ragged K."""
    weight = nonzero_randn(n, k, generator=generator, dtype=dtype)
    if k % M == 0 and M in (2, 4):
        keep = torch.randint(0, M, (n, k // M), generator=generator)
        mask = torch.zeros(n, k // M, M).scatter_(-1, keep.unsqueeze(-1), 1.0).reshape(n, k)
    else:
        mask = torch.zeros(n, k)
        mask[:, ::4] = 1.0  # one per aligned group of 4, last partial group included
    return weight * mask.to(dtype)


def assert_close_to(out, reference, tol):
    scale = reference.abs().max().clamp_min(1e-12)
    err = (out.double() - reference).abs().max()
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# ------------------------------------------------------------------------- cpu target


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("lead, k, n", [((3,), 7, 5), ((2, 3), 13, 4), ((), 9, 6), ((1, 1, 2), 1, 3)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sas_matmul_cpu_matches_float64_reference(M, lead, k, n, with_bias):
    g = torch.Generator().manual_seed(M * 100 + k)
    x = nonzero_randn(*lead, k, generator=g)
    weight = torch.randn(n, M * k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    out = sas_matmul(x, weight, bias, M=M, target="torch")
    assert out.shape == (*lead, n) and out.dtype == x.dtype
    assert_close_to(out, sas_reference(x, weight, bias, M), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sas_matmul_auto_on_cpu_tensors_runs_the_pytorch_formulation(dtype, caplog):
    g = torch.Generator().manual_seed(4)
    x = nonzero_randn(2, 5, 11, generator=g, dtype=dtype)
    weight = torch.randn(6, 44, generator=g).to(dtype)
    bias = torch.randn(6, generator=g).to(dtype)
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x, weight, bias, M=4)
    assert not caplog.records, "CPU tensors under 'auto' are no fallback"
    assert out.dtype == dtype
    assert_close_to(out, sas_reference(x, weight, bias, 4), TOL[dtype])


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("k", [8, 13, 37])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sws_matmul_cpu_matches_float64_reference(M, k, with_bias):
    g = torch.Generator().manual_seed(M + k)
    n = 9
    weight = sparse_weight(n, k, M, g, torch.float32)
    x = nonzero_randn(2, 3, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    out = sws_matmul(x, pack_sws_weight(weight), bias, target="torch")
    reference = x.double() @ weight.double().t()
    if bias is not None:
        reference = reference + bias.double()
    assert out.shape == (2, 3, n)
    assert_close_to(out, reference, TOL[torch.float32])


def test_sas_matmul_keeps_autograd_on_the_pytorch_formulation():
    g = torch.Generator().manual_seed(6)
    x = nonzero_randn(4, 6, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: sas_matmul(a, w, M=2), (x, weight))


# ------------------------------------------------------------------------- errors


def test_sas_matmul_errors_name_the_argument():
    x = torch.randn(2, 5)
    weight = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"weight must be the wide weight \(N, M\*K\) = \(N, 20\)"):
        sas_matmul(x, weight, M=4)
    with pytest.raises(ValueError, match="weight has dtype torch.float64 but x has torch.float32"):
        sas_matmul(x, weight.double())
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        sas_matmul(x, weight, torch.zeros(4))
    with pytest.raises(ValueError, match="bias has dtype"):
        sas_matmul(x, weight, torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="target='gpu' is not one of"):
        sas_matmul(x, weight, target="gpu")
    with pytest.raises(ValueError, match="M=3"):
        sas_matmul(x, weight, M=3)
    with pytest.raises(ValueError, match="unknown SAS index rule 'nope'"):
        sas_matmul(x, weight, rule="nope")
    with pytest.raises(ValueError, match="x must be floating point"):
        sas_matmul(x.to(torch.int64), weight)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        sas_matmul(x, weight.tolist())
    with pytest.raises(ValueError, match="target='cuda' needs CUDA tensors"):
        sas_matmul(x, weight, target="cuda")


def test_sws_matmul_errors_name_the_argument():
    packed = pack_sws_weight(torch.zeros(3, 8))
    with pytest.raises(TypeError, match="packed_weight must be a PackedSparseWeight"):
        sws_matmul(torch.randn(2, 8), torch.zeros(3, 8))
    with pytest.raises(ValueError, match=r"x has K = 7 input features but packed_weight has shape \(3, 8\)"):
        sws_matmul(torch.randn(2, 7), packed)
    with pytest.raises(ValueError, match="packed_weight.values has dtype"):
        sws_matmul(torch.randn(2, 8, dtype=torch.float64), packed)
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        sws_matmul(torch.randn(2, 8), packed, torch.zeros(8))


# ------------------------------------------------------------------------- targets()


def test_targets_reports_every_target_with_a_reason():
    status = targets(refresh=True)
    assert set(status) == {"torch", "cuda", "emulator"}
    for name, (available, reason) in status.items():
        assert isinstance(available, bool) and reason, name
        assert reason in str(status[name])
    assert status["torch"].available


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_targets_says_why_cuda_is_missing_here():
    available, reason = targets(refresh=True)["cuda"]
    assert not available
    assert len(reason) > 10
    with pytest.raises(RuntimeError, match="target='cuda' is not available"):
        # a CPU tensor is caught first, so only an unavailable target can explain this one
        matmul.select_target("sas_matmul", "cuda", SimpleNamespace(is_cuda=True))


# ------------------------------------------------------------------------- dispatch logic


class RecordingKernels:
    """Stands in for a kernel module: computes in float64 and records what it was handed."""

    def __init__(self):
        self.calls = []

    def sas_gemm(self, x2d, weight, bias, M):
        self.calls.append(("sas", x2d.shape, x2d.is_contiguous(), M))
        return sas_reference(x2d, weight, bias, M).to(x2d.dtype)

    def sws_gemm(self, x2d, packed, bias):
        self.calls.append(("sws", x2d.shape, x2d.is_contiguous(), None))
        out = x2d.double() @ unpack_sws_weight(packed).double().t()
        return (out if bias is None else out + bias.double()).to(x2d.dtype)


@pytest.fixture
def fake_emulator(monkeypatch):
    kernels = RecordingKernels()
    emulator = targets_module.get_target("emulator")
    monkeypatch.setattr(emulator, "status", lambda refresh=False: targets_module.TargetStatus(True, "fake"))
    monkeypatch.setattr(targets_module, "tf32_allowed", lambda: True)  # float32 may take the kernels
    monkeypatch.setattr(emulator, "module", lambda: kernels)
    return kernels


def test_kernel_targets_get_contiguous_2d_inputs_and_outputs_get_the_leading_dims(fake_emulator):
    g = torch.Generator().manual_seed(8)
    x = nonzero_randn(3, 11, 2, generator=g).transpose(1, 2)  # (3, 2, 11), not contiguous
    weight = torch.randn(5, 22, generator=g)
    out = sas_matmul(x, weight, M=2, target="emulator")
    assert fake_emulator.calls == [("sas", (6, 11), True, 2)]
    assert out.shape == (3, 2, 5)
    assert_close_to(out, sas_reference(x, weight, None, 2), TOL[torch.float32])

    packed = pack_sws_weight(sparse_weight(5, 11, 2, g, torch.float32))
    out = sws_matmul(x, packed, torch.randn(5, generator=g), target="emulator")
    assert fake_emulator.calls[-1] == ("sws", (6, 11), True, None)
    assert out.shape == (3, 2, 5)


@pytest.mark.parametrize(
    "M, dtype, rule, grad, reason",
    [
        (8, torch.float32, "sign_pattern", False, "M = 8 has no kernel"),
        (2, torch.float64, "sign_pattern", False, "dtype torch.float64 is not supported"),
        (2, torch.float32, "custom_rule", False, "index rule 'custom_rule' has no kernel"),
        (4, torch.float32, "sign_pattern", True, "kernels have no backward"),
    ],
)
def test_kernel_targets_fall_back_with_a_logged_reason(fake_emulator, caplog, monkeypatch, M, dtype, rule, grad, reason):
    import sas_compile.runtime.projection as projection

    monkeypatch.setitem(projection._RULES, "custom_rule", projection.SignPatternRule)
    g = torch.Generator().manual_seed(M)
    x = nonzero_randn(4, 6, generator=g, dtype=dtype).requires_grad_(grad)
    weight = torch.randn(3, 6 * M, generator=g, dtype=dtype)
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x, weight, M=M, target="emulator", rule=rule)
    assert fake_emulator.calls == []
    assert any(reason in record.getMessage() for record in caplog.records), caplog.text
    assert_close_to(out.detach(), sas_reference(x.detach(), weight, None, M), TOL[dtype])


def test_unavailable_explicit_target_raises_with_the_reason(monkeypatch):
    emulator = targets_module.get_target("emulator")
    monkeypatch.setattr(emulator, "status",
                        lambda refresh=False: targets_module.TargetStatus(False, "no host compiler (g++)"))
    with pytest.raises(RuntimeError, match=r"target='emulator' is not available on this machine: no host compiler"):
        sas_matmul(torch.randn(2, 4), torch.randn(3, 8), target="emulator")


# ------------------------------------------------------------------------- emulator target


def emulator_or_skip():
    """The emulator module; skip only when it cannot build for lack of a host compiler."""
    module = importlib.import_module("sas_compile.runtime.emulator")
    ok, reason = module.available()
    if not ok and "compiler" in reason.lower():
        pytest.skip(f"emulator unavailable: {reason}")
    assert ok, f"emulator unavailable for a reason other than the host compiler: {reason}"
    return module


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulator_target_matches_float64_reference(M, dtype, caplog, monkeypatch):
    emulator_or_skip()
    monkeypatch.setattr(targets_module, "tf32_allowed", lambda: True)  # float32 runs the tf32 kernel
    g = torch.Generator().manual_seed(M)
    x = nonzero_randn(2, 35, 13, generator=g, dtype=dtype)  # 70 rows: more than one row tile
    weight = torch.randn(7, 13 * M, generator=g).to(dtype)
    bias = torch.randn(7, generator=g).to(dtype)
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x, weight, bias, M=M, target="emulator")
    assert not caplog.records, f"the emulator call fell back: {caplog.text}"
    assert out.shape == (2, 35, 7) and out.dtype == dtype
    # float32 runs as tf32 on the tensor cores: compare at the 16-bit tolerance
    assert_close_to(out, sas_reference(x, weight, bias, M), TOL[dtype] if dtype != torch.float32 else 2e-3)

    packed = pack_sws_weight(sparse_weight(7, 13, M, g, dtype), M)
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sws_matmul(x, packed, bias, target="emulator")
    assert not caplog.records, f"the emulator call fell back: {caplog.text}"
    reference = x.double() @ unpack_sws_weight(packed).double().t() + bias.double()
    assert_close_to(out, reference, TOL[dtype] if dtype != torch.float32 else 2e-3)


@pytest.mark.parametrize("op", ["sas", "sws"])
def test_float32_takes_full_precision_unless_tf32_is_allowed(op, caplog, monkeypatch):
    """PyTorch's convention: tf32 only when its switches allow it for float32 matmuls."""
    emulator_or_skip()
    g = torch.Generator().manual_seed(11)
    x = nonzero_randn(40, 24, generator=g)
    bias = torch.randn(9, generator=g)
    if op == "sas":
        weight = torch.randn(9, 48, generator=g)
        call = lambda: sas_matmul(x, weight, bias, M=2, target="emulator")  # noqa: E731
        reference = sas_reference(x, weight, bias, 2)
    else:
        packed = pack_sws_weight(sparse_weight(9, 24, 2, g, torch.float32), 2)
        call = lambda: sws_matmul(x, packed, bias, target="emulator")  # noqa: E731
        reference = x.double() @ unpack_sws_weight(packed).double().t() + bias.double()
    assert not torch.backends.cuda.matmul.allow_tf32  # PyTorch's defaults
    torch.set_float32_matmul_precision("highest")
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        full = call()
    assert "tf32 switches are off" in caplog.text
    assert_close_to(full, reference, 1e-6)
    caplog.clear()
    try:
        torch.set_float32_matmul_precision("high")
        with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
            tf32 = call()
    finally:
        torch.set_float32_matmul_precision("highest")
    assert not caplog.records, caplog.text
    error = ((tf32.double() - reference).norm() / reference.norm()).item()
    assert 1e-6 < error < 2e-3, f"tf32 rounding expected, got relative error {error}"


def test_tf32_allowed_follows_both_of_pytorchs_precision_apis():
    """The legacy switches and the fp32_precision API (reading a legacy switch after the new
    API was used raises, so tf32_allowed must not)."""
    from sas_compile.runtime.execution_targets import tf32_allowed

    matmul = torch.backends.cuda.matmul
    assert not tf32_allowed()  # PyTorch's defaults
    try:
        torch.set_float32_matmul_precision("high")
        assert tf32_allowed()
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = True
        assert tf32_allowed()
        matmul.allow_tf32 = False
        assert not tf32_allowed()
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = "tf32"
            assert tf32_allowed()
            matmul.fp32_precision = "ieee"
            assert not tf32_allowed()
            matmul.fp32_precision = "none"  # inherits the global setting
            torch.backends.fp32_precision = "tf32"
            assert tf32_allowed()
            torch.backends.fp32_precision = "ieee"
            assert not tf32_allowed()
    finally:
        if hasattr(matmul, "fp32_precision"):
            torch.backends.fp32_precision = "none"
            matmul.fp32_precision = "none"
        torch.set_float32_matmul_precision("highest")
        matmul.allow_tf32 = False
    assert not tf32_allowed()


# ------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_target_matches_cpu_formulation_and_vendor_path(M, dtype, monkeypatch):
    from vendor_sparse import cutlass_24_available, vendor_sas_product

    from sas_compile.runtime.packing import pack_sas_activation_cutlass

    monkeypatch.setattr(targets_module, "tf32_allowed", lambda: True)  # float32 takes the tf32 kernel
    g = torch.Generator().manual_seed(30 + M)
    tol = TOL[dtype] if dtype != torch.float32 else 2e-3
    for rows, k, n in [(37, 29, 19), (128, 96, 64), (3, 200, 130)]:
        x = nonzero_randn(rows, k, generator=g, dtype=dtype).cuda()
        weight = torch.randn(n, M * k, generator=g).to(dtype).cuda()
        bias = torch.randn(n, generator=g).to(dtype).cuda()
        out = sas_matmul(x, weight, bias, M=M, target="cuda")
        reference = sas_matmul(x.double(), weight.double(), bias.double(), M=M, target="torch")
        assert_close_to(out, reference, tol)
        if dtype != torch.float32 and rows % 32 == 0 and (M * k) % 64 == 0:
            # the vendor 2:4 path of this GPU: CUTLASS on 8.x, cuSPARSELt elsewhere
            if cutlass_24_available():
                values, meta = pack_sas_activation_cutlass(x, M)
                vendor = torch._sparse_semi_structured_mm(values, meta, weight.t().contiguous()) + bias
            else:
                vendor = vendor_sas_product(x, weight, M) + bias
            assert_close_to(out, vendor.double(), 2 * tol)

        packed = pack_sws_weight(sparse_weight(n, k, M, g, dtype).cuda(), M)
        out = sws_matmul(x, packed, bias, target="cuda")
        reference = x.double() @ unpack_sws_weight(packed).double().t() + bias.double()
        assert_close_to(out, reference, tol)


@requires_cuda
@pytest.mark.gpu
def test_auto_on_cuda_tensors_falls_back_for_m8_with_a_logged_reason(caplog):
    g = torch.Generator().manual_seed(1)
    x = nonzero_randn(5, 6, generator=g).cuda()
    weight = torch.randn(3, 48, generator=g).cuda()
    with caplog.at_level(logging.INFO, logger="sas_compile.runtime"):
        out = sas_matmul(x, weight, M=8)
    assert out.is_cuda
    assert "M = 8 has no kernel" in caplog.text or "cuda target unavailable" in caplog.text
    assert_close_to(out.cpu(), sas_reference(x.cpu(), weight.cpu(), None, 8), 1e-5)


# ------------------------------------------------------------------------- benchmark script


def load_benchmark():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_matmul.py"
    spec = importlib.util.spec_from_file_location("gpu_matmul", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_benchmark_without_cuda_prints_one_line_and_succeeds(capsys):
    assert load_benchmark().main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0]


def test_gpu_benchmark_dry_run_fills_every_table_it_can(capsys, tmp_path):
    import json

    out_file = tmp_path / "bench.json"
    assert load_benchmark().main(["--dry-run-cpu", "--dtypes", "bf16", "--json", str(out_file)]) == 0
    text = capsys.readouterr().out
    assert "SAS/SWS ours" in text and "auto/proj+dense" in text and "WRONG" not in text
    result = json.loads(out_file.read_text())
    assert [r["size"] for r in result["paper"]] == [64, 128]
    for r in result["paper"]:
        assert {"dense", "sws_ours", "sas_fused", "sas_projection_dense"} <= set(r)
        assert all(r[key] > 0 for key in ("dense", "sws_ours", "sas_fused"))
    assert {(r["case"], r["M"]) for r in result["layers"]} == {(c[0], M) for c in
                                                               load_benchmark().DRY_LAYER_SHAPES for M in (2, 4)}
    for r in result["layers"]:
        assert {"dense_narrow", "dense_wide", "projection_dense", "sas_fused", "sas_auto"} <= set(r)
        assert max(r["rel_err"].values()) < 3e-2
