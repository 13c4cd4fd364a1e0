"""CPU cost of a SAS layer against the dense layers around it, measured side by side.

At ResNet-50, ViT-B/16 and BERT-base layer shapes (batch 8; 224x224 images, 128 tokens) it
times, interleaved round-robin so every variant sees the same machine state:

- dense narrow: the original layer;
- dense wide: a dense layer of the SAS layer's wide shape fed an already-wide input: the
  floor of any SAS CPU implementation that calls a dense kernel;
- SAS: ``sas::conv2d`` / ``sas::linear`` on the narrow input (projection + the dense wide
  kernel; its backward recomputes the projection from the saved narrow input);
- reference: the reference code's formulation, a zero-filled ``[B, C, M, ...]`` tensor plus
  scatter, then the wide layer (autograd through both);

forward and forward+backward, and the projection alone against a copy of the same size
(``torch.cat([x, x])``). Every figure is median (min-max) over ``--repeats`` runs, but the
``bwd`` rows: the backward alone, the forward+backward median minus the forward median (no spread:
the two come from separate round-robins, so no repeat pairs them).

The last column counts the minor page faults of a call (median, wide / SAS; Linux and macOS):
glibc's malloc returns freed blocks of several MB to the kernel when the top of its heap holds
enough free memory, and the next call that allocates them again touches fresh pages. Which calls
fault depends on the heap the variants leave behind them in the round-robin, so a row whose
sides fault differently measures the allocator as much as the layer (an allocator such as
tcmalloc, ``LD_PRELOAD=libtcmalloc_minimal.so.4``, keeps freed memory and faults on neither).

Run: ``python benchmarks/cpu_layers.py [--M 2] [--repeats 7] [--threads 2] [--quick]``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from tabulate import tabulate

from sas_compile.runtime import sas_ops  # noqa: F401  (registers torch.ops.sas.*)
from sas_compile.runtime.projection import project, reference_project

RULE = "sign_pattern"
VARIANTS = ("dense narrow", "dense wide", "SAS", "reference")


def _conv_case(batch, cin, cout, size, k, M):
    x = torch.randn(batch, cin, size, size)
    pad = k // 2
    conv = lambda inp, weight: F.conv2d(inp, weight, None, 1, pad)  # noqa: E731
    wide_w = torch.randn(cout, cin * M, k, k) * 0.05
    return {
        "dense narrow": (conv, x, torch.randn(cout, cin, k, k) * 0.05),
        "dense wide": (conv, torch.randn(batch, cin * M, size, size).clamp_min(0), wide_w),
        "SAS": (lambda xx, ww: torch.ops.sas.conv2d(xx, ww, None, [1, 1], [pad, pad], [1, 1], 1, M, RULE), x, wide_w),
        "reference": (lambda xx, ww: conv(reference_project(xx, M, 1), ww), x, wide_w),
    }


def _linear_case(tokens, dim, hidden, M):
    x = torch.randn(tokens, dim)
    wide_w = torch.randn(hidden, dim * M) * 0.05
    return {
        "dense narrow": (F.linear, x, torch.randn(hidden, dim) * 0.05),
        "dense wide": (F.linear, torch.randn(tokens, dim * M).clamp_min(0), wide_w),
        "SAS": (lambda xx, ww: torch.ops.sas.linear(xx, ww, None, M, RULE), x, wide_w),
        "reference": (lambda xx, ww: F.linear(reference_project(xx, M, -1), ww), x, wide_w),
    }


def cases(batch: int, M: int, quick: bool) -> List[Tuple[str, Dict]]:
    if quick:
        return [("conv 3x3 8x8 16->16", _conv_case(2, 16, 16, 8, 3, M)), ("linear 64x32->64", _linear_case(64, 32, 64, M))]
    return [
        ("R50 conv3x3 56x56 64->64", _conv_case(batch, 64, 64, 56, 3, M)),
        ("R50 conv1x1 14x14 1024->256", _conv_case(batch, 1024, 256, 14, 1, M)),
        ("R50 conv3x3 7x7 512->512", _conv_case(batch, 512, 512, 7, 3, M)),
        (f"ViT-B fc1 {batch * 197}x768->3072", _linear_case(batch * 197, 768, 3072, M)),
        (f"ViT-B fc2 {batch * 197}x3072->768", _linear_case(batch * 197, 3072, 768, M)),
        (f"BERT qkv {batch * 128}x768->768", _linear_case(batch * 128, 768, 768, M)),
    ]


def _minor_faults() -> int:
    """This process's minor page faults so far (0 where ``resource`` is missing: Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _round_robin(fns: Dict[str, Callable[[], object]], repeats: int,
                 faults: Optional[Dict[str, List[int]]] = None) -> Dict[str, List[float]]:
    """ms per call of each function, called in turn ``repeats`` times; with ``faults``, each
    call's minor page faults are appended there per name."""
    for fn in fns.values():
        fn()  # warm-up (allocator, oneDNN primitive cache)
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before = _minor_faults()
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
            if faults is not None:
                faults.setdefault(name, []).append(_minor_faults() - before)
    return samples


def _fwd_and_step(variants):
    fwd, step = {}, {}
    for name, (fn, x, w) in variants.items():
        fwd[name] = lambda fn=fn, x=x, w=w: fn(x, w)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def one(fn=fn, xg=xg, wg=wg):
            out = fn(xg, wg)
            out.backward(torch.ones_like(out))
            xg.grad = wg.grad = None

        step[name] = one
    return fwd, step


def _allocator() -> str:
    """Which malloc the process runs on, as far as LD_PRELOAD says (the page-fault column's context)."""
    preload = os.environ.get("LD_PRELOAD", "")
    named = [lib for lib in ("tcmalloc", "jemalloc", "mimalloc") if lib in preload]
    return f"malloc: {named[0]} (LD_PRELOAD)" if named else f"malloc: the C library's ({sys.platform})"


def spread(samples: List[float]) -> str:
    return f"{statistics.median(samples):.2f} ({min(samples):.2f}-{max(samples):.2f})"


def ratio(a: List[float], b: List[float]) -> str:
    """Median ratio, with the spread of the per-repeat ratios (runs interleaved, so paired)."""
    r = [x / y for x, y in zip(a, b)]
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script runs")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, proj_rows = [], []
    for label, variants in cases(args.batch, args.M, args.quick):
        fwd, step = _fwd_and_step(variants)
        f_fwd, f_step = {}, {}
        with torch.no_grad():
            t_fwd = _round_robin(fwd, args.repeats, f_fwd)
        t_step = _round_robin(step, args.repeats, f_step)
        for mode, t, f in (("fwd", t_fwd, f_fwd), ("fwd+bwd", t_step, f_step)):
            rows.append([label, mode, *(spread(t[k]) for k in VARIANTS), ratio(t["SAS"], t["dense wide"]),
                         ratio(t["SAS"], t["reference"]),
                         f"{statistics.median(f['dense wide']):.0f} / {statistics.median(f['SAS']):.0f}"])
        # the backward alone: forward+backward minus forward, from the medians (the two come from
        # separate round-robins, so there are no paired repeats to give a spread)
        bwd = {k: statistics.median(t_step[k]) - statistics.median(t_fwd[k]) for k in VARIANTS}
        rows.append([label, "bwd", *(f"{bwd[k]:.2f}" for k in VARIANTS), f"{bwd['SAS'] / bwd['dense wide']:.2f}",
                     f"{bwd['SAS'] / bwd['reference']:.2f}", ""])
        x = variants["SAS"][1]
        dim = 1 if x.dim() == 4 else -1
        with torch.no_grad():
            t = _round_robin({"project": lambda: project(x, args.M, dim, RULE),
                              "copy": lambda: torch.cat([x] * args.M, dim)}, args.repeats)
        proj_rows.append([label, spread(t["project"]), spread(t["copy"]), ratio(t["project"], t["copy"])])
    print(f"M={args.M}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"ms as median (min-max) of {args.repeats} interleaved runs; {_allocator()}")
    headers = ["layer", "pass", "narrow ms", "wide ms", "SAS ms", "reference ms", "SAS/wide", "SAS/reference",
               "faults wide/SAS"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    print()
    print(tabulate(proj_rows, headers=["layer input", "project ms", "same-size copy ms", "project/copy"],
                   tablefmt="github"))
    return rows, proj_rows


if __name__ == "__main__":
    main()
