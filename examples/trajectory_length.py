"""Trajectory length of random deep networks: dense vs SAS vs SWS at equal mults (paper section 3).

Raghu et al. (2017) measure expressivity by mapping a 1-D trajectory through a random
network and measuring its arc length at every layer: the faster it grows with depth, the
more the network bends its input space. The SAS paper argues that at the same mult budget
the length grows faster with depth for SAS than for SWS. Here the input is the unit circle
``(cos t, sin t)`` in 2-D, sampled at ``--points`` values of ``t``, through

- ``dense``: ``Linear(2, w)``, then ``depth - 1`` blocks ``ReLU -> Linear(w, w)``, then a
  ``ReLU -> Linear(w, 2)`` head that is not measured;
- ``SAS M``: the same, with every layer after the first a ``sas_compile.layers.SASLinear``
  with fresh random wide weights (its projection replaces the ReLU, as ``sasify`` folds it);
- ``SWS M``: ``sas_compile.swsify`` of the dense network (sqrt(M) times wider, 1:M weights;
  the input layer is widened and, by swsify's default, keeps a dense weight), with fresh
  random weights.

Weights are Gaussian with standard deviation ``sigma_w / sqrt(fan_in)`` (SAS: the narrow
fan-in, one slot of M is nonzero; SWS: the masked weight is rescaled to the energy of a
dense row, since the 1:M mask keeps the largest of M draws), biases Gaussian with standard
deviation ``sigma_b`` (without biases both ReLU and the projection are positively
homogeneous, so sigma_w would only rescale every length by sigma_w**depth). Measured at each layer's output
(pre-activation): ``length`` (the arc length, Raghu's quantity) and ``shape`` (arc length
over the trajectory's mean distance from its centre: 2*pi for a circle or any scaled copy of
it, larger when the curve folds; it removes the growth of the overall scale, which differs
between ReLU, which drops half the energy, and the SAS projection, which keeps it).
Mults per input point come from ``sas_compile.report`` of the dense network.

For M >= 4 the sign-pattern index rule makes a SAS layer discontinuous (a value's slot
depends on the signs of its group neighbours, so its contribution jumps between weight
columns when a neighbour crosses zero): the curve tears, its measured length includes the
jumps and grows with ``--points``. For M = 2 (and dense, SWS) the map is continuous.

Run:
    python examples/trajectory_length.py           # depth 10, width 32, 5 draws, sigma_w 2 and 4
    python examples/trajectory_length.py --quick   # depth 5, width 16, 2 draws
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import sas_compile
from sas_compile.layers import SASLinear

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=10, help="measured layers")
    p.add_argument("--width", type=int, default=32, help="dense and SAS width (SWS: sqrt(M) times wider)")
    p.add_argument("--Ms", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--sigmas", type=float, nargs="+", default=[2.0, 4.0], help="weight scale sigma_w")
    p.add_argument("--sigma-b", type=float, default=1.0, help="bias standard deviation")
    p.add_argument("--draws", type=int, default=5, help="random networks per configuration")
    p.add_argument("--points", type=int, default=2000, help="samples along the circle")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the PNG plot")
    p.add_argument("--quick", action="store_true", help="depth 5, width 16, 2 draws, 500 points")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.width, args.draws, args.points = 5, 16, 2, 500
    for m in args.Ms:
        if m < 2 or m & (m - 1):
            p.error(f"--Ms: M={m} is not a power of two >= 2 (try 2 4 8)")
    if args.depth < 2 or args.width < 1 or args.draws < 1 or args.points < 3:
        p.error("need --depth >= 2, --width >= 1, --draws >= 1, --points >= 3")
    return args


def circle(points: int) -> torch.Tensor:
    """The unit circle in 2-D, ``points`` samples, closed (the first point is repeated last)."""
    t = torch.linspace(0, 2 * math.pi, points + 1, dtype=torch.float64)
    return torch.stack([t.cos(), t.sin()], dim=1)


def dense_net(width: int, depth: int) -> nn.Sequential:
    """``depth`` measured Linear layers with ReLU between them, plus a 2-output head."""
    layers: List[nn.Module] = [nn.Linear(2, width)]
    for _ in range(depth - 1):
        layers += [nn.ReLU(), nn.Linear(width, width)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(width, 2))


def sas_net(width: int, depth: int, M: int) -> nn.Sequential:
    """The dense net's SAS version: the input layer stays dense, the projection replaces each ReLU."""
    layers: List[nn.Module] = [nn.Linear(2, width)]
    layers += [SASLinear(width, width, M=M) for _ in range(depth - 1)]
    return nn.Sequential(*layers, SASLinear(width, 2, M=M))


def weight_layers(model: nn.Module) -> List[nn.Module]:
    """The network's Linear / SASLinear modules in forward order (Sequential order)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, SASLinear))]


@torch.no_grad()
def randomize(model: nn.Module, sigma_w: float, sigma_b: float, generator: torch.Generator) -> None:
    """Gaussian weights of std ``sigma_w / sqrt(fan_in)``, biases of std ``sigma_b``; see the module docstring."""
    for layer in weight_layers(model):
        fan_in = layer.in_features
        if hasattr(layer, "parametrizations"):
            # SWS: draw, then rescale so the 1:M masked weight has a dense row's expected energy
            original = layer.parametrizations.weight.original
            original.copy_(torch.randn(original.shape, generator=generator, dtype=original.dtype))
            layer.parametrizations.weight[0].train()  # drop any cached mask
            masked = layer.weight
            target = sigma_w ** 2 * layer.out_features
            original.mul_(math.sqrt(target / masked.pow(2).sum().item()))
        else:
            w = layer.weight
            w.copy_(torch.randn(w.shape, generator=generator, dtype=w.dtype) * sigma_w / math.sqrt(fan_in))
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=generator, dtype=layer.bias.dtype) * sigma_b)


@torch.no_grad()
def layer_outputs(model: nn.Module, x: torch.Tensor, depth: int) -> List[torch.Tensor]:
    """Outputs of the first ``depth`` weight layers (pre-activations), via forward hooks."""
    outs: List[torch.Tensor] = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: outs.append(out.detach()))
             for layer in weight_layers(model)[:depth]]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    if len(outs) != depth:
        raise RuntimeError(f"expected {depth} measured layers, the forward pass produced {len(outs)}")
    return outs


def trajectory_metrics(z: torch.Tensor) -> Dict[str, float]:
    """Arc length of the sampled curve ``z`` (points x features) and its scale-free ``shape``."""
    z = z.double()
    length = (z[1:] - z[:-1]).norm(dim=1).sum().item()
    radius = (z[:-1] - z[:-1].mean(0)).norm(dim=1).mean().item()
    return {"length": length, "shape": length / radius if radius > 0 else float("nan")}


def build(kind: str, M: int, args) -> nn.Module:
    """A network of the given kind ("dense", "SAS", "SWS"), float64, eval mode."""
    if kind == "dense":
        model = dense_net(args.width, args.depth)
    elif kind == "SAS":
        model = sas_net(args.width, args.depth, M)
    else:
        dense = dense_net(args.width, args.depth)
        model = sas_compile.swsify(dense, M=M, example_inputs=torch.randn(4, 2))
        widened = [w for w in weight_layers(model) if hasattr(w, "parametrizations")]
        if not widened:
            raise RuntimeError(f"swsify(M={M}) did not widen any layer of the MLP; cannot build SWS")
    return model.double().eval()


def run(args) -> Dict[str, Any]:
    """Lengths per configuration, sigma_w and layer: mean and std over random draws."""
    x = circle(args.points)
    configs = [("dense", 1)] + [("SAS", m) for m in args.Ms] + [("SWS", m) for m in args.Ms]
    results: Dict[float, Dict[str, Any]] = {}
    for sigma in args.sigmas:
        per_config = {}
        for kind, M in configs:
            name = "dense" if kind == "dense" else f"{kind} M={M}"
            model = build(kind, M, args)
            lengths, shapes = [], []
            for draw in range(args.draws):
                g = torch.Generator().manual_seed(1000 * draw + M)
                randomize(model, sigma, args.sigma_b, g)
                metrics = [trajectory_metrics(z) for z in layer_outputs(model, x, args.depth)]
                lengths.append([m["length"] for m in metrics])
                shapes.append([m["shape"] for m in metrics])
            per_config[name] = {
                "length": [statistics.fmean(c) for c in zip(*lengths)],
                "length_std": [statistics.stdev(c) if len(c) > 1 else 0.0 for c in zip(*lengths)],
                "shape": [statistics.fmean(c) for c in zip(*shapes)],
            }
        results[sigma] = per_config
    return results


def growth_per_layer(lengths: List[float]) -> float:
    """Geometric-mean length ratio between consecutive layers, from layer 1 to the last."""
    return (lengths[-1] / lengths[0]) ** (1.0 / (len(lengths) - 1))


def format_tables(results, costs, args) -> str:
    """One markdown table per sigma_w: length per layer, growth per layer, shape at the last layer."""
    from tabulate import tabulate

    shown = sorted(set([0, 1, args.depth // 2 - 1, args.depth - 1]) & set(range(args.depth)))
    text = []
    for sigma, per_config in results.items():
        rows = []
        for name, r in per_config.items():
            rows.append([name, f"{costs[name]['mults']:,}"] + [f"{r['length'][i]:.4g}" for i in shown]
                        + [f"{growth_per_layer(r['length']):.3f}", f"{r['shape'][0]:.2f}", f"{r['shape'][-1]:.2f}"])
        headers = (["network", "mults / point"] + [f"length L{i + 1}" for i in shown]
                   + ["growth / layer", "shape L1", f"shape L{args.depth}"])
        text.append(f"sigma_w = {sigma:g}, sigma_b = {args.sigma_b:g} (input circle length {2 * math.pi:.4f}; {args.draws} draws, "
                    f"width {args.width}, depth {args.depth})")
        text.append(tabulate(rows, headers, tablefmt="github", colalign=("left",) + ("right",) * (len(headers) - 1)))
    return "\n\n".join(text)


def plot(results, args, path: str) -> str:
    """Length per layer (log scale), one panel per sigma_w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    layers = list(range(1, args.depth + 1))
    for ax, (sigma, per_config) in zip(axes[0], results.items()):
        for name, r in per_config.items():
            style = "k-" if name == "dense" else ("o-" if name.startswith("SAS") else "^--")
            ax.plot(layers, r["length"], style, label=name, markersize=4)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("trajectory length")
        ax.set_title(f"sigma_w = {sigma:g}, width {args.width}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the analysis, print the tables, save the plot; returns lengths, costs and the plot path."""
    args = parse_args(argv)
    t0 = time.time()
    totals = sas_compile.report(dense_net(args.width, args.depth), torch.randn(1, 2), M=tuple(args.Ms)).to_dict()["totals"]
    costs = {"dense": totals["base"]}
    for m in args.Ms:
        costs[f"SAS M={m}"] = totals["sas"][m]
        costs[f"SWS M={m}"] = totals["sws"][m]
    results = run(args)
    print(format_tables(results, costs, args))
    path = plot(results, args, os.path.join(args.out, "trajectory_length.png"))
    print(f"plot: {path}  ({time.time() - t0:.0f} s)")
    return {"results": results, "costs": costs, "plot": path, "depth": args.depth}


if __name__ == "__main__":
    main()
