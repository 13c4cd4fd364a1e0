"""One prepared GPU run: the GPU tests, a float64 correctness sweep, the GEMM benchmark and
the model-level comparison, each in its own process with its own time limit.

A GPU is lent to some sessions for about 15 minutes in all, so everything the GPU must
check runs from this one command, installs nothing from a registry, and keeps what it
measured even when a section fails or runs out of time:

    python benchmarks/gpu_suite.py --out DIR             # on an NVIDIA GPU (sm_80 or newer)
    python benchmarks/gpu_suite.py --out DIR --dry-run   # the same code paths on the CPU, tiny sizes

Sections, in order (``--sections`` picks some): ``setup`` (the package importable and its
``sas`` dynamo backend registered: an offline editable install where it is not), ``env``
(GPU, driver, versions), ``tests`` (``pytest -m gpu``), ``sweep`` (every kernel and
``target="auto"`` against float64 on random ragged shapes, float16/bfloat16/float32, M = 2
and 4, SAS convolutions, float32 precision), ``kernels`` (``benchmarks/sparse_kernels.py``:
the compress kernel and every sparse GEMM variant apart, at the issue's 8192 x 4096 -> 4096
problem, against cuBLAS and the vendor 2:4 GEMM), ``matmul_fp16`` / ``matmul_bf16``
(``benchmarks/gpu_matmul.py``: the paper's sizes, LLM and ResNet im2col shapes),
``resnet18`` / ``resnet50`` (fp16, batch 64, 224x224, channels_last: dense and sasified,
eager and compiled). The suite stops starting sections when ``--budget-s`` is spent.

Writes ``DIR/summary.json`` (everything), ``DIR/summary.md`` (the tables README.md quotes)
and ``DIR/suite.log`` (every section's output), and prints the markdown summary last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
# (name, time limit on a GPU in s, time limit of the dry run in s)
SECTIONS = [
    ("setup", 90, 60),
    ("env", 30, 30),
    ("tests", 150, 120),
    ("sweep", 60, 60),
    ("kernels", 70, 60),
    ("matmul_fp16", 100, 60),
    ("resnet18", 110, 90),
    ("resnet50", 170, 90),
    ("matmul_bf16", 70, 60),
]
TARGET_RATIO = {"resnet18": 1.6, "resnet50": 1.9}  # sasified compiled / dense compiled (the GPU-path issue)


# ---------------------------------------------------------------------------- sections


def section_setup(dry: bool) -> dict:
    """The package and its dynamo backend: an offline editable install where missing."""
    from importlib import metadata

    def registered() -> bool:
        return any(ep.name == "sas" for ep in metadata.entry_points(group="torch_dynamo_backends"))

    result = {"status": "ok", "installed_before": registered()}
    if not result["installed_before"] and not dry:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
               "--disable-pip-version-check", "-q", "-e", str(ROOT)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        result["install_rc"] = proc.returncode
    proc = subprocess.run([sys.executable, "-c", "import sas_compile.runtime, sas_compile.passes; "
                           "from importlib import metadata; "
                           "print(any(e.name == 'sas' for e in metadata.entry_points(group='torch_dynamo_backends')))"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    result["importable_outside_checkout"] = proc.returncode == 0
    result["backend_registered"] = proc.stdout.strip() == "True"
    if not (result["importable_outside_checkout"] and result["backend_registered"]):
        result["status"] = "failed"
        result["detail"] = (proc.stderr or proc.stdout)[-2000:]
    return result


def section_env(dry: bool) -> dict:
    import torch

    from importlib import metadata

    from sas_compile.runtime import targets

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    info = {
        "status": "ok",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "cuda-bindings": version("cuda-bindings"),
        "nvidia-cuda-nvrtc": version("nvidia-cuda-nvrtc") if version("nvidia-cuda-nvrtc") != "not installed"
        else version("nvidia-cuda-nvrtc-cu12"),
        "targets": {name: str(status) for name, status in targets().items()},
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        info["commit"] = "unknown"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability="sm_%d%d" % (props.major, props.minor),
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version(),
                    cusparselt=getattr(torch.backends, "cusparselt", None) is not None
                    and torch.backends.cusparselt.is_available())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            info["driver"] = "nvidia-smi unavailable"
    else:
        info["device"] = "cpu (dry run)" if dry else "no CUDA device"
    return info


def section_tests(dry: bool) -> dict:
    """``pytest -m gpu`` over the suite; counts and every failure from the junit report."""
    import xml.etree.ElementTree as ET

    junit = Path(tempfile.mkdtemp()) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "tests", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "-o", "addopts="]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    print(proc.stdout[-20000:], proc.stderr[-5000:])
    result = {"status": "ok", "returncode": proc.returncode, "command": " ".join(cmd[1:])}
    if not junit.exists():
        return {**result, "status": "failed", "detail": "pytest wrote no junit report"}
    totals = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failures, skips = [], {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                failures.append({"test": name, "message": (child.get("message") or "")[:400]})
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "")[:200]
                skips[reason] = skips.get(reason, 0) + 1
        totals[outcome] += 1
    result.update(totals=totals, failures=failures, skip_reasons=skips)
    if totals["failed"] or totals["error"] or proc.returncode not in (0, 5):
        result["status"] = "failed"
    return result


def _poison_allocator(torch) -> None:
    """Fill freed CUDA memory with NaN so an output element the kernel never writes shows up."""
    if torch.cuda.is_available():
        torch.full((1 << 26,), float("nan"), device="cuda")
        torch.cuda.synchronize()


def section_sweep(dry: bool) -> dict:
    """Every kernel and target='auto' against float64 on random ragged shapes."""
    import torch
    import torch.nn.functional as F

    from sas_compile.runtime import autotune, sas_matmul, sas_ops, sas_transposed, sws_matmul  # noqa: F401 (ops)
    from sas_compile.runtime import execution_targets  # its tf32 switch: the kernels' float32 path
    from sas_compile.runtime.packing import pack_sws_weight, unpack_sws_weight
    from sas_compile.runtime.projection import expand_transposed_weight, project

    device = "cpu" if dry else "cuda"
    kernel_target = "emulator" if dry else "cuda"
    shapes = [(3, 5, 7), (37, 45, 29)] if dry else [(3, 5, 7), (37, 45, 29), (257, 130, 515), (1000, 256, 300),
                                                    (2048, 384, 1536), (4097, 1000, 77)]
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 2e-3}
    cases, worst = [], {}
    g = torch.Generator().manual_seed(2024)

    def record(kind, dtype, M, shape, method, out, ref, tol):
        err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
        ok = bool(err <= tol and torch.isfinite(out).all())
        cases.append({"op": kind, "dtype": str(dtype).replace("torch.", ""), "M": M, "shape": shape,
                      "method": method, "rel_err": err, "ok": ok})
        key = f"{kind} {method} {str(dtype).replace('torch.', '')} M={M}"
        worst[key] = max(worst.get(key, 0.0), err)

    def rounded(t):
        if t.dtype == torch.float32:  # the tensor core reads tf32 (round to nearest, ties away)
            bits = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
            mag = ((bits & 0x7FFFFFFF) + 0x1000) & 0x7FFFE000
            out = (bits & 0x80000000) | mag
            return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32).view(torch.float32).double()
        return t.double()

    saved_tf32 = execution_targets.tf32_allowed
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for M in (2, 4):
            for R, K, N in shapes:
                x = (torch.randn(R, K, generator=g) + 0.01).to(dtype)
                w = torch.randn(N, M * K, generator=g).to(dtype)
                b = torch.randn(N, generator=g).to(dtype)
                xd, wd, bd = x.to(device), w.to(device), b.to(device)
                exact = F.linear(project(x.double(), M), w.double(), b.double())
                tf32_ref = F.linear(project(rounded(x), M), rounded(w), b.double())
                execution_targets.tf32_allowed = lambda: True  # the kernel itself, float32 as tf32
                try:
                    _poison_allocator(torch)
                    out = sas_matmul(xd, wd, bd, M=M, target=kernel_target)
                finally:
                    execution_targets.tf32_allowed = saved_tf32
                record("sas", dtype, M, (R, K, N), "kernel", out, tf32_ref if dtype == torch.float32 else exact,
                       tolerance[dtype])
                _poison_allocator(torch)
                out = sas_matmul(xd, wd, bd, M=M, target="auto")
                # float32 under PyTorch's default precision: full precision
                record("sas", dtype, M, (R, K, N), "auto", out, exact, 1e-5 if dtype == torch.float32 else tolerance[dtype])
                dense_w = torch.zeros(N, K)
                keep = torch.randint(0, M, (N, (K + M - 1) // M), generator=g)
                cols = (torch.arange(0, K, M).unsqueeze(0) + keep).clamp_max(K - 1)
                dense_w.scatter_(1, cols, torch.randn(N, cols.shape[1], generator=g) + 0.1)
                dense_w = dense_w.to(dtype)
                packed = pack_sws_weight(dense_w).to(device)
                ref = x.double() @ unpack_sws_weight(pack_sws_weight(dense_w)).double().t() + b.double()
                ref32 = rounded(x) @ rounded(dense_w).t() + b.double()
                execution_targets.tf32_allowed = lambda: True
                try:
                    _poison_allocator(torch)
                    out = sws_matmul(xd, packed, bd, target=kernel_target)
                finally:
                    execution_targets.tf32_allowed = saved_tf32
                record("sws", dtype, M, (R, K, N), "kernel", out, ref32 if dtype == torch.float32 else ref,
                       tolerance[dtype])
                out = sws_matmul(xd, packed, bd, target="auto")
                record("sws", dtype, M, (R, K, N), "auto", out, ref, 1e-5 if dtype == torch.float32 else tolerance[dtype])
    # SAS convolutions through the op (cuDNN / autotuned path on a GPU)
    for dtype in (torch.float16, torch.float32):
        for M in (2, 4):
            for (n, c, h, w), (co, k, stride, pad) in [((4, 16, 15, 13), (24, 3, 1, 1)), ((2, 12, 9, 9), (8, 3, 2, 1))]:
                x = torch.randn(n, c, h, w, generator=g).to(dtype)
                weight = (torch.randn(co, M * c, k, k, generator=g) / (M * c * k * k) ** 0.5).to(dtype)
                ref = F.conv2d(project(x.double(), M, 1), weight.double(), None, stride, pad)
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                    out = torch.ops.sas.conv2d(x.to(device).contiguous(memory_format=torch.channels_last),
                                               weight.to(device), None, [stride] * 2, [pad] * 2, [1, 1], 1, M,
                                               "sign_pattern")
                record("sas_conv2d", dtype, M, (n, c, h, w, co, k), "op", out, ref,
                       1e-5 if dtype == torch.float32 else tolerance[dtype])
    # conv3d (the same op on a 5-D weight) and transposed convolutions: projection + cuDNN
    for dtype in (torch.float16, torch.float32):
        for M in (2, 4):
            tol = 1e-5 if dtype == torch.float32 else tolerance[dtype]
            x = torch.randn(2, 6, 5, 7, 6, generator=g).to(dtype)
            weight = (torch.randn(5, M * 6, 3, 3, 3, generator=g) / (M * 6 * 27) ** 0.5).to(dtype)
            ref = F.conv3d(project(x.double(), M, 1), weight.double(), None, [1, 2, 1], 1)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                out = torch.ops.sas.conv2d(x.to(device), weight.to(device), None, [1, 2, 1], [1, 1, 1], [1, 1, 1], 1,
                                           M, "sign_pattern")
            record("sas_conv3d", dtype, M, tuple(x.shape), "op", out, ref, tol)
            x = torch.randn(2, 6, 7, 5, generator=g).to(dtype)
            dense = torch.randn(6, 4, 3, 3, generator=g) / 54 ** 0.5
            wide = expand_transposed_weight(dense, M).to(dtype)
            ref = F.conv_transpose2d(project(x.double(), M, 1), wide.double(), None, 2, 1, 1)
            with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
                out = torch.ops.sas.conv_transpose(x.to(device), wide.to(device), None, [2, 2], [1, 1], [1, 1],
                                                   [1, 1], 1, M, "sign_pattern")
            record("sas_conv_transpose2d", dtype, M, tuple(x.shape), "op", out, ref, tol)
    failed = [c for c in cases if not c["ok"]]
    return {"status": "ok" if not failed else "failed", "cases": len(cases), "failed": failed,
            "worst_rel_err": worst, "autotune": [d.describe() for d in autotune.decisions()]}


def section_matmul(dry: bool, dtype: str) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_matmul

    out = Path(tempfile.mkdtemp()) / "matmul.json"
    argv = ["--dtypes", dtype, "--json", str(out)]
    if dry:
        argv.append("--dry-run-cpu")
    if dtype == "bf16":
        argv += ["--tables", "layers"]  # the paper's figure runs in fp16
    rc = gpu_matmul.main(argv)
    if not out.exists():
        return {"status": "failed", "detail": f"gpu_matmul.main returned {rc} and wrote nothing"}
    data = json.loads(out.read_text())
    from sas_compile.runtime import autotune

    data["autotune"] = [d.describe() for d in autotune.decisions()]
    wrong = [r for r in data["paper"] + data["layers"] if any(v != v or v > 3e-2 for v in r["rel_err"].values())]
    return {"status": "ok" if not wrong else "failed", **data, "wrong": wrong}


def section_kernels(dry: bool) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sparse_kernels

    out = Path(tempfile.mkdtemp()) / "kernels.json"
    # the dry run: one dtype and M (both GEMM families, every tile) keeps CI short
    argv = ["--json", str(out)] + (["--dry-run-cpu", "--dtypes", "fp16", "--Ms", "2"] if dry else [])
    rc = sparse_kernels.main(argv)
    if not out.exists():
        return {"status": "failed", "detail": f"sparse_kernels.main returned {rc} and wrote nothing"}
    data = json.loads(out.read_text())
    wrong = [r for r in data["rows"] if r["rel_err"] is not None and not r["rel_err"] <= 1e-2]
    ours = {r["method"] for r in data["rows"]}
    missing = [] if any(m.startswith("gemm ") for m in ours) and "compress" in ours else ["no kernel row"]
    return {"status": "ok" if not wrong and not missing else "failed", **data, "wrong": wrong}


def _time_ms(torch, fn: Callable[[], object], iters: int, cuda: bool) -> List[float]:
    from sas_compile.runtime.autotune import time_ms

    return time_ms(fn, "cuda" if cuda else "cpu", warmup=2, repeats=iters)


def section_model(dry: bool, name: str) -> dict:
    """Dense vs sasified, eager and compiled; checked against the dense output first."""
    import torch

    import sas_compile
    from sas_compile.backend import sas_backend
    from sas_compile.models import resnet18, resnet50
    from sas_compile.runtime import autotune

    cuda = not dry
    if dry:
        dense = (resnet18 if name == "resnet18" else resnet50)(num_classes=10, cifar=True, width=8)
        x = torch.randn(2, 3, 32, 32)
        dtype, iters, inner = torch.float32, 2, "eager"
    else:
        dense = resnet18(num_classes=1000, cifar=False) if name == "resnet18" else resnet50()
        x = torch.randn(64, 3, 224, 224)
        dtype, iters, inner = torch.float16, 10, "inductor"
    torch.manual_seed(0)
    dense = dense.eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the check means something
        for module in dense.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    device = "cuda" if cuda else "cpu"
    dense = dense.to(device, dtype).to(memory_format=torch.channels_last)
    x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
    sas = sas_compile.sasify(dense, M=2).eval()
    result = {"status": "ok", "model": name, "batch": x.shape[0], "input": list(x.shape[1:]),
              "dtype": str(dtype).replace("torch.", ""), "inner": inner, "times_ms": {}, "compile_s": {}}
    with torch.no_grad():
        ref = dense(x).double()
        out = sas(x).double()
        result["sas_vs_dense_rel_err"] = ((out - ref).norm() / ref.norm()).item()
        runs: Dict[str, Callable[[], object]] = {"dense eager": lambda: dense(x), "sas eager": lambda: sas(x)}
        compiled = {
            "dense compiled": torch.compile(dense, backend="eager" if dry else "inductor"),
            "sas compiled (backend sas)": torch.compile(sas, backend=lambda gm, inputs: sas_backend(
                gm, inputs, options={"inner": inner})),
        }
        for label, model in compiled.items():
            began = time.perf_counter()
            got = model(x).double()
            if cuda:
                torch.cuda.synchronize()
            result["compile_s"][label] = round(time.perf_counter() - began, 2)
            result[f"{label} rel_err"] = ((got - ref).norm() / ref.norm()).item()
            runs[label] = lambda model=model: model(x)
        for label, fn in runs.items():
            samples = _time_ms(torch, fn, iters, cuda)
            result["times_ms"][label] = {"median": statistics.median(samples), "min": min(samples),
                                         "max": max(samples)}
    t = {k: v["median"] for k, v in result["times_ms"].items()}
    result["sas/dense eager"] = t["sas eager"] / t["dense eager"]
    result["sas/dense compiled"] = t["sas compiled (backend sas)"] / t["dense compiled"]
    result["target sas/dense compiled"] = TARGET_RATIO.get(name)
    result["autotune"] = [d.describe() for d in autotune.decisions()]
    tol = 5e-2 if dtype == torch.float16 else 1e-4
    bad = {k: v for k, v in result.items() if k.endswith("rel_err") and not v <= tol}
    if bad:
        result["status"] = "failed"
        result["detail"] = f"outputs disagree with the dense model: {bad}"
    return result


def _backend_stub(work: Path) -> Path:
    """A site folder whose dist-info registers ``backend="sas"`` (when no install could)."""
    site = work / "site"
    info = site / "sas_compile_checkout-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: sas-compile-checkout\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text("[torch_dynamo_backends]\nsas = sas_compile.backend:sas_backend\n")
    return site


def run_section(name: str, dry: bool) -> dict:
    if name == "setup":
        return section_setup(dry)
    if name == "env":
        return section_env(dry)
    if name == "tests":
        return section_tests(dry)
    if name == "sweep":
        return section_sweep(dry)
    if name == "kernels":
        return section_kernels(dry)
    if name.startswith("matmul_"):
        return section_matmul(dry, name.split("_", 1)[1])
    if name in ("resnet18", "resnet50"):
        return section_model(dry, name)
    raise ValueError(f"unknown section {name!r}")


# ---------------------------------------------------------------------------- report


def _fmt(value, spec=".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    lines = ["# sas-compile GPU suite", ""]
    env = summary["sections"].get("env", {})
    lines.append(f"{env.get('device', '?')} ({env.get('capability', '?')}), driver {env.get('driver', '?')}, "
                 f"torch {env.get('torch', '?')} (CUDA {env.get('torch_cuda', '?')}), cuda-bindings "
                 f"{env.get('cuda-bindings', '?')}, {env.get('date_utc', '?')} UTC, commit {env.get('commit', '?')}"
                 f"{' - DRY RUN on the CPU' if summary['dry_run'] else ''}")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    for name, sec in summary["sections"].items():
        lines.append(f"| {name} | {sec.get('status')} | {sec.get('seconds', 0):.0f} |")
    tests = summary["sections"].get("tests", {})
    if "totals" in tests:
        tot = tests["totals"]
        lines += ["", f"GPU tests (`{tests.get('command')}`): {tot['passed']} passed, {tot['failed']} failed, "
                      f"{tot['error']} errors, {tot['skipped']} skipped"]
        for f in tests.get("failures", [])[:30]:
            lines.append(f"- FAILED {f['test']}: {f['message'][:200]}")
        for reason, count in list(tests.get("skip_reasons", {}).items())[:8]:
            lines.append(f"- skipped {count}: {reason[:160]}")
    sweep = summary["sections"].get("sweep", {})
    if "worst_rel_err" in sweep:
        lines += ["", f"Correctness sweep: {sweep['cases']} cases against float64, {len(sweep['failed'])} failed",
                  "", "| op, path, dtype, M | worst relative error |", "|---|---|"]
        lines += [f"| {k} | {v:.2e} |" for k, v in sorted(sweep["worst_rel_err"].items())]
    kernels = summary["sections"].get("kernels", {})
    if kernels.get("rows"):
        lines += ["", f"### kernels ({kernels.get('device')}, {kernels.get('arch')})", "",
                  "| op | dtype | M | method | ms | rel err vs float64 |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['op']} | {r['dtype']} | {r['M']} | {r['method']} | {r['ms']:.3f} | "
                  f"{'-' if r['rel_err'] is None else format(r['rel_err'], '.1e')} |" for r in kernels["rows"]]
    for name in ("matmul_fp16", "matmul_bf16"):
        sec = summary["sections"].get(name, {})
        if sec.get("table"):
            lines += ["", f"### {name}", ""] + sec["table"]
    models = [summary["sections"][n] for n in ("resnet18", "resnet50") if "times_ms" in summary["sections"].get(n, {})]
    if models:
        lines += ["", "| model | batch, input, dtype | dense eager ms | sas eager ms | dense compiled ms | "
                      "sas compiled ms | sas/dense eager | sas/dense compiled | target | sas vs dense rel err |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for m in models:
            t = {k: v["median"] for k, v in m["times_ms"].items()}
            lines.append(f"| {m['model']} | {m['batch']}, {'x'.join(map(str, m['input']))}, {m['dtype']} | "
                         f"{t['dense eager']:.2f} | {t['sas eager']:.2f} | {t['dense compiled']:.2f} | "
                         f"{t['sas compiled (backend sas)']:.2f} | {m['sas/dense eager']:.2f} | "
                         f"{m['sas/dense compiled']:.2f} | {_fmt(m['target sas/dense compiled'], '.1f')} | "
                         f"{m['sas_vs_dense_rel_err']:.1e} |")
    for name, sec in summary["sections"].items():
        if sec.get("status") not in ("ok",) and sec.get("detail"):
            lines += ["", f"{name}: {str(sec['detail'])[:1500]}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for summary.json, summary.md and suite.log")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at tiny sizes")
    parser.add_argument("--sections", nargs="+", choices=[s[0] for s in SECTIONS], help="run only these")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--section", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.section:  # a child process: one section, its result as JSON
        began = time.perf_counter()
        try:
            result = run_section(args.section, args.dry_run)
        except Exception:  # noqa: BLE001 - the suite records any failure and goes on
            result = {"status": "failed", "detail": traceback.format_exc()[-4000:]}
        result["seconds"] = time.perf_counter() - began
        Path(args.result).write_text(json.dumps(result, indent=1, default=str))
        return 0

    if not args.out:
        parser.error("--out DIR is required")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sas_gpu_suite_"))
    log = open(out / "suite.log", "w")
    began = time.perf_counter()
    summary = {"dry_run": args.dry_run, "sections": {}}
    # the checkout is importable in every section (sas_compile maps passes/ and runtime/ itself)
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even where a GPU is visible
    for name, limit, dry_limit in SECTIONS:
        if args.sections and name not in args.sections:
            continue
        left = args.budget_s - (time.perf_counter() - began)
        if left < 15:
            summary["sections"][name] = {"status": "not run: suite budget spent", "seconds": 0}
            continue
        timeout = min(dry_limit if args.dry_run else limit, left)
        result_file = work / f"{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--result", str(result_file)]
        if args.dry_run:
            cmd.append("--dry-run")
        print(f"[suite] {name} (limit {timeout:.0f} s)", flush=True)
        log.write(f"\n===== {name} (limit {timeout:.0f} s)\n")
        log.flush()
        started = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        if result_file.exists():
            result = json.loads(result_file.read_text())
        else:
            result = {"status": "failed" if code != "timeout" else f"timed out after {timeout:.0f} s",
                      "detail": f"the section process ended with {code} and wrote no result"}
        result["seconds"] = time.perf_counter() - started
        if name == "setup" and not result.get("backend_registered"):
            env["PYTHONPATH"] = os.pathsep.join([str(_backend_stub(work)), env["PYTHONPATH"]])
            result["fallback"] = "registered the 'sas' dynamo backend through a dist-info on PYTHONPATH"
        summary["sections"][name] = result
        print(f"[suite] {name}: {result['status']} in {result['seconds']:.0f} s", flush=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    log.close()
    summary["total_seconds"] = time.perf_counter() - began
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    print(text)
    return 0 if all(s.get("status") == "ok" for s in summary["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
