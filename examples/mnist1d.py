"""Dense vs SAS vs SWS at equal mults: a small 1-D CNN on MNIST-1D, several seeds each.

The paper's claim (BRIEF section 4): at unchanged mults, SAS accuracy rises with M and beats
SWS (a sqrt(M)-wide network with 1:M sparse weights). This example trains the same 1-D CNN
(three strided Conv1d + ReLU, a Linear head) on MNIST-1D, generated offline by the
``mnist1d`` package (published baselines: logistic ~32%, MLP ~68%, CNN ~94%), as

- ``dense``: the base network;
- ``SAS scratch``: ``sas_compile.sasify`` of the freshly initialised dense network, trained
  with the same steps, optimiser and schedule;
- ``SAS converted``: ``sasify`` of the trained dense network (function-preserving: it starts
  at the dense accuracy), then fine-tuned; ``dense +ft`` fine-tunes the dense network for
  the same extra steps, so the comparison is at equal training;
- ``SWS scratch``: ``sas_compile.swsify`` of the dense network (fresh sqrt(M)-wide weights,
  1:M masks), trained like the others.

Mults and parameters come from ``sas_compile.report`` (SWS from its SWS columns); the
parameters of the models actually built are counted too, and a mismatch is printed.
The first convolution reads the raw signal and stays dense in SAS (the reference code's
policy); ``swsify`` widens its output and, with its default ``dense_input_layers=True``,
keeps its weight dense too. ``--conv 2d`` writes the same network with ``Conv2d`` kernels of height 1 (for versions of
``swsify`` that cannot widen ``Conv1d``; a warning says when SWS was not built).

Run:
    python examples/mnist1d.py            # 3 seeds, 3000 steps (+1500 fine-tune), M = 2, 4, 8
    python examples/mnist1d.py --quick    # 2 seeds, 150 steps, 2000 samples: under 2 minutes
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import textwrap
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile

HERE = os.path.dirname(os.path.abspath(__file__))
# this file shares its name with the mnist1d package: run as a script, its folder must not shadow it
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == HERE:
    sys.path.pop(0)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3000, help="training steps of every from-scratch run")
    p.add_argument("--finetune-steps", type=int, default=None, help="after conversion (default steps // 2)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2, help="Adam, cosine decay to 0 over the run")
    p.add_argument("--finetune-lr", type=float, default=None, help="default lr / 3")
    p.add_argument("--samples", type=int, default=5000, help="generated sequences (80%% train, 20%% test)")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--conv", default="1d", choices=["1d", "2d"],
                   help="2d: the same CNN written with Conv2d kernels of height 1")
    p.add_argument("--Ms", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for a network this small on a loaded 2-core CPU)")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the PNG plot")
    p.add_argument("--cache", default=tempfile.gettempdir(), help="folder caching the generated data")
    p.add_argument("--quick", action="store_true", help="2 seeds, 150 steps, 2000 samples")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.samples = 2, 150, 2000
    if args.finetune_steps is None:
        args.finetune_steps = args.steps // 2
    if args.finetune_lr is None:
        args.finetune_lr = args.lr / 3
    for m in args.Ms:
        if m < 2 or m & (m - 1):
            p.error(f"--Ms: M={m} is not a power of two >= 2 (try 2 4 8)")
    if args.seeds < 1 or args.steps < 1:
        p.error("--seeds and --steps must be >= 1")
    return args


def make_data(samples: int, cache: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """MNIST-1D with the package's default settings, generated locally (never downloaded)."""
    path = os.path.join(cache, f"sas_compile_mnist1d_{samples}.npz") if cache else None
    if path and os.path.exists(path):
        arrays = dict(np.load(path))
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        config = get_dataset_args()
        config.num_samples = samples
        data = make_dataset(config)  # procedural generation; get_dataset() would download
        arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        if path:
            os.makedirs(cache, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
    return {
        "x": torch.tensor(arrays["x"], dtype=torch.float32).unsqueeze(1),
        "y": torch.tensor(arrays["y"], dtype=torch.int64),
        "x_test": torch.tensor(arrays["x_test"], dtype=torch.float32).unsqueeze(1),
        "y_test": torch.tensor(arrays["y_test"], dtype=torch.int64),
    }


def make_cnn(channels: int = 32, length: int = 40, num_classes: int = 10, conv: str = "1d") -> nn.Sequential:
    """Three strided 1-D convs with ReLU and a linear classifier (the MNIST-1D CNN shape).

    ``conv="2d"`` writes the same network with ``Conv2d`` kernels of height 1, for inputs of
    shape ``(batch, 1, 1, length)``: the same function class and the same costs.
    """
    out_len = length
    for _ in range(3):
        out_len = (out_len + 1) // 2
    if conv == "1d":
        layer = nn.Conv1d
        k = lambda n: n  # noqa: E731
        pad = lambda n: n  # noqa: E731
        stride = 2
    elif conv == "2d":
        layer = nn.Conv2d
        k = lambda n: (1, n)  # noqa: E731
        pad = lambda n: (0, n)  # noqa: E731
        stride = (1, 2)
    else:
        raise ValueError(f"conv={conv!r}: expected '1d' or '2d'")
    return nn.Sequential(
        layer(1, channels, k(5), stride=stride, padding=pad(2)), nn.ReLU(),
        layer(channels, channels, k(3), stride=stride, padding=pad(1)), nn.ReLU(),
        layer(channels, channels, k(3), stride=stride, padding=pad(1)), nn.ReLU(),
        nn.Flatten(), nn.Linear(channels * out_len, num_classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    acc = (model(x).argmax(-1) == y).float().mean().item()
    model.train(was)
    return acc


def train(model: nn.Module, data, steps: int, lr: float, batch: int, seed: int, desc: str,
          progress: bool) -> nn.Module:
    """Adam with cosine decay on random mini-batches; the batch order depends on ``seed`` only."""
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    n = data["x"].shape[0]
    model.train()
    bar = tqdm(range(steps), desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for step in bar:
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = F.cross_entropy(model(data["x"][idx]), data["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return model


def count_params(model: nn.Module) -> int:
    """Trainable parameters of a built model (SWS: the dense storage, zeros included)."""
    return sum(p.numel() for p in model.parameters())


def costs_from_report(model: nn.Module, example: torch.Tensor, Ms) -> Dict[str, Dict[str, int]]:
    """Mults/params per configuration name, read from ``sas_compile.report`` for one sequence."""
    totals = sas_compile.report(model, example, M=tuple(Ms)).to_dict()["totals"]
    costs = {"dense": dict(totals["base"])}
    for m in Ms:
        costs[f"SAS M={m}"] = dict(totals["sas"][m])
        costs[f"SWS M={m}"] = dict(totals["sws"][m])
    return costs


def _stats(values: List[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Train every configuration for every seed; returns accuracies and costs."""
    data = make_data(args.samples, args.cache)
    if args.conv == "2d":
        data = {k: v.unsqueeze(2) if k.startswith("x") else v for k, v in data.items()}
    example = data["x"][:1]
    costs = costs_from_report(make_cnn(args.channels, conv=args.conv), example, args.Ms)
    not_widened: Dict[int, str] = {}
    progress = not args.no_progress
    acc: Dict[str, List[float]] = {}
    params_built: Dict[str, int] = {}
    start_of_finetune: Dict[str, List[float]] = {}

    def record(name, model, value, cost_key):
        acc.setdefault(name, []).append(value)
        params_built.setdefault(cost_key, count_params(model))

    for seed in range(args.seeds):
        torch.manual_seed(seed)
        init = make_cnn(args.channels, conv=args.conv)
        dense = train(copy.deepcopy(init), data, args.steps, args.lr, args.batch, seed, f"seed {seed} dense", progress)
        record("dense", dense, accuracy(dense, data["x_test"], data["y_test"]), "dense")
        dense_ft = train(copy.deepcopy(dense), data, args.finetune_steps, args.finetune_lr, args.batch, seed + 1000,
                         f"seed {seed} dense +ft", progress)
        record("dense +ft", dense_ft, accuracy(dense_ft, data["x_test"], data["y_test"]), "dense")
        for m in args.Ms:
            sas = train(sas_compile.sasify(init, M=m), data, args.steps, args.lr, args.batch, seed,
                        f"seed {seed} SAS M={m} scratch", progress)
            record(f"SAS scratch M={m}", sas, accuracy(sas, data["x_test"], data["y_test"]), f"SAS M={m}")

            converted = sas_compile.sasify(dense, M=m)
            start_of_finetune.setdefault(f"M={m}", []).append(
                accuracy(converted, data["x_test"], data["y_test"]) - acc["dense"][-1])
            converted = train(converted, data, args.finetune_steps, args.finetune_lr, args.batch, seed + 1000,
                              f"seed {seed} SAS M={m} converted +ft", progress)
            record(f"SAS converted M={m}", converted, accuracy(converted, data["x_test"], data["y_test"]), f"SAS M={m}")

            torch.manual_seed(seed)
            sws = sas_compile.swsify(init, M=m, example_inputs=example)
            if not any(hasattr(mod, "parametrizations") for mod in sws.modules()):
                reasons = getattr(getattr(sws, "sws_widths", None), "reasons", {}) or {}
                not_widened[m] = "; ".join(sorted({str(r) for r in reasons.values()}))[:300] or "no reason given"
            sws = train(sws, data, args.steps, args.lr, args.batch, seed, f"seed {seed} SWS M={m} scratch", progress)
            record(f"SWS scratch M={m}", sws, accuracy(sws, data["x_test"], data["y_test"]), f"SWS M={m}")
    return {"acc": acc, "costs": costs, "params_built": params_built, "start_of_finetune_delta": start_of_finetune,
            "sws_not_widened": not_widened}


def _rows(result: Dict[str, Any], Ms) -> List[Dict[str, Any]]:
    names = ["dense", "dense +ft"]
    for m in Ms:
        names += [f"SAS scratch M={m}", f"SAS converted M={m}", f"SWS scratch M={m}"]
    rows = []
    for name in names:
        kind, m = name.split(" ")[0], name.rsplit("=", 1)[-1] if "M=" in name else None
        cost_key = "dense" if kind == "dense" else f"{kind} M={m}"
        cost = result["costs"][cost_key]
        stats = _stats(result["acc"][name])
        rows.append({
            "config": name, "M": int(m) if m else 1, "mults": cost["mults"], "params": cost["params"],
            "nonzero_params": cost.get("nonzero_params", cost["params"]),
            "params_built": result["params_built"][cost_key],
            "acc_mean": stats["mean"], "acc_std": stats["std"], "accs": result["acc"][name],
        })
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Markdown table: test accuracy (mean ± std over seeds) against mults and params."""
    from tabulate import tabulate

    body = [[r["config"], f"{r['mults']:,}", f"{r['params']:,}", f"{r['nonzero_params']:,}", f"{r['params_built']:,}",
             f"{100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f}",
             " ".join(f"{100 * a:.1f}" for a in r["accs"])] for r in rows]
    headers = ["config", "mults (report)", "params (report)", "nonzero params", "params (built)",
               "test acc % (mean ± std)", "per seed"]
    return tabulate(body, headers, tablefmt="github", colalign=("left",) + ("right",) * 6)


def plot(rows: List[Dict[str, Any]], Ms, path: str, title: str) -> str:
    """Accuracy vs M: SAS (scratch, converted) and SWS lines with std bars, dense reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["config"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, prefix, style in (("SAS from scratch", "SAS scratch", "o-"),
                                 ("SAS converted + fine-tune", "SAS converted", "s--"),
                                 ("SWS from scratch", "SWS scratch", "^-")):
        mean = [100 * by[f"{prefix} M={m}"]["acc_mean"] for m in Ms]
        std = [100 * by[f"{prefix} M={m}"]["acc_std"] for m in Ms]
        ax.errorbar(Ms, mean, yerr=std, fmt=style, capsize=3, label=label)
    for name, style in (("dense", "k-"), ("dense +ft", "k:")):
        ax.axhline(100 * by[name]["acc_mean"], color="k", linestyle=style[1:], linewidth=1,
                   label=f"{name} ({100 * by[name]['acc_mean']:.1f}%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(Ms))
    ax.set_xticklabels([str(m) for m in Ms])
    ax.set_xlabel("M (slots per value; SWS: 1:M weights, sqrt(M) wider)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the experiment, print the table, save the plot; returns rows, plot path and settings."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        result = run(args)
    finally:
        torch.set_num_threads(threads)
    rows = _rows(result, args.Ms)
    setting = (f"MNIST-1D ({int(args.samples * 0.8)} train / {args.samples - int(args.samples * 0.8)} test), "
               f"CNN ({args.conv} convs) {args.channels} channels, {args.seeds} seeds, {args.steps} steps "
               f"(+{args.finetune_steps} fine-tune), batch {args.batch}, Adam lr {args.lr:g} cosine")
    print(f"\n{setting}; mults and params per sequence of 40")
    print(format_table(rows))
    for m, deltas in result["start_of_finetune_delta"].items():
        print(f"SAS converted {m}: accuracy right after sasify minus dense accuracy = "
              f"{max(abs(d) for d in deltas):.3g} (function-preserving conversion)")
    for m, why in result["sws_not_widened"].items():
        print(f"WARNING: swsify(M={m}) widened no layer of this network, so 'SWS scratch M={m}' is the dense "
              f"network retrained, not SWS ({why})")
    for r in rows:
        if r["params"] != r["params_built"]:
            print(f"note: {r['config']}: report says {r['params']:,} params, the built model has "
                  f"{r['params_built']:,}")
    path = plot(rows, args.Ms, os.path.join(args.out, "mnist1d_accuracy_vs_M.png"), setting)
    print(f"plot: {path}  ({time.time() - t0:.0f} s)")
    return {"rows": rows, "plot": path, "setting": setting, "seconds": time.time() - t0,
            "sws_not_widened": result["sws_not_widened"],
            "start_of_finetune_delta": result["start_of_finetune_delta"]}


if __name__ == "__main__":
    main()
