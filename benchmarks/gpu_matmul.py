"""Sparse GEMMs on a GPU, side by side in one run: ours, cuBLAS and PyTorch's 2:4 kernels.

Two tables, every time the median of CUDA-event timings of runs interleaved round-robin
(every method sees the same clock and thermal state), after a correctness check of each
method against the PyTorch formulation:

1. The paper's speed figure (``W X``, gamma = 10240, alpha = beta from 10240 to 20480, the
   same shapes for every method, the sparse operand on the left): cuBLAS dense; SWS 1:2 on
   our kernel and on PyTorch's default 2:4 backend (cuSPARSELt on sm_90, CUTLASS on 8.x
   without cuSPARSELt); SAS M = 2 on our fused kernel and as projection + PyTorch's 2:4 GEMM
   with its compression of S(x).
2. SAS layers at LLM and ResNet-50 im2col shapes (x [R, K] narrow, N outputs; M = 2 and 4):
   cuBLAS dense narrow (the same mults), cuBLAS dense wide on a pre-projected S(x),
   projection + cuBLAS dense wide (the PyTorch formulation), PyTorch's 2:4 GEMM on a
   pre-compressed S(x) and with its compression, ours (``sas_matmul(target="cuda")``: the
   sas_compress kernel then the sparse GEMM; the "fused" column) and its two kernels timed
   apart (compress alone; the GEMM on a pre-compressed S(x), the counterpart of the vendor's
   pre-compressed column), and ``target="auto"`` (which must never be slower than
   projection + dense wide).

Run on an NVIDIA GPU of compute capability 8.0 or newer:
    python benchmarks/gpu_matmul.py                  # both tables, fp16 and bf16
    python benchmarks/gpu_matmul.py --quick          # small sizes, a smoke run
    python benchmarks/gpu_matmul.py --dry-run-cpu    # the script's code paths on the CPU
Without CUDA (and without --dry-run-cpu) it prints one line and exits 0.
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

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# (name, R rows of x, K narrow features, N outputs)
LAYER_SHAPES = [
    ("LLM 8192x4096 -> 4096", 8192, 4096, 4096),
    ("LLM 16384x4096 -> 11008", 16384, 4096, 11008),
    ("LLM 8192x11008 -> 4096", 8192, 11008, 4096),
    ("R50 conv3x3 56x56x64 (b64)", 64 * 56 * 56, 9 * 64, 64),
    ("R50 conv3x3 14x14x256 (b64)", 64 * 14 * 14, 9 * 256, 256),
    ("R50 conv1x1 14x14 1024->256 (b64)", 64 * 14 * 14, 1024, 256),
]
QUICK_LAYER_SHAPES = [("small 2048x1024 -> 1024", 2048, 1024, 1024), ("ragged 1000x520 -> 300", 1000, 520, 300)]
DRY_LAYER_SHAPES = [("tiny 64x32 -> 48", 64, 32, 48), ("ragged 37x20 -> 30", 37, 20, 30)]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gamma", type=int, default=10240, help="columns of X in the paper's figure (10240)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10240, 12288, 14336, 16384, 18432, 20480],
                        help="alpha = beta values of the paper's figure")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp16", "bf16"])
    parser.add_argument("--Ms", type=int, nargs="+", default=[2, 4], help="M of the layer table")
    parser.add_argument("--tables", nargs="+", choices=["paper", "layers"], default=["paper", "layers"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per method (median)")
    parser.add_argument("--quick", action="store_true", help="small sizes (gamma 2048, sizes 2048 and 4096)")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="check the script itself on the CPU: tiny shapes, wall clock, our ops on the "
                             "emulator where it builds, no vendor sparse paths")
    args = parser.parse_args(argv)
    args.layer_shapes = LAYER_SHAPES
    if args.quick:
        args.gamma, args.sizes, args.layer_shapes = 2048, [2048, 4096], QUICK_LAYER_SHAPES
    if args.dry_run_cpu:
        args.gamma, args.sizes, args.warmup, args.repeats = 64, [64, 128], 1, 3
        args.layer_shapes = DRY_LAYER_SHAPES
    for size in args.sizes:
        if size % 64 or size <= 0:
            parser.error(f"--sizes: {size} is not a positive multiple of 64 (sparse tiles)")
    if args.gamma % 64 or args.gamma <= 0:
        parser.error(f"--gamma: {args.gamma} is not a positive multiple of 64")
    for M in args.Ms:
        if M not in (2, 4):
            parser.error(f"--Ms: {M}: the kernels and 2:4 hardware take M = 2 and 4")
    return args


def one_in_m(rows: int, cols: int, M: int, dtype, device, generator) -> torch.Tensor:
    """A random 1:M sparse matrix: one nonzero in every M neighbouring columns (never zero)."""
    values = torch.randn(rows, cols // M, M, device=device, generator=generator)
    values = values + values.sign() * 0.1
    keep = torch.randint(0, M, (rows, cols // M, 1), device=device, generator=generator)
    mask = torch.zeros(rows, cols // M, M, device=device).scatter_(-1, keep, 1)
    return (values * mask).reshape(rows, cols).to(dtype)


class Timer:
    """Median time per method in ms, runs interleaved round-robin."""

    def __init__(self, cuda: bool, warmup: int, repeats: int):
        self.cuda, self.warmup, self.repeats = cuda, warmup, repeats

    def _once(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def checked(methods: Dict[str, Callable[[], torch.Tensor]], reference: str, errors: Dict[str, float],
            tolerance: float, transform: Optional[Dict[str, Callable]] = None) -> Dict[str, Callable]:
    """Keep the methods whose output matches ``reference``'s; record every relative error."""
    ref = methods[reference]()
    kept = {}
    for name, fn in methods.items():
        try:
            out = fn()
            if transform and name in transform:
                out = transform[name](out)
            errors[name] = rel_err(out, ref)
        except Exception as error:  # noqa: BLE001 - a path this GPU or build cannot run
            errors[name] = float("nan")
            print(f"    {name}: not run ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
            continue
        if errors[name] <= tolerance:
            kept[name] = fn
        else:
            print(f"    {name}: WRONG (relative error {errors[name]:.2e}); not timed")
    return kept


def vendor_status(device) -> str:
    """Empty when PyTorch's 2:4 kernels can run here, else why not."""
    if device.type != "cuda":
        return "no CUDA device"
    from sas_compile.runtime.matmul import vendor_24_status

    ok, why = vendor_24_status(torch.empty(1, device=device, dtype=torch.float16))
    return "" if ok else why


def paper_row(size, args, dtype, device, timer, ours, vendor_missing) -> dict:
    """Times at one size of the paper's figure; its tensors are freed on return."""
    from sas_compile.runtime import sas_matmul, sws_matmul
    from sas_compile.runtime.packing import pack_sws_weight
    from sas_compile.runtime.projection import project

    g = torch.Generator(device=device).manual_seed(size)
    alpha = beta = size
    gamma = args.gamma
    w_sparse = one_in_m(alpha, beta, 2, dtype, device, g)
    x_dense = torch.randn(beta, gamma, device=device, generator=g).to(dtype)
    x_rows = x_dense.t().contiguous()  # our SWS kernel reads the activation row-major
    x_narrow = torch.randn(alpha, beta // 2, device=device, generator=g).to(dtype)
    w_wide = torch.randn(gamma, beta, device=device, generator=g).to(dtype)
    methods: Dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: torch.mm(w_sparse, x_dense)}
    sas_methods: Dict[str, Callable[[], torch.Tensor]] = {
        "sas_projection_dense": lambda: F.linear(project(x_narrow, 2), w_wide)}
    if ours:
        packed = pack_sws_weight(w_sparse, M=2)
        methods["sws_ours"] = lambda: sws_matmul(x_rows, packed, target=ours)
        sas_methods["sas_fused"] = lambda: sas_matmul(x_narrow, w_wide, M=2, target=ours)
    if not vendor_missing:
        from torch.sparse import to_sparse_semi_structured

        w_semi = to_sparse_semi_structured(w_sparse)
        methods["sws_vendor"] = lambda: torch.mm(w_semi, x_dense)
        sas_methods["sas_vendor_compress"] = lambda: torch.mm(to_sparse_semi_structured(project(x_narrow, 2)),
                                                              w_wide.t())
    errors: Dict[str, float] = {}
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    methods = checked(methods, "dense", errors, tol, transform={"sws_ours": lambda out: out.t()})
    sas_methods = checked(sas_methods, "sas_projection_dense", errors, tol)
    times = timer.median_ms({**methods, **sas_methods})
    return {"size": size, "gamma": gamma, "dtype": str(dtype).replace("torch.", ""), **times,
            "rel_err": errors}


def our_kernels_apart(x, w_wide, M, ours):
    """Our two SAS kernels as separate callables: (compress S(x), GEMM on the compressed S(x))."""
    from sas_compile.runtime.cuda.kernel_params import Plan

    if ours == "cuda":
        from sas_compile.runtime import cuda as kernels

        plan, run = kernels.sas_plan(x, w_wide, None, M), kernels.run_plan
    else:
        from sas_compile.runtime import emulator
        from sas_compile.runtime.cuda.kernel_params import prepare_sas

        plan, run = prepare_sas(x, w_wide, None, M, tile="64x64"), emulator.run
    compress = Plan(plan.launches[:1], plan.extras["operand"].vals)
    gemm = Plan(plan.launches[1:], plan.out)
    run(compress)
    return (lambda: run(compress)), (lambda: run(gemm))


def layer_row(case, M, args, dtype, device, timer, ours, vendor_missing) -> dict:
    """Times of one SAS layer shape; its tensors are freed on return."""
    from sas_compile.runtime import autotune, sas_matmul
    from sas_compile.runtime.projection import project

    name, R, K, N = case
    g = torch.Generator(device=device).manual_seed(R + K + N + M)
    x = torch.randn(R, K, device=device, generator=g).to(dtype)
    w_narrow = torch.randn(N, K, device=device, generator=g).to(dtype)
    w_wide = torch.randn(N, M * K, device=device, generator=g).to(dtype)
    wide_x = project(x, M)
    methods: Dict[str, Callable[[], torch.Tensor]] = {
        "projection_dense": lambda: F.linear(project(x, M), w_wide),
        "dense_wide": lambda: F.linear(wide_x, w_wide),
    }
    ours_compress = None
    if ours:
        methods["sas_fused"] = lambda: sas_matmul(x, w_wide, M=M, target=ours)
        try:
            ours_compress, methods["ours_precompressed"] = our_kernels_apart(x, w_wide, M, ours)
        except Exception as error:  # noqa: BLE001 - the fused column still runs
            print(f"    our kernels apart: not run ({type(error).__name__}: {str(error).splitlines()[0]})")
    methods["sas_auto"] = lambda: sas_matmul(x, w_wide, M=M, target="auto")
    if not vendor_missing:
        from torch.sparse import to_sparse_semi_structured

        try:
            wide_sparse = to_sparse_semi_structured(wide_x)
            methods["vendor_precompressed"] = lambda: torch.mm(wide_sparse, w_wide.t())
            methods["vendor_compress"] = lambda: torch.mm(to_sparse_semi_structured(project(x, M)), w_wide.t())
        except Exception as error:  # noqa: BLE001 - shapes the vendor kernels refuse
            print(f"    vendor 2:4: not run ({type(error).__name__}: {str(error).splitlines()[0]})")
    errors: Dict[str, float] = {}
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-2
    methods = checked(methods, "projection_dense", errors, tol)
    methods["dense_narrow"] = lambda: F.linear(x, w_narrow)  # equal mults, a different product
    if ours_compress is not None and "ours_precompressed" in methods:
        methods["ours_compress"] = ours_compress  # writes the operand the checked GEMM read
    chosen = [d for d in autotune.decisions() if d.op == "sas_linear" and d.fields["K"] == K and d.fields["N"] == N
              and d.fields["M"] == M and d.fields["dtype"] == str(dtype).replace("torch.", "")]
    times = timer.median_ms(methods)
    return {"case": name, "R": R, "K": K, "N": N, "M": M, "dtype": str(dtype).replace("torch.", ""), **times,
            "auto_choice": chosen[-1].impl if chosen else "n/a", "rel_err": errors}


def ratio(row, a, b) -> Optional[float]:
    return row[a] / row[b] if a in row and b in row else None


def fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def paper_table(rows) -> List[str]:
    from tabulate import tabulate

    table = [[r["dtype"], r["size"], r["gamma"], *(fmt(r.get(k), ".3f") for k in (
        "dense", "sws_ours", "sws_vendor", "sas_fused", "sas_vendor_compress", "sas_projection_dense")),
        fmt(ratio(r, "sas_fused", "sws_ours"), ".3f"), fmt(ratio(r, "sas_fused", "dense"), ".3f"),
        fmt(ratio(r, "sws_ours", "sws_vendor"), ".3f")] for r in rows]
    headers = ["dtype", "alpha=beta", "gamma", "dense ms", "SWS ours ms", "SWS vendor ms", "SAS fused ms",
               "SAS proj+vendor ms", "SAS proj+dense ms", "SAS/SWS ours", "SAS fused/dense", "SWS ours/vendor"]
    lines = ["The paper's figure: W X, the sparse operand on the left (SWS 1:2, SAS M=2)",
             tabulate(table, headers=headers, tablefmt="github")]
    over = [ratio(r, "sas_fused", "sws_ours") for r in rows]
    if over and all(v is not None for v in over):
        lines.append(f"SAS over SWS on our kernels: {100 * (min(over) - 1):+.1f}% .. {100 * (max(over) - 1):+.1f}% "
                     "(the paper: +1.5% through cuSPARSELt)")
    return lines


def layer_table(rows) -> List[str]:
    from tabulate import tabulate

    keys = ("dense_narrow", "dense_wide", "projection_dense", "vendor_precompressed", "vendor_compress",
            "sas_fused", "ours_compress", "ours_precompressed", "sas_auto")
    table = [[r["case"], r["dtype"], r["M"], *(fmt(r.get(k), ".3f") for k in keys), r["auto_choice"],
              fmt(ratio(r, "sas_auto", "projection_dense"), ".3f"), fmt(ratio(r, "sas_fused", "dense_narrow"), ".2f")]
             for r in rows]
    headers = ["layer", "dtype", "M", "dense narrow ms", "dense wide ms", "proj+dense wide ms",
               "vendor 2:4 pre-compressed ms", "vendor 2:4 + compress ms", "SAS fused ms",
               "ours: compress S(x) ms", "ours: GEMM on compressed S(x) ms", "SAS auto ms",
               "auto chose", "auto/proj+dense", "fused/dense narrow"]
    lines = ["SAS layers (x [R, K] narrow -> N): ours against cuBLAS and PyTorch's 2:4 kernels",
             tabulate(table, headers=headers, tablefmt="github")]
    worst = [ratio(r, "sas_auto", "projection_dense") for r in rows]
    worst = [w for w in worst if w is not None]
    if worst:
        lines.append(f"target='auto' against projection + dense wide: worst {max(worst):.3f}x "
                     "(the promise: never slower, within timing noise)")
    return lines


def environment(device) -> dict:
    env = {"torch": torch.__version__, "device": "cpu"}
    if device.type == "cuda":
        env.update(device=torch.cuda.get_device_name(device), capability="sm_%d%d" % torch.cuda.get_device_capability(),
                   cuda=torch.version.cuda)
    return env


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.dry_run_cpu:
        from sas_compile.runtime import targets

        device, cuda = torch.device("cpu"), False
        ours = "emulator" if targets()["emulator"].available else None
        vendor_missing = "dry run on the CPU"
        print(f"gpu_matmul: dry run on the CPU (tiny shapes, wall clock, our kernels on target={ours!r}; "
              "no vendor sparse paths)")
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
        from sas_compile.runtime import targets

        device, cuda = torch.device("cuda"), True
        status = targets()["cuda"]
        ours = "cuda" if status.available else None
        vendor_missing = vendor_status(device)
        print(f"gpu_matmul on {torch.cuda.get_device_name()}, torch {torch.__version__}")
        if not ours:
            print(f"  our kernels unavailable ({status.reason}): their columns read n/a")
        if vendor_missing:
            print(f"  PyTorch's 2:4 kernels unavailable ({vendor_missing}): their columns read n/a")

    timer = Timer(cuda, args.warmup, args.repeats)
    paper, layers = [], []
    for name in args.dtypes:
        dtype = DTYPES[name]
        if "paper" in args.tables:
            for size in args.sizes:
                print(f"  paper figure {name} {size}", flush=True)
                paper.append(paper_row(size, args, dtype, device, timer, ours, vendor_missing))
                if cuda:
                    torch.cuda.empty_cache()
        if "layers" in args.tables:
            for case in args.layer_shapes:
                for M in args.Ms:
                    print(f"  layer {case[0]} {name} M={M}", flush=True)
                    layers.append(layer_row(case, M, args, dtype, device, timer, ours, vendor_missing))
                    if cuda:
                        torch.cuda.empty_cache()
    lines = []
    if paper:
        lines += paper_table(paper) + [""]
    if layers:
        lines += layer_table(layers)
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment(device), "paper": paper, "layers": layers, "table": lines},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
