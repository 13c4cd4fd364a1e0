"""Deploy on a GPU: sasify, compile with backend "sas", and time against dense.

Two measurements, each checked for correctness against the dense result first:

1. A model (``sas_compile.models.resnet18``, CIFAR stem) at inference: dense eager, dense
   ``torch.compile`` (inductor), the sasified model eager (its ``sas::`` ops pick the CUDA
   Sparse Tensor Core kernels where they apply), the sasified model compiled with
   ``backend="sas"``, and the dense model compiled directly with ``backend="sas"``.
2. One layer, the paper's speed figure in small: ``y = W x`` for a dense ``nn.Linear(K, N)``,
   its ``SASLinear(K, N, M)`` (the same mults, M times the weight) and the wide dense
   ``nn.Linear(M*K, N)`` that SAS avoids.

Times are medians over ``--iters`` runs after warm-up (CUDA events). Without CUDA the
script prints why and exits with status 0; ``--device cpu`` runs the same code on the CPU
(timings there say nothing about Sparse Tensor Cores; it is a check of the pipeline).

Run:
    python examples/gpu_deploy.py                     # CUDA, float16
    python examples/gpu_deploy.py --quick             # smaller model and layer
    python examples/gpu_deploy.py --device cpu --quick --dtype float32
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import sas_compile
from sas_compile.layers import SASLinear
from sas_compile.models import resnet18
from sas_compile.runtime.projection import project

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    p.add_argument("--M", type=int, default=2, help="slots per value (the CUDA kernels take 2 and 4)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    p.add_argument("--tokens", type=int, default=8192, help="rows of x in the layer benchmark")
    p.add_argument("--features", type=int, default=4096, help="K = N of the layer benchmark")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager", "aot_eager"],
                   help='compiler of the dense torch.compile and of the graph around the SAS ops')
    p.add_argument("--quick", action="store_true", help="width 16, batch 8, 512 x 512 layer, 5 iterations")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.tokens, args.features, args.iters = 8, 16, 512, 512, 5
    return args


def cuda_unavailable_reason() -> Optional[str]:
    """None when a CUDA device is usable, else a sentence saying why not."""
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return (f"no CUDA device: torch {torch.__version__} "
                + (f"(built with CUDA {build}) sees no GPU" if build else "is a CPU-only build"))
    return None


def median_time(fn: Callable[[], Any], iters: int, device: str) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up (CUDA: measured with events)."""
    for _ in range(max(2, iters // 10)):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def bench_model(args, device: str, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """Dense vs SAS ResNet-18 at inference; each row: name, ms, error relative to dense eager."""
    torch.manual_seed(0)
    model = resnet18(num_classes=10, cifar=True, width=args.width).eval()
    x = torch.randn(args.batch, 3, 32, 32)
    sas_model = sas_compile.sasify(model, M=args.M, example_inputs=(x[:1],)).eval()
    model, sas_model = model.to(device, dtype), sas_model.to(device, dtype)
    x = x.to(device, dtype)
    torch._dynamo.reset()
    variants = {
        "dense eager": model,
        f"dense torch.compile ({args.inner})": torch.compile(model, backend=args.inner),
        f"sasify(M={args.M}) eager": sas_model,
        f'sasify(M={args.M}) + torch.compile(backend="sas")': torch.compile(
            sas_model, backend="sas", options={"M": args.M, "inner": args.inner}),
        f'dense + torch.compile(backend="sas", M={args.M})': torch.compile(
            model, backend="sas", options={"M": args.M, "inner": args.inner}),
    }
    ref = model(x)
    rows = []
    for name, fn in variants.items():
        err = _rel_err(fn(x), ref)
        ms = median_time(lambda: fn(x), args.iters, device)
        rows.append({"name": name, "ms": ms, "rel_err": err})
    return rows


@torch.no_grad()
def bench_layer(args, device: str, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """One layer: dense Linear(K, N), SASLinear(K, N, M), wide dense Linear(M*K, N)."""
    torch.manual_seed(0)
    K = N = args.features
    dense = nn.Linear(K, N, bias=False)
    sas = SASLinear.from_dense(dense, M=args.M)
    wide = nn.Linear(args.M * K, N, bias=False)
    with torch.no_grad():
        wide.weight.copy_(sas.weight)
    dense, sas, wide = (m.to(device, dtype).eval() for m in (dense, sas, wide))
    x = torch.randn(args.tokens, K, device=device, dtype=dtype)
    # the wide dense layer reads the projected activation S(x): the same product, sparsity unused
    x_wide = project(x, args.M, -1, sas.rule)
    ref = dense(x)
    rows = []
    for name, fn, mults in ((f"dense Linear({K}, {N})", lambda: dense(x), K * N),
                            (f"SASLinear({K}, {N}, M={args.M})", lambda: sas(x), K * N),
                            (f"wide dense Linear({args.M * K}, {N}) on S(x)", lambda: wide(x_wide), args.M * K * N)):
        err = _rel_err(fn(), ref)
        rows.append({"name": name, "ms": median_time(fn, args.iters, device), "rel_err": err,
                     "mults_per_row": mults})
    return rows


def _print_rows(title: str, rows: List[Dict[str, Any]]) -> None:
    from tabulate import tabulate

    base = rows[0]["ms"]
    body = [[r["name"], f"{r['ms']:.3f}", f"{r['ms'] / base:.2f}x",
             "-" if r["rel_err"] is None else f"{r['rel_err']:.2e}"] for r in rows]
    print(f"\n{title}")
    print(tabulate(body, ["variant", "median ms", "vs first", "max rel. error vs dense"], tablefmt="github"))


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmarks; without CUDA (and ``--device cuda``) print why and return ``ran=False``."""
    args = parse_args(argv)
    if args.device == "cuda":
        why = cuda_unavailable_reason()
        if why is not None:
            message = (f"gpu_deploy: {why}; nothing to time. Run it on a machine with an NVIDIA GPU "
                       "(Ampere or newer for Sparse Tensor Cores), or pass --device cpu to check the pipeline.")
            print(message)
            return {"ran": False, "message": message}
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    from sas_compile.runtime.matmul import targets

    for name, status in targets().items():
        print(f"runtime target {name}: {status}")
    dtype = DTYPES[args.dtype]
    model_rows = bench_model(args, args.device, dtype)
    _print_rows(f"ResNet-18 (width {args.width}), batch {args.batch}x3x32x32, {args.dtype}, {args.device}", model_rows)
    layer_rows = bench_layer(args, args.device, dtype)
    _print_rows(f"one layer, x: {args.tokens}x{args.features}, {args.dtype}, {args.device}", layer_rows)
    return {"ran": True, "model": model_rows, "layer": layer_rows, "device": args.device, "dtype": args.dtype}


if __name__ == "__main__":
    main()
    sys.exit(0)
