"""Packaging: one `sas_compile` namespace, kernels shipped, the dynamo backend found by entry point."""
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_everything_under_one_namespace(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), ROOT], check=True, timeout=300)
    wheel = next(tmp_path.glob("sas_compile-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sas_compile"}, top
    for expected in ("sas_compile/passes/capture.py", "sas_compile/runtime/projection.py",
                     "sas_compile/runtime/cuda/spmma.cu", "sas_compile/runtime/cuda/spwgmma.cu",
                     "sas_compile/runtime/cuda/sas_compress.cu", "sas_compile/runtime/cuda/sparse_common.cuh",
                     "sas_compile/runtime/cuda/sas_ptx.cuh", "sas_compile/runtime/cuda/sas_wgmma.cuh",
                     "sas_compile/runtime/emulator/sas_emulator.hpp", "sas_compile/runtime/host_kernels.c"):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[torch_dynamo_backends]" in text and "sas = sas_compile.backend:sas_backend" in text


@pytest.mark.slow
def test_backend_found_in_a_fresh_process_without_importing_sas_compile(tmp_path):
    code = (
        "import sys, torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()\n"
        "x = torch.randn(2, 4)\n"
        "assert 'sas_compile' not in sys.modules\n"
        "with torch.no_grad():\n"
        "    out = torch.compile(m, backend='sas', options={'M': 4, 'inner': 'eager', 'explain': True})(x)\n"
        "    assert torch.allclose(out, m(x), atol=1e-6)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "converted  2 (linear)" in proc.stdout and proc.stdout.strip().endswith("ok")


@pytest.mark.parametrize("option", [{"M": 3}, {"bogus": 1}, {"inner": "tvm"}])
def test_bad_backend_options_name_the_problem(option):
    import torch

    m = torch.nn.Linear(4, 4)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info, torch.no_grad():
        torch.compile(m, backend="sas", options=option)(torch.randn(2, 4))
    assert list(option)[0] in str(info.value) or "power of two" in str(info.value)
