"""Fill each layer's symbolic input/output shapes with formulas in the example inputs' sizes.

Why: a report should say how a layer's mults grow with batch, image size or sequence
length, not only the number for one input. Torch's dynamic-shape machinery (ShapeEnv +
FakeTensorMode) already derives every size as a sympy expression through strides,
padding, dilation, flattening and views, so we run the captured graph once on symbolic
fake inputs instead of writing a shape propagator of our own. Input dims get readable
names (batch, channels, height, width, seq, features); dims the graph pins (channels
matched by a weight) come out as plain numbers.

This is an analysis pass: it reads the GraphModule, leaves its nodes and ``meta`` alone,
and writes only ``LayerPlan.symbolic_input_shape`` / ``symbolic_output_shape``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import sympy
import torch
import torch.fx
import torch.utils._pytree as pytree

log = logging.getLogger(__name__)

__all__ = ["input_dim_names", "symbolic_node_shapes", "propagate_symbolic_shapes", "try_propagate_symbolic_shapes"]


def input_dim_names(x: torch.Tensor, index: int = 0) -> Tuple[str, ...]:
    """Readable names for the dims of the ``index``-th example input (suffix ``_i`` after the first)."""
    nd = x.dim()
    if nd == 4:
        names = ("batch", "channels", "height", "width")
    elif nd == 5:
        names = ("batch", "channels", "depth", "height", "width")
    elif nd == 3:
        names = ("batch", "seq", "features")
    elif nd == 2:
        integer = not (x.is_floating_point() or x.is_complex())
        names = ("batch", "seq") if integer else ("batch", "features")
    elif nd == 1:
        names = ("length",)
    else:
        names = tuple(f"dim{i}" for i in range(nd))
    if index:
        names = tuple(f"{n}_{index}" for n in names)
    return names


def _placeholder_values(gm: torch.fx.GraphModule, flat_inputs: Sequence[Any]) -> List[Tuple[Any, bool]]:
    """Match placeholders to values: (value, is_user_input). Params lifted by dynamo stay static."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) == len(flat_inputs):
        return [(v, True) for v in flat_inputs]
    out = []
    ids = {id(v) for v in flat_inputs}
    for node in placeholders:
        grapharg = node.meta.get("grapharg")
        example = getattr(grapharg, "example", None) if grapharg is not None else None
        if example is not None:
            out.append((example, id(example) in ids))
            continue
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor):
            # only its shape matters to shape propagation
            out.append((torch.zeros(tuple(int(s) for s in val.shape), dtype=val.dtype), False))
            continue
        raise ValueError(
            f"cannot match graph input {node.name!r} to an example input: the graph has "
            f"{len(placeholders)} inputs and {len(flat_inputs)} example values were given"
        )
    return out


def _shape_strings(shape, rename: Dict[sympy.Symbol, sympy.Symbol], env) -> Tuple[str, ...]:
    out = []
    for s in shape:
        if isinstance(s, torch.SymInt):
            expr = s.node.expr if env is None else env.simplify(s.node.expr)
            expr = expr.xreplace(rename)
            out.append(str(expr))
        else:
            out.append(str(int(s)))
    return tuple(out)


def _run_symbolic(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], nodes: Sequence[str], bump_batch: bool
):
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    flat, _ = pytree.tree_flatten(list(example_inputs))
    values = _placeholder_values(gm, flat)
    # no duck sizing: height == width must not merge into one symbol
    env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    rename: Dict[sympy.Symbol, sympy.Symbol] = {}
    actual: Dict[str, int] = {}
    args = []
    user_index = 0
    for value, is_user in values:
        if not isinstance(value, torch.Tensor):
            args.append(value)
            continue
        if not is_user:
            args.append(mode.from_tensor(value, static_shapes=True))
            continue
        names = input_dim_names(value, user_index)
        user_index += 1
        sizes = list(value.shape)
        # a size-1 dim would be specialised; the batch formula is linear, so trace at 2
        if bump_batch and value.dim() >= 2 and sizes[0] == 1:
            sizes[0] = 2
        dynamic = [DimDynamic.DYNAMIC if s > 1 else DimDynamic.STATIC for s in sizes]
        ctx = StatelessSymbolicContext(dynamic_sizes=dynamic)
        template = value.new_empty(sizes) if sizes != list(value.shape) else value
        fake = mode.from_tensor(template, symbolic_context=ctx)
        for d, s in enumerate(fake.shape):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                sym = sympy.Symbol(names[d], integer=True, positive=True)
                rename[s.node.expr] = sym
                actual[names[d]] = int(value.shape[d])
        args.append(fake)

    results: Dict[str, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            results[n.name] = result
            return result

    # run a fake copy: the user's modules (BatchNorm statistics included) are never touched
    from torch._dynamo.utils import deepcopy_to_fake_tensor

    fake_gm = deepcopy_to_fake_tensor(gm, mode)
    with mode:
        _Recorder(fake_gm, garbage_collect_values=False).run(*args)

    wanted = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for name in nodes:
        node = by_name.get(name)
        if node is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        inp, out = results.get(node.args[0].name), results.get(name)
        if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        wanted[name] = (_shape_strings(inp.shape, rename, env), _shape_strings(out.shape, rename, env))
    return wanted, actual


def _bumped(example_inputs: Sequence[Any]) -> Tuple[Any, ...]:
    """Inputs with a batch of 1 doubled (``cat([x, x])``: same values, valid token ids stay valid)."""
    out = []
    for x in example_inputs:
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == 1:
            x = torch.cat([x, x], 0)
        out.append(x)
    return tuple(out)


def _run_export(
    model: torch.nn.Module, gm: torch.fx.GraphModule, example_inputs: Sequence[Any], nodes: Sequence[str],
    bump_batch: bool,
):
    """Shapes from ``torch.export`` with every input dim dynamic (``Dim.AUTO``).

    A graph captured by a static export has sizes baked into its views and slices, so the
    fake-tensor run cannot make them symbolic; re-exporting with dynamic dims can. Layer
    nodes are matched by name and checked to call the same op on the same weight.
    """
    from torch.export import Dim

    inputs = _bumped(example_inputs) if bump_batch else tuple(example_inputs)
    dynamic = tuple({d: Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None for x in inputs)
    with torch.no_grad():
        ep = torch.export.export(model, inputs, dynamic_shapes=dynamic, strict=False)
    dyn = ep.module()
    rename: Dict[sympy.Symbol, sympy.Symbol] = {}
    actual: Dict[str, int] = {}
    env = None
    placeholders = [n for n in dyn.graph.nodes if n.op == "placeholder"]
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    for index, (node, x) in enumerate(zip(placeholders, tensors)):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        names = input_dim_names(x, index)
        for d, size in enumerate(val.shape):
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                if isinstance(size.node.expr, sympy.Symbol):
                    rename[size.node.expr] = sympy.Symbol(names[d], integer=True, positive=True)
                    actual[names[d]] = int(x.shape[d])
    ours = {n.name: n for n in dyn.graph.nodes}
    theirs = {n.name: n for n in gm.graph.nodes}
    wanted = {}
    for name in nodes:
        node, other = ours.get(name), theirs.get(name)
        if node is None or other is None or node.target != other.target or not node.args:
            continue
        if [getattr(a, "target", a) for a in node.args[1:2]] != [getattr(a, "target", a) for a in other.args[1:2]]:
            continue  # not the same weight: the two captures diverged here
        inp, out = node.args[0].meta.get("val"), node.meta.get("val")
        if not isinstance(inp, torch.Tensor) or not isinstance(out, torch.Tensor):
            continue
        wanted[name] = (_shape_strings(inp.shape, rename, env), _shape_strings(out.shape, rename, env))
    return wanted, actual


def _agrees(shape_strs: Sequence[str], shape: Optional[Sequence[int]], values: Dict[str, int]) -> bool:
    if shape is None:
        return True
    if len(shape_strs) != len(shape):
        return False
    subs = {sympy.Symbol(k, integer=True, positive=True): v for k, v in values.items()}
    for text, size in zip(shape_strs, shape):
        expr = sympy.sympify(text, locals={k: sympy.Symbol(k, integer=True, positive=True) for k in values})
        if int(expr.xreplace(subs)) != int(size):
            return False
    return True


def symbolic_node_shapes(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    nodes: Sequence[str],
    numeric: Optional[Dict[str, Tuple[Optional[Sequence[int]], Optional[Sequence[int]]]]] = None,
    *,
    model: Optional[torch.nn.Module] = None,
) -> Tuple[Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]], Dict[str, int]]:
    """Symbolic (input, output) shapes of the named nodes, and the example value of each symbol.

    Shapes are tuples of strings (sympy syntax, ``//`` is floor division) in symbols named by
    :func:`input_dim_names`. With ``model`` (a graph captured by ``torch.export``) the model is
    re-exported with dynamic dims; otherwise ``gm`` runs on symbolic fake inputs. The batch
    dim is traced at 2 when it is 1 (to keep it symbolic); ``numeric`` maps node names to
    their known numeric shapes, and a formula that does not reproduce them is traced again at
    the real sizes (size-1 dims then stay numbers).
    """
    def run(bump):
        if model is not None:
            return _run_export(model, gm, example_inputs, nodes, bump)
        return _run_symbolic(gm, example_inputs, nodes, bump)

    def agrees(wanted, values):
        return all(
            _agrees(wanted[n][0], (numeric or {}).get(n, (None, None))[0], values)
            and _agrees(wanted[n][1], (numeric or {}).get(n, (None, None))[1], values)
            for n in wanted
        )

    try:
        wanted, values = run(True)
        if agrees(wanted, values):
            return wanted, values
        log.debug("symbolic shapes traced at batch 2 disagree with the example; retrying at batch 1")
    except Exception as exc:  # noqa: BLE001 - retried at the real sizes below
        log.debug("symbolic shapes at batch 2 failed (%s); retrying at batch 1", exc)
    wanted, values = run(False)
    if not agrees(wanted, values):
        raise ValueError("symbolic shapes disagree with the example shapes; formulas left out")
    return wanted, values


def propagate_symbolic_shapes(plan, example_inputs: Sequence[Any]) -> Dict[str, int]:
    """Fill ``symbolic_input_shape`` / ``symbolic_output_shape`` of every layer of ``plan``.

    Returns the example value of every symbol (``{"batch": 2, "height": 32, ...}``), so a
    caller can substitute them to check a formula. Needs ``plan.gm``; raises ValueError when
    the graph's inputs cannot be matched to ``example_inputs``.
    """
    if plan.gm is None:
        raise ValueError("plan.gm is None: symbolic shapes need the captured GraphModule")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    numeric = {layer.node: (layer.input_shape, layer.output_shape) for layer in plan.layers}
    model = getattr(plan, "model", None) if plan.capture == "export" else None
    shapes, values = symbolic_node_shapes(plan.gm, example_inputs, [l.node for l in plan.layers], numeric,
                                          model=model)
    filled = 0
    for layer in plan.layers:
        if layer.node in shapes:
            layer.symbolic_input_shape, layer.symbolic_output_shape = shapes[layer.node]
            filled += 1
    log.debug("propagate_symbolic_shapes: %d of %d layers", filled, len(plan.layers))
    return values


def try_propagate_symbolic_shapes(plan, example_inputs: Sequence[Any]) -> Tuple[Optional[Dict[str, int]], Optional[str]]:
    """:func:`propagate_symbolic_shapes`, or ``(None, why)`` where it fails: formulas are a bonus
    (the numbers stand on the example shapes), and ``why`` is one line (torch's errors from
    C++ carry a whole stack trace, which no user wants on stderr)."""
    try:
        return propagate_symbolic_shapes(plan, example_inputs), None
    except Exception as exc:  # noqa: BLE001 - any failure only costs the formulas
        text = str(exc).strip()
        return None, text.splitlines()[0] if text else type(exc).__name__
