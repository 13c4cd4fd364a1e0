"""Every CUDA kernel builds with NVRTC for sm_80/86/89/90 (the wgmma module for sm_90a),
the GEMMs use the sparse tensor cores (HMMA.SP / HGMMA.SP in the SASS), nothing spills;
the cubin cache is keyed and reused."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI (CI=true) a missing NVRTC is a failure, not a skip
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (the 'cuda' extra) is not installed")

from sas_compile.runtime.cuda import compile_all, kernel_names  # noqa: E402
from sas_compile.runtime.cuda import nvrtc_build, static_facts  # noqa: E402

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def _sass_by_function(cubin: bytes, tmp_path: Path) -> dict:
    return {k: "\n".join(v) for k, v in static_facts.sass_by_function(cubin).items()}


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    # the shared cache makes reruns cheap; a fresh build is exercised in test_cache_*
    return request.param, compile_all(request.param, with_logs=True)


def test_every_module_builds(built):
    arch, results = built
    expected = set(nvrtc_build.MODULES) if arch == "sm_90" else set(nvrtc_build.MODULES) - {"spwgmma"}
    assert set(results) == expected
    for module, result in results.items():
        assert result.arch == (arch + "a" if module == "spwgmma" else arch)
        assert result.cubin[:4] == b"\x7fELF", f"{module} for {arch} is not a cubin"


def test_every_gemm_uses_sparse_tensor_cores(built, tmp_path):
    arch, results = built
    for module, result in results.items():
        functions = _sass_by_function(result.cubin, tmp_path)
        expected = set(kernel_names(module))
        assert expected and expected <= set(functions), f"{module}/{arch}: kernels missing in the SASS"
        for name in expected:
            if module == "sas_compress":
                assert "MMA" not in functions[name], name
                continue
            if module == "spwgmma":
                n = name.split("_")[2].split("x")[1]
                kind = f"HGMMA.SP.64x{n}x32.F32" + (".BF16" if "_bf16_" in name else "")
            else:
                kind = "HMMA.SP.16816.F32.TF32" if "_f32_" in name else "HMMA.SP.16832.F32"
            assert kind in functions[name], f"{name} ({arch}) has no {kind} instruction"
            assert "LDSM" in functions[name] or module != "spmma", f"{name}: operands not loaded by ldmatrix"


def test_no_register_spills(built):
    arch, results = built
    for module, result in results.items():
        assert "serialized" not in result.log, result.log  # ptxas C7514/C7515: wgmma pipeline lost
        entries = re.findall(r"Compiling entry function '(\w+)'", result.log)
        assert sorted(entries) == sorted(kernel_names(module)), result.log
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.log)
        assert len(spills) == len(entries), result.log
        assert all(s == ("0", "0") for s in spills), f"{module} ({arch}) spills:\n{result.log}"


@pytest.mark.slow
def test_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SAS_COMPILE_CACHE", str(tmp_path))
    first = nvrtc_build.build_module("sas_compress", "sm_80")
    files = sorted((tmp_path / "cubin").glob("sas_compress-sm_80-*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first.cubin
    # a second build (as from another process) reads the cached file, not NVRTC
    files[0].write_bytes(b"\x7fELF-cached")
    again = nvrtc_build.build_module("sas_compress", "sm_80")
    assert again.cubin == b"\x7fELF-cached"
    assert again.log == first.log


def test_cache_key_covers_every_kernel_source(tmp_path, monkeypatch):
    """Editing any .cu / .cuh of the folder (including the shared headers) changes the key."""
    sources = sorted(p.name for p in nvrtc_build.KERNEL_DIR.glob("*.cu*"))
    assert {"sparse_common.cuh", "sas_ptx.cuh", "sas_wgmma.cuh", "sas_compress.cu", "spmma.cu",
            "spwgmma.cu"} <= set(sources)
    copy = tmp_path / "kernels"
    copy.mkdir()
    for name in sources:
        (copy / name).write_bytes((nvrtc_build.KERNEL_DIR / name).read_bytes())
    monkeypatch.setattr(nvrtc_build, "KERNEL_DIR", copy)
    base = nvrtc_build.source_hash()
    for name in sources:
        original = (copy / name).read_bytes()
        (copy / name).write_bytes(original + b"\n// edited\n")
        assert nvrtc_build.source_hash() != base, name
        (copy / name).write_bytes(original)
    assert nvrtc_build.source_hash() == base


def test_bad_arch_is_rejected():
    with pytest.raises(ValueError, match="or newer"):
        compile_all("sm_75")
    with pytest.raises(ValueError, match="unknown kernel module"):
        nvrtc_build.build_module("dense_gemm", "sm_80")
    with pytest.raises(ValueError, match="runs only on"):
        nvrtc_build.build_module("spwgmma", "sm_80")
