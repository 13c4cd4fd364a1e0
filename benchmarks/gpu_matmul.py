"""Reproduce the SAS paper's speed figure: W X on Sparse Tensor Cores, dense vs SWS 1:2 vs SAS.

Shapes as in the paper: the GEMM is (alpha x beta) @ (beta x gamma) with gamma = 10240 and
alpha = beta from 10240 to 20480, the same shapes for every method; the sparse operand is
the left one:

* dense: ``torch.mm`` (cuBLAS) of W [alpha, beta] and X [beta, gamma];
* SWS 1:2: W is 1:2 sparse: our kernel (``sws_matmul(target="cuda")``) and PyTorch's
  ``to_sparse_semi_structured`` (cuSPARSELt or CUTLASS);
* SAS M = 2: the sparse operand is the projected activation S(x), x [alpha, beta/2] narrow,
  times a wide weight [gamma, beta]: our fused kernel (``sas_matmul(target="cuda")``, no wide
  tensor, metadata from signs in registers) and the unfused path (pack x into the CUTLASS
  layout with ``pack_sas_activation_cutlass``, then ``torch._sparse_semi_structured_mm``).

Prints times (median of several runs, measured round-robin so every method sees the same
clock and thermal state) and the ratios SAS / SWS and SAS / dense, for float16 and bfloat16.
Targets: SAS overhead over SWS below the paper's 1.5%, SAS faster than dense at every size.
A second table compares the SAS layer with the dense narrow layer at equal mults
(x [alpha, beta/2] @ W [beta/2, gamma]).

Run on a machine with an Ampere-or-newer NVIDIA GPU:
    python benchmarks/gpu_matmul.py            # the paper's sizes, fp16 and bf16
    python benchmarks/gpu_matmul.py --quick    # two small sizes, a smoke run
Without CUDA it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=int, default=10240, help="columns of X (default 10240)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[10240, 12288, 14336, 16384, 18432, 20480],
        help="alpha = beta values (default 10240 .. 20480 in steps of 2048)",
    )
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes (gamma 2048, 2048 and 4096)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument(
        "--dry-run-cpu", action="store_true",
        help="check the script itself on the CPU: tiny shapes, wall-clock timers, no GPU paths",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.gamma, args.sizes = 2048, [2048, 4096]
    if args.dry_run_cpu:
        args.gamma, args.sizes, args.warmup, args.repeats = 64, [64, 128], 1, 3
    for size in args.sizes:
        if size % 64 or size <= 0:
            parser.error(f"--sizes: {size} is not a positive multiple of 64 (sparse tiles)")
    if args.gamma % 64 or args.gamma <= 0:
        parser.error(f"--gamma: {args.gamma} is not a positive multiple of 64")
    return args


def one_in_two(rows: int, cols: int, dtype, device, generator) -> torch.Tensor:
    """A random 1:2 sparse matrix: one nonzero in every pair of neighbouring columns."""
    values = torch.randn(rows, cols // 2, 2, device=device, generator=generator).to(dtype)
    keep = torch.randint(0, 2, (rows, cols // 2, 1), device=device, generator=generator)
    mask = torch.zeros(rows, cols // 2, 2, device=device, dtype=dtype).scatter_(-1, keep, 1)
    return (values * mask).reshape(rows, cols)


class Timer:
    """Median wall time per method, runs interleaved round-robin."""

    def __init__(self, cuda: bool, warmup: int, repeats: int):
        self.cuda, self.warmup, self.repeats = cuda, warmup, repeats

    def _once(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        began = time.perf_counter()
        fn()
        return (time.perf_counter() - began) * 1e3

    def median_ms(self, methods: Dict[str, Callable[[], object]]) -> Dict[str, float]:
        for fn in methods.values():
            for _ in range(self.warmup):
                fn()
        if self.cuda:
            torch.cuda.synchronize()
        samples: Dict[str, List[float]] = {name: [] for name in methods}
        for _ in range(self.repeats):
            for name, fn in methods.items():
                samples[name].append(self._once(fn))
        return {name: statistics.median(times) for name, times in samples.items()}


def kernel_status() -> str:
    """Empty when our CUDA kernels can run here, else why not."""
    from sas_compile.runtime import targets

    available, reason = targets()["cuda"]
    return "" if available else reason


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def measure_size(size, args, dtype, device, generator, timer, ours, torch_sparse) -> dict:
    """Times of every method at one GEMM shape; all its tensors are freed on return."""
    from sas_compile.runtime import sas_matmul, sws_matmul
    from sas_compile.runtime.packing import pack_sas_activation_cutlass, pack_sws_weight

    alpha = beta = size
    gamma = args.gamma
    w_sparse = one_in_two(alpha, beta, dtype, device, generator)
    x_dense = torch.randn(beta, gamma, device=device, generator=generator).to(dtype)
    x_rows = x_dense.t().contiguous()  # the SWS kernel reads the activation row-major
    x_narrow = torch.randn(alpha, beta // 2, device=device, generator=generator).to(dtype)
    w_wide = torch.randn(gamma, beta, device=device, generator=generator).to(dtype)
    w_wide_t = w_wide.t().contiguous()
    w_narrow_t = torch.randn(beta // 2, gamma, device=device, generator=generator).to(dtype)
    check = size == args.sizes[0]  # outputs agree before anything is timed

    methods: Dict[str, Callable[[], object]] = {
        "dense": lambda: torch.mm(w_sparse, x_dense),
        "dense_narrow": lambda: torch.mm(x_narrow, w_narrow_t),
    }
    backend = "n/a"
    if ours:
        packed = pack_sws_weight(w_sparse, M=2)
        methods["sws_ours"] = lambda: sws_matmul(x_rows, packed, target=ours)
        methods["sas_fused"] = lambda: sas_matmul(x_narrow, w_wide, M=2, target=ours)
        if check:
            diff = max_rel_diff(methods["sws_ours"]().t(), methods["dense"]())
            print(f"  check {dtype} {size}: SWS ours vs dense, max rel diff {diff:.2e}")
    if torch_sparse:
        from torch.sparse import to_sparse_semi_structured

        w_semi = to_sparse_semi_structured(w_sparse)
        backend = getattr(w_semi, "BACKEND", type(w_semi).__name__)
        methods["sws_torch"] = lambda: torch.mm(w_semi, x_dense)

        def sas_unfused():
            values, meta = pack_sas_activation_cutlass(x_narrow, 2)
            return torch._sparse_semi_structured_mm(values, meta, w_wide_t)

        methods["sas_unfused"] = sas_unfused
        if ours and check:
            diff = max_rel_diff(methods["sas_fused"](), sas_unfused())
            print(f"  check {dtype} {size}: SAS fused vs pack + CUTLASS, max rel diff {diff:.2e}")
    times = timer.median_ms(methods)
    return {"size": size, "gamma": gamma, "dtype": str(dtype).replace("torch.", ""),
            "sws_torch_backend": backend, **times}


def measure(args, dtype, device, timer: Timer, ours: Optional[str], torch_sparse: bool):
    """One row per size: times of every method at the same GEMM shape.

    ``ours``: the target our ops run on ("cuda"; "cpu" in the dry run), None to leave them out.
    """
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for size in args.sizes:
        rows.append(measure_size(size, args, dtype, device, generator, timer, ours, torch_sparse))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def ratio(row, a, b) -> Optional[float]:
    return row[a] / row[b] if a in row and b in row else None


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def report(rows) -> List[str]:
    from tabulate import tabulate

    lines = []
    table = [
        [
            r["dtype"], r["size"], r["gamma"], fmt(r.get("dense"), ".3f"),
            fmt(r.get("sws_ours"), ".3f"), fmt(r.get("sws_torch"), ".3f"),
            fmt(r.get("sas_fused"), ".3f"), fmt(r.get("sas_unfused"), ".3f"),
            fmt(ratio(r, "sas_fused", "sws_ours"), ".4f"),
            fmt(ratio(r, "sas_unfused", "sws_torch"), ".4f"),
            fmt(ratio(r, "sas_fused", "dense"), ".4f"),
        ]
        for r in rows
    ]
    headers = [
        "dtype", "alpha=beta", "gamma", "dense ms", "SWS ours ms", "SWS torch ms",
        "SAS fused ms", "SAS pack+CUTLASS ms", "SAS/SWS (ours)", "SAS/SWS (torch path)",
        "SAS/dense",
    ]
    lines.append(tabulate(table, headers=headers, tablefmt="github"))
    backends = sorted({r["sws_torch_backend"] for r in rows})
    lines.append(f"SWS torch backend: {', '.join(backends)}")

    sas_over_sws = [ratio(r, "sas_fused", "sws_ours") for r in rows]
    sas_over_dense = [ratio(r, "sas_fused", "dense") for r in rows]
    if all(v is not None for v in sas_over_sws):
        worst = max(sas_over_sws)
        verdict = "met" if worst - 1 < 0.015 else "NOT met"
        lines.append(f"SAS overhead over SWS (fused kernels): worst {100 * (worst - 1):+.2f}% "
                     f"(target < 1.5%: {verdict})")
    if all(v is not None for v in sas_over_dense):
        verdict = "met" if max(sas_over_dense) < 1 else "NOT met"
        lines.append(f"SAS fused faster than dense at every size: {verdict} "
                     f"(SAS/dense from {min(sas_over_dense):.3f} to {max(sas_over_dense):.3f})")

    narrow = [
        [r["dtype"], r["size"] // 2, r["size"], r["gamma"], fmt(r.get("dense_narrow"), ".3f"),
         fmt(r.get("sas_fused"), ".3f"), fmt(ratio(r, "sas_fused", "dense_narrow"), ".3f")]
        for r in rows
    ]
    lines.append("")
    lines.append("SAS layer vs the dense narrow layer at equal mults (x [alpha, K] with K = beta/2):")
    lines.append(tabulate(
        narrow,
        headers=["dtype", "K narrow", "M*K wide", "gamma (N)", "dense narrow ms", "SAS fused ms", "SAS/dense narrow"],
        tablefmt="github",
    ))
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run_cpu:
        device, ours, torch_sparse, cuda = torch.device("cpu"), "cpu", False, False
        print("gpu_matmul: dry run on the CPU (tiny shapes, wall clock, our ops on target='cpu'; "
              "no sparse GPU paths)")
    else:
        if not torch.cuda.is_available():
            print("gpu_matmul: no CUDA device (torch.cuda.is_available() is False); this benchmark "
                  "needs an NVIDIA GPU of compute capability 8.0 or newer. Nothing measured.")
            return 0
        capability = torch.cuda.get_device_capability()
        if capability < (8, 0):
            print(f"gpu_matmul: {torch.cuda.get_device_name()} has compute capability "
                  f"{capability[0]}.{capability[1]}; Sparse Tensor Cores need 8.0 or newer. Nothing measured.")
            return 0
        device, torch_sparse, cuda = torch.device("cuda"), True, True
        missing = kernel_status()
        ours = None if missing else "cuda"
        print(f"gpu_matmul on {torch.cuda.get_device_name()}, torch {torch.__version__}")
        if missing:
            print(f"  our kernels unavailable ({missing}): their columns read n/a")

    timer = Timer(cuda, args.warmup, args.repeats)
    rows = []
    for name in args.dtypes:
        rows.extend(measure(args, DTYPES[name], device, timer, ours, torch_sparse))
    print("\n".join(report(rows)))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if cuda else "cpu",
                       "torch": torch.__version__, "rows": rows}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
