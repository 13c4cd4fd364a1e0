"""Every CUDA kernel builds with NVRTC for sm_80/86/89/90, uses the sparse tensor cores
(HMMA.SP in the SASS) and does not spill; the cubin cache is keyed and reused."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

if not os.environ.get("CI"):  # in CI (CI=true) a missing NVRTC is a failure, not a skip
    pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (the 'cuda' extra) is not installed")

from sas_compile.runtime.cuda import compile_all, kernel_names  # noqa: E402
from sas_compile.runtime.cuda import nvrtc_build  # noqa: E402

ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


def _nvdisasm() -> str:
    try:
        import nvidia

        for root in nvidia.__path__:
            for path in Path(root).glob("*/bin/nvdisasm"):
                return str(path)
    except ImportError:
        pass
    found = shutil.which("nvdisasm")
    if not found:
        pytest.fail("nvdisasm not found: install nvidia-cuda-nvdisasm (part of the 'cuda' extra)")
    return found


def _sass_by_function(cubin: bytes, tmp_path: Path) -> dict:
    path = tmp_path / "module.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([_nvdisasm(), "-c", str(path)], capture_output=True, text=True, check=True).stdout
    functions, name = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*\.section\s+\.text\.(\w+),", line)
        if m:
            name = m.group(1)
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


@pytest.fixture(scope="module", params=ARCHS)
def built(request, tmp_path_factory):
    # the shared cache makes reruns cheap; a fresh build is exercised in test_cache_*
    return request.param, compile_all(request.param, with_logs=True)


def test_every_module_builds(built):
    arch, results = built
    assert set(results) == set(nvrtc_build.MODULES)
    for module, result in results.items():
        assert result.arch == arch
        assert result.cubin[:4] == b"\x7fELF", f"{module} for {arch} is not a cubin"


def test_every_kernel_uses_sparse_tensor_cores(built, tmp_path):
    arch, results = built
    for module, result in results.items():
        functions = _sass_by_function(result.cubin, tmp_path)
        expected = set(kernel_names(module))
        assert expected and expected <= set(functions), f"{module}/{arch}: kernels missing in the SASS"
        for name in expected:
            kind = "HMMA.SP.16816.F32.TF32" if "_f32_" in name else "HMMA.SP.16832.F32"
            assert kind in functions[name], f"{name} ({arch}) has no {kind} instruction"
            assert "HMMA.SP" in functions[name]


def test_no_register_spills(built):
    arch, results = built
    for module, result in results.items():
        entries = re.findall(r"Compiling entry function '(\w+)'", result.log)
        assert sorted(entries) == sorted(kernel_names(module)), result.log
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", result.log)
        assert len(spills) == len(entries), result.log
        assert all(s == ("0", "0") for s in spills), f"{module} ({arch}) spills:\n{result.log}"


@pytest.mark.slow
def test_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("SAS_COMPILE_CACHE", str(tmp_path))
    first = nvrtc_build.build_module("sws_gemm", "sm_80")
    files = sorted((tmp_path / "cubin").glob("sws_gemm-sm_80-*.cubin"))
    assert len(files) == 1 and files[0].read_bytes() == first.cubin
    # a second build (as from another process) reads the cached file, not NVRTC
    files[0].write_bytes(b"\x7fELF-cached")
    again = nvrtc_build.build_module("sws_gemm", "sm_80")
    assert again.cubin == b"\x7fELF-cached"
    assert again.log == first.log


def test_bad_arch_is_rejected():
    with pytest.raises(ValueError, match="or newer"):
        compile_all("sm_75")
    with pytest.raises(ValueError, match="unknown kernel module"):
        nvrtc_build.build_module("dense_gemm", "sm_80")
