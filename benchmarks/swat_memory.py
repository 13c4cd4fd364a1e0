"""SWAT memory and time per training step, measured: dense vs SWAT on a CIFAR-size ResNet-18.

What is measured, per configuration (dense, SWAT 80% and 90% unstructured, SWAT 90% channel):

* ``saved``: bytes of the distinct storages autograd holds for the backward pass, caught with
  ``torch.autograd.graph.saved_tensors_hooks`` during the forward (parameters excluded: the
  model holds them anyway);
* ``by layers``: the part of it saved while a conv/linear layer ran (the dense input, or the
  SWAT values + bitmask);
* ``layers only``: storages that no other op saved too. In a ResNet a conv's input is the
  output of a ReLU, which saves its own output for its backward: that tensor stays alive
  whatever the conv keeps, so only this column is memory SWAT can free;
* rows "torch ReLU" keep ``nn.ReLU`` (``swatify(relu_bitmask=False)``); the others use
  swatify's default, ReLUs that save a 1-bit mask instead of their output ("dense, bitmask
  ReLU" is ``swatify(sparsity=0)``: dense layers, only the ReLUs swapped);
* ``step``: median wall time of a full training step (forward, backward, SGD update).

Run:
    python benchmarks/swat_memory.py              # batch 32, 5 timed steps each
    python benchmarks/swat_memory.py --quick      # a smoke run (width 16, batch 4)
    python benchmarks/swat_memory.py --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from sas_compile.models import resnet18
from sas_compile.swat import SWATLayer, swatify

CONFIGS = [
    ("dense", None),
    ("dense, bitmask ReLU", dict(sparsity=0.0)),
    ("SWAT 80% unstructured, torch ReLU", dict(sparsity=0.8, relu_bitmask=False)),
    ("SWAT 90% unstructured, torch ReLU", dict(sparsity=0.9, relu_bitmask=False)),
    ("SWAT 80% unstructured", dict(sparsity=0.8, structure="unstructured")),
    ("SWAT 90% unstructured", dict(sparsity=0.9, structure="unstructured")),
    ("SWAT 80% channel", dict(sparsity=0.8, structure="channel")),
    ("SWAT 90% channel", dict(sparsity=0.9, structure="channel")),
]
_LAYERS = (nn.Conv2d, nn.Linear, SWATLayer)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=int, default=64, help="ResNet-18 base width (64 = standard)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    p.add_argument("--period", type=int, default=100, help="SWAT threshold refresh period")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 gives steadier timings on a shared machine)")
    p.add_argument("--quick", action="store_true", help="width 16, batch 4, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.steps = 4, 16, 2
    return args


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Dict[str, int]:
    """Saved-for-backward bytes of one forward: all, saved inside layers, saved only by layers."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: Dict[int, int] = {}
    savers: Dict[int, set] = {}
    current: List[str] = []

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            sizes[s.data_ptr()] = s.nbytes()
            savers.setdefault(s.data_ptr(), set()).add("layer" if current else "other")
        return t

    def enter(*_):
        current.append(1)

    def leave(*_):
        current.pop()

    hooks = []
    for m in model.modules():
        if isinstance(m, _LAYERS) and not any(isinstance(c, _LAYERS) for c in m.children()):
            hooks.append(m.register_forward_pre_hook(enter))
            hooks.append(m.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(x), y)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {
        "saved": sum(sizes.values()),
        "by_layers": sum(sizes[p] for p, who in savers.items() if "layer" in who),
        "layers_only": sum(sizes[p] for p, who in savers.items() if who == {"layer"}),
    }


def step_times(models: List[nn.Module], x: torch.Tensor, y: torch.Tensor, steps: int) -> List[float]:
    """Median seconds of a training step per model, timed round-robin after a warm-up step.

    Round-robin: every model sees the same machine state (load, clocks) across the run.
    """
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    times: List[List[float]] = [[] for _ in models]
    for i in range(steps + 1):
        for model, opt, record in zip(models, opts, times):
            if x.is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if x.is_cuda:
                torch.cuda.synchronize()
            if i:
                record.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, object]]:
    """Run every configuration and print the table; returns its rows."""
    args = parse_args(argv)
    from tabulate import tabulate

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = resnet18(num_classes=10, cifar=True, width=args.width).to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    models = [base if kwargs is None else swatify(base, period=args.period, **kwargs)
              for _, kwargs in CONFIGS]
    rows = []
    for (name, _), model in zip(CONFIGS, models):
        model.train()
        rows.append({"config": name, **saved_bytes(model, x, y)})
    for row, seconds in zip(rows, step_times(models, x, y, args.steps)):
        row["step_s"] = seconds
    dense = rows[0]
    mib = 1 / 2**20
    table = [[r["config"], f"{r['saved'] * mib:.2f}", f"{r['saved'] / dense['saved']:.3f}",
              f"{r['by_layers'] * mib:.2f}", f"{r['by_layers'] / dense['by_layers']:.3f}",
              f"{r['layers_only'] * mib:.2f}", f"{r['step_s'] * 1e3:.0f}",
              f"{r['step_s'] / dense['step_s']:.2f}"] for r in rows]
    print(f"ResNet-18 (CIFAR stem, width {args.width}), batch {args.batch}, 32x32, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.steps} steps")
    print(tabulate(table, headers=["config", "saved MiB", "x dense", "by layers MiB", "x dense",
                                   "layers only MiB", "step ms", "x dense"]))
    return rows


if __name__ == "__main__":
    main()
