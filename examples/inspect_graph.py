"""Inspect real architectures from ``transformers``: which layers become SAS, which stay dense, why.

The models are built from small configs with random weights (no download): a ResNet
(convolutions, residual adds, a linear classifier) and a ViT (a patch-embedding convolution,
attention and MLP linears). ``sas_compile.inspect_model`` captures each one (``torch.export``,
since ``symbolic_trace`` cannot trace these models), decides per conv/linear layer, and
returns the plan; this example prints it, writes the plan's Graphviz DOT picture (and an
SVG when the Graphviz ``dot`` program is installed) to ``--out``, and checks that
``sasify`` with the same options gives the same logits as the original model.

A ``filter_fn`` keeps the classifier dense, to show a second reason next to the input-layer
rule (the reference code's first convolution stays dense).

Run:
    python examples/inspect_graph.py               # resnet and vit, M=2
    python examples/inspect_graph.py --quick       # resnet only
    python examples/inspect_graph.py --arch vit --M 4
"""
from __future__ import annotations

import argparse
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import sas_compile
from sas_compile.layers import SAS_LAYERS

HERE = os.path.dirname(os.path.abspath(__file__))
ARCHS = ("resnet", "vit")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--M", type=int, default=2)
    p.add_argument("--size", type=int, default=32, help="input image height and width")
    p.add_argument("--keep-classifier-dense", action=argparse.BooleanOptionalAction, default=True,
                   help="filter_fn that keeps the classification head dense")
    p.add_argument("--out", default=os.path.join(HERE, "out"), help="folder for the DOT / SVG files")
    p.add_argument("--quick", action="store_true", help="resnet only")
    args = p.parse_args(argv)
    if args.quick:
        args.arch = ["resnet"]
    return args


def build(arch: str, size: int) -> nn.Module:
    """A small ``transformers`` model with random weights (configs only, nothing downloaded)."""
    import transformers

    if arch == "resnet":
        config = transformers.ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32],
                                           depths=[1, 1], layer_type="basic", num_labels=10)
        return transformers.ResNetForImageClassification(config).eval()
    if arch == "vit":
        config = transformers.ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, intermediate_size=64, num_labels=10)
        return transformers.ViTForImageClassification(config).eval()
    raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")


def keep_classifier_dense(module: Optional[nn.Module], fqn: str) -> bool:
    """filter_fn: False (stay dense) for the classification head."""
    return not fqn.startswith("classifier")


def write_picture(dot: str, out: str, stem: str) -> Tuple[str, Optional[str], str]:
    """Write ``stem.dot``; render ``stem.svg`` when Graphviz's ``dot`` program exists."""
    os.makedirs(out, exist_ok=True)
    dot_path = os.path.join(out, f"{stem}.dot")
    with open(dot_path, "w") as f:
        f.write(dot)
    if shutil.which("dot") is None:
        return dot_path, None, ("SVG not written: the Graphviz 'dot' program is not installed here "
                                f"(apt install graphviz, then: dot -Tsvg {dot_path} -o {stem}.svg)")
    from sas_compile.inspection import render_svg

    svg_path = render_svg(dot, os.path.join(out, f"{stem}.svg"))
    return dot_path, svg_path, f"SVG: {svg_path}"


def inspect_one(arch: str, args) -> Dict[str, Any]:
    """Inspect, picture and sasify one architecture; returns what it found."""
    model = build(arch, args.size)
    x = torch.randn(2, 3, args.size, args.size)
    filter_fn = keep_classifier_dense if args.keep_classifier_dense else None
    plan = sas_compile.inspect_model(model, (x,), M=args.M, filter_fn=filter_fn)
    print(f"\n== {arch}: {type(model).__name__}, input {tuple(x.shape)}")
    print(plan)
    converted = [layer.name for layer in plan.layers if layer.eligible]
    dense = {layer.name: layer.reason for layer in plan.layers if not layer.eligible}
    print(f"converted: {len(converted)} layers; stay dense: {len(dense)}")
    for name, reason in dense.items():
        print(f"  {name}: {reason}")
    dot_path, svg_path, svg_note = write_picture(plan.to_dot(), args.out, f"inspect_{arch}_M{args.M}")
    print(f"DOT: {dot_path}; {svg_note}")

    sas_model = sas_compile.sasify(model, M=args.M, example_inputs=(x,), filter_fn=filter_fn).eval()
    with torch.no_grad():
        ref, out = model(x).logits, sas_model(x).logits
    diff = (out - ref).abs().max().item()
    sas_layers = sum(isinstance(m, SAS_LAYERS) for m in sas_model.modules())
    print(f"sasify: {sas_layers} SAS layer modules; max |sasify(model)(x).logits - model(x).logits| = {diff:.3g} "
          f"(capture: {plan.capture})")
    return {"capture": plan.capture, "converted": converted, "dense": dense, "dot": dot_path, "svg": svg_path,
            "svg_note": svg_note, "max_abs_diff": diff, "sas_layer_modules": sas_layers, "layers": len(plan.layers)}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Inspect every requested architecture; returns a dict per architecture."""
    args = parse_args(argv)
    torch.manual_seed(0)
    return {arch: inspect_one(arch, args) for arch in args.arch}


if __name__ == "__main__":
    main()
