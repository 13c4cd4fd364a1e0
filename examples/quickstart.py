"""Quickstart: report a model's costs, sasify it, compile it with backend "sas", check outputs.

Every step uses only the public API:

1. ``sas_compile.report(model, x, M=(2, 4, 8))``: mults and params of the base model, its SAS
   version and the SWS baseline, per layer (where the mults go);
2. ``sas_compile.sasify(model, M=4)``: a function-preserving SAS model (same outputs until
   it is trained);
3. ``torch.compile(model, backend="sas", options={"M": 4})``: the same rewrite inside dynamo,
   for inference; a sasified model compiles too (its SAS layers are kept).

Run:
    python examples/quickstart.py            # inductor compiles the rest of the graph
    python examples/quickstart.py --quick    # inner="eager": no C++ compile, a few seconds
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
from torch import nn

import sas_compile


def make_model(channels: int = 16, num_classes: int = 10) -> nn.Module:
    """A small image CNN: three convs with ReLU, pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(2 * channels, num_classes),
    )


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", type=int, default=4, help="slots per value for sasify / compile")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=16, help="input height and width")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--inner", default="inductor", choices=["inductor", "eager", "aot_eager"],
                   help="what compiles the rest of the graph after the SAS rewrite")
    p.add_argument("--quick", action="store_true", help='inner="eager" (no C++ compilation)')
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.inner = "eager"
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the quickstart; returns the report totals and the max output differences."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model = make_model(args.channels).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)

    print("== 1. where the mults go: sas_compile.report(model, x, M=(2, 4, 8))")
    rep = sas_compile.report(model, x[:1], M=(2, 4, 8))
    print(rep)
    totals = rep.to_dict()["totals"]

    print(f"\n== 2. sas_compile.sasify(model, M={args.M}): function-preserving conversion")
    sas_model = sas_compile.sasify(model, M=args.M).eval()
    converted = [layer.name for layer in sas_model.sas_plan.layers if layer.eligible]
    dense = [(layer.name, layer.reason) for layer in sas_model.sas_plan.layers if not layer.eligible]
    print(f"converted to SAS: {converted}")
    for name, reason in dense:
        print(f"stays dense: {name}: {reason}")
    with torch.no_grad():
        ref = model(x)
        out_sasify = sas_model(x)
    diff_sasify = (out_sasify - ref).abs().max().item()
    print(f"max |sasify(model)(x) - model(x)| = {diff_sasify:.3g}")

    print(f'\n== 3. torch.compile(model, backend="sas", options={{"M": {args.M}, "inner": "{args.inner}"}})')
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"M": args.M, "inner": args.inner, "explain": True})
    with torch.no_grad():
        out_compiled = compiled(x)
    diff_compile = (out_compiled - ref).abs().max().item()
    print(f"max |compiled(x) - model(x)| = {diff_compile:.3g}")

    compiled_sas = torch.compile(sas_model, backend="sas", options={"M": args.M, "inner": args.inner})
    with torch.no_grad():
        out_compiled_sas = compiled_sas(x)
    diff_compiled_sas = (out_compiled_sas - ref).abs().max().item()
    print(f"max |compiled(sasify(model))(x) - model(x)| = {diff_compiled_sas:.3g}")

    base = totals["base"]
    print(f"\n== summary for one {args.size}x{args.size} image")
    print(f"base: {base['mults']:,} mults, {base['params']:,} params")
    for m in (2, 4, 8):
        sas, sws = totals["sas"][m], totals["sws"][m]
        print(f"M={m}: SAS {sas['mults']:,} mults ({sas['mults'] / base['mults']:.2f}x), {sas['params']:,} params "
              f"({sas['params'] / base['params']:.2f}x); SWS {sws['mults']:,} mults, {sws['params']:,} params "
              f"({sws['nonzero_params']:,} nonzero)")
    return {
        "totals": totals,
        "converted": converted,
        "dense": dense,
        "max_abs_diff": {"sasify": diff_sasify, "compile": diff_compile, "compile_sasified": diff_compiled_sas},
        "output_scale": ref.abs().max().item(),
    }


if __name__ == "__main__":
    main()
