"""The ``sas-compile`` command line: mult/param reports and plan inspection for a model.

    sas-compile report [MODEL] --input-shape 1,3,224,224 --M 2 4 8 [--swat 0.8 0.9] [--format table|markdown|csv|json]
    sas-compile inspect [MODEL] --input-shape 1,3,32,32 --M 2 [--dot FILE] [--svg FILE] [--graph]

MODEL is a built-in name (``sas_compile.models.BUILTIN_MODELS``) or ``package.module:factory``;
without it the default is resnet18 at 1,3,32,32. A bad MODEL, shape or option prints one
line on stderr and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

__all__ = ["main", "parse_shape", "build_parser"]

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int64": "int64"}


class UsageError(Exception):
    """A user error: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump: the issue asks for a clear one-line error
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: give a depth >= 0")
    return value


def parse_shape(text: str) -> Tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; UsageError when malformed."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: expected positive ints separated by commas, e.g. 1,3,224,224")
    return shape


def build_parser() -> argparse.ArgumentParser:
    from .models import BUILTIN_MODELS, DEFAULT_MODEL

    parser = _Parser(
        prog="sas-compile",
        description="Structured Activation Sparsification (SAS): mult/parameter reports and plan inspection.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"sas-compile {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{report,inspect}", parser_class=_Parser)
    model_help = (f"built-in model ({', '.join(BUILTIN_MODELS)}) or package.module:factory, imported from the "
                  f"current directory or sys.path (default: {DEFAULT_MODEL})")

    def common(p):
        p.add_argument("model", nargs="?", default=None, metavar="MODEL", help=model_help)
        p.add_argument("--input-shape", action="append", default=None, metavar="SHAPE",
                       help="example input shape, e.g. 1,3,224,224 (repeat for several inputs; "
                            "default: the built-in model's)")
        p.add_argument("--input-dtype", choices=sorted(_DTYPES), default="float32",
                       help="dtype of the example inputs (int64 gives token ids 0/1)")
        p.add_argument("--no-inputs", action="store_true",
                       help="no example inputs: count mults per output position")
        p.add_argument("--convert-input-layers", action="store_true",
                       help="also convert layers that read the raw network input (kept dense by default)")
        p.add_argument("-o", "--output", metavar="FILE", help="write the result to FILE instead of stdout")

    rep = sub.add_parser("report", help="mult and parameter counts: base, SAS and SWS at several M")
    common(rep)
    rep.add_argument("--M", nargs="+", type=int, default=[2, 4, 8], metavar="M",
                     help="slots per value, powers of two >= 2 (default: 2 4 8)")
    rep.add_argument("--swat", nargs="+", type=float, default=None, metavar="SPARSITY",
                     help="also count SWAT training mults (forward, input and weight gradients) at these "
                          "sparsities in [0, 1), e.g. 0.8 0.9")
    rep.add_argument("--format", choices=["table", "markdown", "csv", "json"], default="table")
    rep.add_argument("--max-depth", type=_non_negative_int, default=None, help="nest the table at most this deep (>= 0)")
    rep.add_argument("--exact", action="store_true", help="exact counts in the table (default: 1.81G style)")
    rep.add_argument("--symbolic", action="store_true",
                     help="also give each layer's mults as a formula in the input sizes (slower)")

    ins = sub.add_parser("inspect", help="per-layer plan: eligibility, reasons, ReLU folding, mults; the graph")
    common(ins)
    ins.add_argument("--M", type=int, default=2, metavar="M", help="slots per value (default: 2)")
    ins.add_argument("--format", choices=["text", "json"], default="text")
    ins.add_argument("--graph", action="store_true", help="also print the FX code before and after the rewrite")
    ins.add_argument("--dot", metavar="FILE", help="write the graph as Graphviz DOT to FILE")
    ins.add_argument("--svg", metavar="FILE", help="render the graph to an SVG file (needs graphviz)")
    return parser


def _example_inputs(shapes: Sequence[Tuple[int, ...]], dtype_name: str):
    import torch

    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, _DTYPES[dtype_name])
    if dtype == torch.int64:
        return tuple(torch.randint(0, 2, s, generator=gen) for s in shapes)
    return tuple(torch.randn(s, generator=gen).to(dtype) for s in shapes)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _load(args):
    """(model, example inputs or None, label)."""
    import torch

    from .models import DEFAULT_MODEL, ModelSpecError, load_model

    try:
        model, default_shape = load_model(args.model)
    except ModelSpecError as exc:
        raise UsageError(str(exc)) from exc
    label = args.model or DEFAULT_MODEL
    if args.no_inputs:
        if args.input_shape:
            raise UsageError("--no-inputs and --input-shape contradict each other: give one")
        return model, None, label
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
    if shapes is None and default_shape is not None:
        shapes = [tuple(default_shape)]
    if shapes is None:
        return model, None, label
    inputs = _example_inputs(shapes, args.input_dtype)
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as exc:  # noqa: BLE001 - a shape the model rejects is a usage error
        shown = " ".join(",".join(map(str, s)) for s in shapes)
        raise UsageError(f"model {label!r} does not accept input shape {shown}: {_first_line(exc)}") from exc
    return model, inputs, label


def _emit(text: str, path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            f.write(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _run_report(args) -> int:
    from .passes.costs import check_M_values
    from .reporting import report

    try:
        Ms = check_M_values(args.M)
    except ValueError as exc:
        raise UsageError(f"--M: {exc}") from exc
    from .reporting import check_sparsities

    try:
        sparsities = check_sparsities(args.swat)
    except ValueError as exc:
        raise UsageError(f"--swat: {exc}") from exc
    model, inputs, _ = _load(args)
    from .passes.capture import shapes_from_real_runs

    with shapes_from_real_runs():  # the model is ours (random weights) and _load ran it already
        rep = report(model, inputs, M=Ms, dense_input_layers=not args.convert_input_layers, swat=sparsities or None,
                     symbolic=args.symbolic)
    if args.format == "table":
        text = rep.table(exact=args.exact, max_depth=args.max_depth)
    elif args.format == "markdown":
        text = rep.to_markdown(exact=True)
    elif args.format == "csv":
        text = rep.to_csv()
    else:
        text = rep.to_json()
    _emit(text, args.output)
    return 0


def _run_inspect(args) -> int:
    import json

    from .accounting import check_M_values
    from .inspection import inspect_model, render_svg

    try:
        (M,) = check_M_values(args.M)
    except ValueError as exc:
        raise UsageError(f"--M: {exc}") from exc
    model, inputs, _ = _load(args)
    plan = inspect_model(model, inputs, M=M, dense_input_layers=not args.convert_input_layers)
    if args.format == "json":
        text = json.dumps(plan.to_dict(), indent=2)
    else:
        text = str(plan)
        if args.graph:
            text += f"\n\n# graph before\n{plan.graph_before}\n# graph after\n{plan.graph_after}"
    _emit(text, args.output)
    dot = None
    if args.dot or args.svg:
        dot = plan.to_dot()
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(dot + "\n")
    if args.svg:
        render_svg(dot, args.svg)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage error, 1 failure)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `sas-compile` and `sas-compile --M 2 ...` mean `sas-compile report ...`
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["report"] + argv
    elif argv[0] not in ("report", "inspect", "-h", "--help", "--version"):
        argv = ["report"] + argv
    try:
        args = build_parser().parse_args(argv)
        if args.command == "inspect":
            return _run_inspect(args)
        return _run_report(args)
    except UsageError as exc:
        print(f"sas-compile: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0)
    except Exception as exc:  # noqa: BLE001 - one readable line, not a traceback
        print(f"sas-compile: error: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1


def run() -> None:
    """The ``sas-compile`` console entry: :func:`main`, then exit without interpreter teardown.

    Why: unloading torch takes about a second at exit; once the output is flushed and closed,
    nothing is left for that teardown to do.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    run()
