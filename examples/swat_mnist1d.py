"""Dense vs SWAT (80% and 90% sparse weights and activations) on MNIST-1D, over seeds.

MNIST-1D is generated offline by the ``mnist1d`` package (4000 training and 1000 test
sequences of length 40, 10 classes; its published baselines: logistic ~32%, MLP ~68%,
CNN ~94%). The model is a small 1-D CNN; each configuration trains from the same
initialisation per seed with Adam, and the test accuracy is measured in eval mode (SWAT
layers then run with their sparse weights). The first conv reads the raw signal and stays
dense (``distribution="uniform"``).

Run:
    python examples/swat_mnist1d.py             # 3 seeds, 3000 steps
    python examples/swat_mnist1d.py --quick     # 2 seeds, 300 steps, 1000 samples
"""
from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--samples", type=int, default=5000, help="generated sequences (80%% train)")
    p.add_argument("--period", type=int, default=50, help="SWAT threshold refresh period")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9])
    p.add_argument("--structure", default="unstructured", choices=["unstructured", "channel"])
    p.add_argument("--distribution", default="uniform", choices=["uniform", "erk"])
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="2 seeds, 300 steps, 1000 samples")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.samples, args.period = 2, 300, 1000, 20
    return args


def make_data(samples: int) -> Dict[str, torch.Tensor]:
    """MNIST-1D, generated procedurally (no download), with the package's default settings."""
    mnist1d_data = _import_mnist1d_data()
    get_dataset_args, make_dataset = mnist1d_data.get_dataset_args, mnist1d_data.make_dataset
    config = get_dataset_args()
    config.num_samples = samples
    data = make_dataset(config)
    return {
        "x": torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1),
        "y": torch.tensor(data["y"], dtype=torch.int64),
        "x_test": torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1),
        "y_test": torch.tensor(data["y_test"], dtype=torch.int64),
    }


def _import_mnist1d_data():
    """``mnist1d.data`` from the installed package, not this folder's ``mnist1d.py`` example."""
    here = os.path.dirname(os.path.abspath(__file__))
    shadow = sys.modules.get("mnist1d")
    if shadow is not None and not hasattr(shadow, "__path__"):
        del sys.modules["mnist1d"]
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        return importlib.import_module("mnist1d.data")
    finally:
        sys.path[:] = saved
        if shadow is not None and not hasattr(shadow, "__path__"):
            sys.modules.setdefault("mnist1d", shadow)


def make_cnn(channels: int, length: int = 40) -> nn.Module:
    """Three strided 1-D convs and a linear classifier."""
    out_len = length
    for _ in range(3):
        out_len = (out_len + 1) // 2
    return nn.Sequential(
        nn.Conv1d(1, channels, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * out_len, 10),
    )


def train_and_test(model: nn.Module, data, args, seed: int, progress=None) -> float:
    """Train with Adam on random mini-batches; returns the test accuracy (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    n = data["x"].shape[0]
    model.train()
    for _ in range(args.steps):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data["x"][idx]), data["y"][idx]).backward()
        opt.step()
        if progress is not None:
            progress.update(1)
    model.eval()
    with torch.no_grad():
        pred = model(data["x_test"]).argmax(1)
    return float((pred == data["y_test"]).float().mean())


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, object]]:
    """Train every configuration for every seed; print the table, return the accuracies."""
    from tabulate import tabulate
    from tqdm import tqdm

    from sas_compile.swat import swatify

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = make_data(args.samples)
    configs = [("dense", None)] + [(f"SWAT {round(s * 100)}%", s) for s in args.sparsities]
    results: Dict[str, Dict[str, object]] = {name: {"sparsity": s or 0.0, "accuracies": []}
                                             for name, s in configs}
    total = args.seeds * len(configs) * args.steps
    with tqdm(total=total, disable=args.no_progress, desc="training") as progress:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            base = make_cnn(args.channels)
            for name, sparsity in configs:
                model = base if sparsity is None else swatify(
                    base, sparsity=sparsity, structure=args.structure,
                    distribution=args.distribution, period=args.period)
                # the dense run trains a copy: every configuration starts from `base`
                model = _copy(model) if sparsity is None else model
                acc = train_and_test(model, data, args, seed, progress)
                results[name]["accuracies"].append(acc)
    for r in results.values():
        accs = r["accuracies"]
        r["mean"] = statistics.fmean(accs)
        r["std"] = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"MNIST-1D, {args.samples} samples, {args.seeds} seeds, {args.steps} steps, "
          f"structure={args.structure}, distribution={args.distribution}, period={args.period}")
    print(tabulate([[name, f"{100 * r['mean']:.1f} +- {100 * r['std']:.1f}",
                     " ".join(f"{100 * a:.1f}" for a in r["accuracies"])]
                    for name, r in results.items()],
                   headers=["config", "test accuracy %", "per seed"]))
    return results


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    main()
