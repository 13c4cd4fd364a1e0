"""CPU cost of a SAS layer against the dense layers around it, measured side by side.

For ResNet-18's 3x3 convolutions (batch 8, 56x56x64 down to 7x7x512) and a transformer MLP
projection, prints the median time of:

- dense narrow: the original layer (``Cin`` input channels);
- dense wide: a dense layer of the SAS layer's wide shape fed an already-wide input
  (``M*Cin`` channels): the cost floor of any SAS CPU implementation that calls a dense kernel;
- SAS: ``sas::conv2d`` / ``sas::linear`` on the narrow input (projection + dense wide kernel);
- reference: the reference code's formulation, a zero-filled ``[B, C, M, H, W]`` tensor plus
  scatter, then the wide convolution (autograd through both);

forward and forward+backward, with the ratios SAS / dense wide, SAS / dense narrow and
SAS / reference. Run: ``python benchmarks/cpu_layers.py [--M 2] [--repeats 5] [--quick]``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate

from sas_compile.runtime import sas_ops  # noqa: F401  (registers torch.ops.sas.*)
from sas_compile.runtime.projection import reference_project

RULE = "sign_pattern"


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _conv_case(batch, channels, size, M):
    x = torch.randn(batch, channels, size, size)
    w = torch.randn(channels, channels, 3, 3) * 0.05
    wide_w = torch.randn(channels, channels * M, 3, 3) * 0.05
    wide_x = torch.randn(batch, channels * M, size, size).clamp_min(0)
    conv = lambda inp, weight: F.conv2d(inp, weight, None, 1, 1)  # noqa: E731
    return {
        "dense narrow": (lambda xx, ww: conv(xx, ww), x, w),
        "dense wide": (lambda xx, ww: conv(xx, ww), wide_x, wide_w),
        "SAS": (lambda xx, ww: torch.ops.sas.conv2d(xx, ww, None, [1, 1], [1, 1], [1, 1], 1, M, RULE), x, wide_w),
        "reference": (lambda xx, ww: conv(reference_project(xx, M, 1), ww), x, wide_w),
    }


def _linear_case(tokens, dim, hidden, M):
    x = torch.randn(tokens, dim)
    return {
        "dense narrow": (lambda xx, ww: F.linear(xx, ww), x, torch.randn(hidden, dim) * 0.05),
        "dense wide": (lambda xx, ww: F.linear(xx, ww), torch.randn(tokens, dim * M).clamp_min(0),
                       torch.randn(hidden, dim * M) * 0.05),
        "SAS": (lambda xx, ww: torch.ops.sas.linear(xx, ww, None, M, RULE), x, torch.randn(hidden, dim * M) * 0.05),
        "reference": (lambda xx, ww: F.linear(reference_project(xx, M, -1), ww), x, torch.randn(hidden, dim * M) * 0.05),
    }


def _measure(variants, repeats):
    fwd, both = {}, {}
    for name, (fn, x, w) in variants.items():
        with torch.no_grad():
            fwd[name] = _time(lambda: fn(x, w), repeats)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()

        def step():
            out = fn(xg, wg)
            out.backward(torch.ones_like(out))
            xg.grad = wg.grad = None

        both[name] = _time(step, repeats)
    return fwd, both


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, to check the script runs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.quick:
        cases = [("conv 3x3 8x8x16", _conv_case(2, 16, 8, args.M)), ("linear 64x32->64", _linear_case(64, 32, 64, args.M))]
    else:
        cases = [(f"conv 3x3 {s}x{s}x{c}", _conv_case(args.batch, c, s, args.M))
                 for c, s in ((64, 56), (128, 28), (256, 14), (512, 7))]
        cases.append((f"linear {args.batch * 197}x384->1536", _linear_case(args.batch * 197, 384, 1536, args.M)))
    rows = []
    for label, variants in cases:
        fwd, both = _measure(variants, args.repeats)
        for mode, t in (("fwd", fwd), ("fwd+bwd", both)):
            rows.append([label, mode, *(f"{t[k] * 1e3:.2f}" for k in ("dense narrow", "dense wide", "SAS", "reference")),
                         f"{t['SAS'] / t['dense wide']:.2f}", f"{t['SAS'] / t['dense narrow']:.2f}",
                         f"{t['SAS'] / t['reference']:.2f}"])
    headers = ["layer", "pass", "narrow ms", "wide ms", "SAS ms", "reference ms", "SAS/wide", "SAS/narrow", "SAS/ref"]
    print(f"M={args.M}, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return rows


if __name__ == "__main__":
    main()
