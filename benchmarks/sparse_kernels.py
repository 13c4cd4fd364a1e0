"""The sparse kernels on their own, on one GPU, in a few minutes: correctness, then times.

For the issue's problem (x [8192, 4096], N = 4096; M = 2 and 4; float16 and bfloat16) and
an SWS 1:2 weight of the same mults: every kernel variant this GPU can run, each first
checked against a float64 reference (outputs poisoned with NaN first), then timed with CUDA
events (median of interleaved runs, like gpu_matmul.py):

* ``compress``: sas_compress alone (x -> compressed S(x));
* ``gemm <family> <tile>``: the sparse GEMM on the pre-compressed S(x) for every family
  (mma.sp ``spmma``; on sm_90 also wgmma.mma_async.sp ``spwgmma``) and tile;
* ``sas_gemm``: what ``sas_matmul(target="cuda")`` runs (compress + the chosen GEMM);
* cuBLAS dense narrow (the same mults) and wide, and PyTorch's 2:4 GEMM (cuSPARSELt on sm_90)
  on a pre-compressed S(x), where available.

    python benchmarks/sparse_kernels.py                  # on a GPU (sm_80+)
    python benchmarks/sparse_kernels.py --dry-run-cpu    # the same code paths, tiny, in the emulator

Its numbers are the first measured figures of these kernels; nothing here is measured on
the CPU (the dry run's times are the emulator's and mean nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--R", type=int, default=8192)
    parser.add_argument("--K", type=int, default=4096)
    parser.add_argument("--N", type=int, default=4096)
    parser.add_argument("--Ms", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes through the emulator on the CPU")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        args.R, args.K, args.N, args.repeats = 70, 40, 72, 2
    return args


class Runner:
    """Runs plans on the GPU (CUDA target) or in the emulator, and times callables."""

    def __init__(self, dry: bool):
        self.dry = dry
        if dry:
            from sas_compile.runtime import emulator

            self.run_plan = emulator.run
            self.arch = "sm_90"  # the emulator runs both GEMM families
        else:
            from sas_compile.runtime import cuda

            self.run_plan = cuda.run_plan
            major, minor = torch.cuda.get_device_capability()
            self.arch = f"sm_{major}{minor}"

    def time_ms(self, methods: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
        for fn in methods.values():
            fn()
        samples: Dict[str, List[float]] = {name: [] for name in methods}
        for _ in range(repeats):
            for name, fn in methods.items():
                if self.dry:
                    began = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - began) * 1e3)
                else:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    samples[name].append(start.elapsed_time(end))
        return {name: statistics.median(v) for name, v in samples.items()}


def _poison(out: torch.Tensor) -> None:
    out.fill_(float("nan"))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def sas_rows(args, runner: Runner, dtype, M) -> List[dict]:
    from sas_compile.runtime.cuda import kernel_params as kp
    from sas_compile.runtime.projection import project

    device = "cpu" if runner.dry else "cuda"
    g = torch.Generator().manual_seed(M)
    x = torch.randn(args.R, args.K, generator=g).to(dtype)
    w = (torch.randn(args.N, M * args.K, generator=g) / (M * args.K) ** 0.5).to(dtype)
    rows = slice(0, min(args.R, 256))  # the float64 reference on a slice of the rows
    ref = project(x[rows].double(), M) @ w.double().T
    xd, wd = x.to(device), w.to(device)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    methods: Dict[str, Callable[[], object]] = {}
    errors: Dict[str, float] = {}

    variants = [("spmma", t) for t in kp.MMA_TILES]
    if runner.arch == "sm_90":
        variants += [("spwgmma", t) for t in kp.WGMMA_TILES]
    compress_plan = None
    for family, tile in variants:
        try:
            plan = kp.prepare_sas(xd, wd, None, M, tile=tile, arch="sm_90" if family == "spwgmma" else "sm_80")
            if not plan.gemm.kernel.startswith(family):
                continue
            if kp.GEMM_SMEM[(family, tile)] > kp.SMEM_OPTIN.get(runner.arch, 1 << 30):
                continue
        except ValueError as error:
            print(f"  {family} {tile}: not run ({error})")
            continue
        compress = kp.Plan(plan.launches[:1], plan.extras["operand"].vals)
        gemm = kp.Plan(plan.launches[1:], plan.out)
        runner.run_plan(compress)
        _poison(plan.out)
        out = runner.run_plan(gemm)
        name = f"gemm {family} {tile}"
        errors[name] = _rel_err(out[rows], ref)
        if errors[name] > tol or not torch.isfinite(out).all():
            print(f"  {name}: WRONG (relative error {errors[name]:.2e}); not timed")
            continue
        methods[name] = (lambda gemm=gemm: runner.run_plan(gemm))
        compress_plan = compress
    if compress_plan is not None:
        methods["compress"] = lambda: runner.run_plan(compress_plan)
    from sas_compile.runtime import matmul

    out = matmul.sas_matmul(xd, wd, M=M, target="emulator" if runner.dry else "cuda")
    errors["sas_gemm"] = _rel_err(out[rows], ref)
    if errors["sas_gemm"] <= tol:
        methods["sas_gemm"] = lambda: matmul.sas_matmul(xd, wd, M=M, target="emulator" if runner.dry else "cuda")
    if not runner.dry:
        w_narrow = torch.randn(args.N, args.K, device=device, dtype=dtype)
        wide_x = project(xd, M)
        methods["cuBLAS dense narrow"] = lambda: F.linear(xd, w_narrow)
        methods["cuBLAS dense wide (pre-projected)"] = lambda: F.linear(wide_x, wd)
        ok, why = matmul.vendor_24_status(xd)
        if ok:
            from torch.sparse import to_sparse_semi_structured

            try:
                semi = to_sparse_semi_structured(wide_x)
                methods[f"{why} 2:4 pre-compressed"] = lambda: torch.mm(semi, wd.t())
            except Exception as error:  # noqa: BLE001 - a shape the vendor kernel refuses
                print(f"  vendor 2:4: not run ({type(error).__name__}: {error})")
    times = runner.time_ms(methods, args.repeats)
    return [{"op": "sas", "dtype": str(dtype).replace("torch.", ""), "M": M, "method": k, "ms": v,
             "rel_err": errors.get(k)} for k, v in times.items()]


def sws_rows(args, runner: Runner, dtype) -> List[dict]:
    from sas_compile.runtime.cuda import kernel_params as kp
    from sas_compile.runtime.packing import pack_sws_weight

    device = "cpu" if runner.dry else "cuda"
    g = torch.Generator().manual_seed(3)
    K = 2 * args.K  # 1:2 over twice the features: the mults of the SAS M = 2 product
    dense = torch.randn(args.N, K, generator=g) / K ** 0.5
    keep = torch.zeros(args.N, K // 2, 2).scatter_(-1, torch.randint(0, 2, (args.N, K // 2, 1), generator=g), 1.0)
    dense = (dense * keep.reshape(args.N, K)).to(dtype)
    x = torch.randn(args.R, K, generator=g).to(dtype)
    rows = slice(0, min(args.R, 256))
    ref = x[rows].double() @ dense.double().T
    packed = pack_sws_weight(dense).to(device)
    xd = x.to(device)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    methods, errors = {}, {}
    variants = [("spmma", t) for t in kp.MMA_TILES]
    if runner.arch == "sm_90":
        variants += [("spwgmma", t) for t in kp.WGMMA_TILES]
    for family, tile in variants:
        if kp.GEMM_SMEM[(family, tile)] > kp.SMEM_OPTIN.get(runner.arch, 1 << 30):
            continue
        plan = kp.prepare_sws(xd, packed, None, tile=tile, arch="sm_90" if family == "spwgmma" else "sm_80")
        if not plan.gemm.kernel.startswith(family):
            continue
        _poison(plan.out)
        out = runner.run_plan(plan)
        name = f"sws {family} {tile}"
        errors[name] = _rel_err(out[rows], ref)
        if errors[name] > tol or not torch.isfinite(out).all():
            print(f"  {name}: WRONG (relative error {errors[name]:.2e}); not timed")
            continue
        methods[name] = (lambda plan=plan: runner.run_plan(plan))
    times = runner.time_ms(methods, args.repeats)
    return [{"op": "sws", "dtype": str(dtype).replace("torch.", ""), "M": 2, "method": k, "ms": v,
             "rel_err": errors.get(k)} for k, v in times.items()]


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print("sparse_kernels: no CUDA device (use --dry-run-cpu to check the script on the CPU)")
        return 0
    runner = Runner(args.dry_run_cpu)
    where = "the emulator (dry run: times mean nothing)" if runner.dry else torch.cuda.get_device_name()
    print(f"sparse_kernels: R={args.R} K={args.K} N={args.N} on {where} ({runner.arch})")
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16}
    rows: List[dict] = []
    for name in args.dtypes:
        for M in args.Ms:
            rows += sas_rows(args, runner, dtypes[name], M)
        rows += sws_rows(args, runner, dtypes[name])
    from tabulate import tabulate

    print(tabulate([[r["op"], r["dtype"], r["M"], r["method"], f"{r['ms']:.3f}",
                     "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"] for r in rows],
                   headers=["op", "dtype", "M", "method", "ms (median)", "rel err vs float64"], tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "arch": runner.arch, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
