"""CPU inference of whole SAS models: ``torch.no_grad()`` against ``torch.inference_mode()``.

Under ``torch.inference_mode`` a SAS convolution whose wide weight has at least as many values as
its wide input runs oneDNN's convolution on the weight packed once per weight version
(``runtime/sas_ops.py``, ``_packed_cpu_weight``); under ``no_grad`` every call reorders the plain
weight first, as a dense PyTorch convolution does. The built-in models (``sas_compile.models``;
random weights) at a few batch sizes, each timed interleaved round-robin:

- dense: the unconverted model under ``inference_mode``;
- SAS no_grad / SAS inference_mode: ``sasify(model, M)`` under each mode (two copies of it: a
  call outside inference_mode frees a trainable layer's pack);

with the ratio of the two SAS columns, SAS against dense, the number of packed convolutions and
the size of their packed copies (held beside the weights while they live). Every figure is median
(min-max) over ``--repeats`` rounds.

Run: ``python benchmarks/cpu_inference.py [--M 2 4] [--repeats 9] [--quick]``.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import List

import torch
from tabulate import tabulate

import sas_compile
from sas_compile import models
from sas_compile.runtime import sas_ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_layers import _round_robin, ratio, spread  # noqa: E402  (the timing loop and figures cpu_layers prints)

CASES = [("resnet18", 1), ("resnet18", 8), ("resnet18-imagenet", 1), ("resnet50", 1)]
QUICK_CASES = [("resnet18", 1)]


def _packed(sas: torch.nn.Module, x: torch.Tensor):
    """(packed convolutions, MB of their packed copies) after one inference_mode call."""
    made = []
    real = sas_ops._packed_cpu_weight

    def spy(wide_x, weight, *args):
        out = real(wide_x, weight, *args)
        if out is not None:
            made.append(weight.numel() * weight.element_size())
        return out

    sas_ops._packed_cpu_weight = spy
    try:
        with torch.inference_mode():
            sas(x)
    finally:
        sas_ops._packed_cpu_weight = real
    return len(made), sum(made) / (1 << 20)


def run(name: str, batch: int, M: int, repeats: int) -> List[object]:
    factory, shape = models.BUILTIN_MODELS[name]
    torch.manual_seed(0)
    dense = factory().eval()
    x = torch.randn(batch, *shape[1:])
    sas = sas_compile.sasify(dense, M=M).eval()
    # a copy for each mode: a call outside inference_mode frees a trainable layer's pack (its
    # training would make it stale), so one model alternating between the two would repack
    packed_sas = copy.deepcopy(sas)

    def under(mode, model):
        def call():
            with mode():
                model(x)
        return call

    t = _round_robin({"dense": under(torch.inference_mode, dense), "no_grad": under(torch.no_grad, sas),
                      "inference_mode": under(torch.inference_mode, packed_sas)}, repeats)
    with torch.no_grad():
        plain = sas(x)
    with torch.inference_mode():
        packed_out = packed_sas(x)
    rel = ((packed_out - plain).norm() / plain.norm()).item()
    count, mb = _packed(packed_sas, x)
    sas_ops.clear_wide_weight_cache()  # drop this model's packs before the next one
    return [f"{name} x{batch}", M, spread(t["dense"]), spread(t["no_grad"]), spread(t["inference_mode"]),
            ratio(t["inference_mode"], t["no_grad"]), ratio(t["inference_mode"], t["dense"]), count,
            f"{mb:.1f}", f"{rel:.1e}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--M", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="one small case, to check the script runs")
    args = parser.parse_args(argv)
    rows = [run(name, batch, M, 2 if args.quick else args.repeats)
            for name, batch in (QUICK_CASES if args.quick else CASES) for M in args.M]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ms as median (min-max) of "
          f"{2 if args.quick else args.repeats} interleaved rounds")
    print(tabulate(rows, headers=["model", "M", "dense ms", "SAS no_grad ms", "SAS inference_mode ms",
                                  "inference_mode/no_grad", "SAS inference_mode/dense", "packed convs",
                                  "packed MB", "rel diff"], tablefmt="github"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
