"""Training flags in a captured graph.

``torch.fx.symbolic_trace`` runs ``forward`` once with proxies, so ``self.training`` is read as
the plain bool it is at that moment: ``F.dropout(x, p, training=self.training)`` is recorded with
``training=True`` (or False) as a constant, ``p if self.training else 0.0`` as one number, and
``if self.training:`` keeps only the branch taken. ``torch.export`` does the same. A GraphModule
built from that graph (the result of ``swsify``, and of ``sasify`` where the rewrite changes the
graph) would then compute the captured mode's function in both modes: dropout after ``.eval()``,
or none in training. Nothing about such a model looks wrong until its accuracy does. The trace
also runs, without recording them, the grad-mode switches inside ``forward`` (``with
torch.no_grad():``) and ``torch.utils.checkpoint``, so the graph drops both.

:func:`trace_modes` (and :func:`export_modes` for an exported graph) captures the model again
with every module in training mode and with every module in eval mode and compares the graphs
node by node:

- where they differ only in constant arguments (a bool, a number, a string, None), one value
  in training and another in eval, :func:`bind_mode_values` replaces each such constant in the
  built graph with a :class:`ModeValue` of the module whose forward made the call, which gives
  the one value or the other at run time: the GraphModule follows ``.train()`` / ``.eval()`` as
  the model does, per module;
- any other difference (a branch on the flag: different operations or a different number of
  them) cannot be written into one graph, nor can a grad-mode switch, checkpointing or a
  branch on ``torch.is_grad_enabled()``: the caller gets the reason, and keeps the user's own
  forward (``sasify``: module swaps), or builds the captured graph and says so (``swsify``).
  The bindings are found in every case, so a graph built anyway still follows the mode where
  both modes make the same calls.
"""
from __future__ import annotations

import contextlib
import difflib
import types
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .capture import CONCRETE_ARGS_META, SASTracer, first_line, quiet_torch_logs

__all__ = ["ModeBinding", "ModeValue", "TraceModes", "trace_modes", "export_modes", "bind_mode_values"]

_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class ModeBinding:
    """One constant argument that depends on the mode: ``node``'s positional argument ``key`` (an
    int) or keyword argument ``key`` (a str) is ``train_value`` in training and ``eval_value`` in
    eval mode of ``module`` (a module path, ``""`` for the root)."""

    node: str
    key: Union[int, str]
    module: str
    train_value: Any
    eval_value: Any


class ModeValue(nn.Module):
    """A module whose call gives ``train_value`` in training mode and ``eval_value`` in eval mode.

    Why a module and not a read of ``self.training`` in the graph: FX re-traces a GraphModule's
    code when it is unpickled, and a plain read would then be a constant again; a module call
    stays a call (that re-trace keeps every module whole). Registered under the module whose
    mode it follows, so ``.train()`` / ``.eval()`` reach it with that module. No parameters or
    buffers: the state_dict is unchanged. A leaf to sas-compile's own tracer, so converting or
    reporting the result again keeps the call (tracing into it would read the mode once more)."""

    _sas_compile_leaf = True

    def __init__(self, train_value: Any = True, eval_value: Any = False):
        super().__init__()
        self.train_value, self.eval_value = train_value, eval_value

    def forward(self) -> Any:
        return self.train_value if self.training else self.eval_value

    def extra_repr(self) -> str:
        return f"training: {self.train_value!r}, eval: {self.eval_value!r}"

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` needs the call's type: a pair of bools, ints or floats becomes
        the same values in a subclass whose forward declares it (``torch.jit.script`` puts it in
        the model in this one's place; it behaves the same in eager mode)."""
        kinds = {type(self.train_value), type(self.eval_value)}
        typed = _TYPED_MODE_VALUES.get(kinds.pop()) if len(kinds) == 1 else None
        if typed is None or type(self) is typed:
            return self
        twin = typed(self.train_value, self.eval_value)
        twin.training = self.training
        return twin


class _BoolModeValue(ModeValue):
    def forward(self) -> bool:
        return self.train_value if self.training else self.eval_value


class _IntModeValue(ModeValue):
    def forward(self) -> int:
        return self.train_value if self.training else self.eval_value


class _FloatModeValue(ModeValue):
    def forward(self) -> float:
        return self.train_value if self.training else self.eval_value


_TYPED_MODE_VALUES = {bool: _BoolModeValue, int: _IntModeValue, float: _FloatModeValue}


@contextlib.contextmanager
def _all_in_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """Every module of ``model`` in ``mode`` for the duration; each flag restored after (the
    user's model is captured as it is, and left as it was)."""
    saved = [(module, module.training) for module in model.modules()]
    try:
        for module, _ in saved:
            module.training = mode
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _owner(node: fx.Node) -> str:
    """The path of the innermost module whose forward made ``node`` ('' for the root); a module
    call's stack ends with the called module itself, whose caller it is."""
    paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
    if node.op == "call_module" and paths and paths[-1] == node.target:
        paths.pop()
    return paths[-1] if paths else ""


def _where(node: fx.Node) -> str:
    owner = _owner(node)
    return f"node {node.name}, {node.op} {getattr(node.target, '__name__', node.target)}" + (
        f" in {owner}" if owner else "")


class _Differs(Exception):
    pass


_UNMATCHED = "<a value of one mode only>"  # :func:`_aligned_bindings`: matches any node


def _path(path: Tuple) -> str:
    return path[0] + "".join(f"[{key!r}]" for key in path[1:])


def _compare(a: Any, b: Any, c: Any, path: Tuple, found: List[Tuple[Tuple, Any, Any]]) -> None:
    """Compare one argument of the captured graph (``a``) and of the training (``b``) and eval
    (``c``) captures; a constant that differs between the modes is appended to ``found``."""
    if isinstance(b, _Named) or isinstance(c, _Named) or isinstance(a, _Named):
        if not (isinstance(a, _Named) and isinstance(b, _Named) and isinstance(c, _Named)
                and len({a.name, b.name, c.name} - {_UNMATCHED}) <= 1):
            raise _Differs(f"argument {_path(path)} is a different value")
        return
    if isinstance(b, (tuple, list)) and isinstance(c, (tuple, list)) and isinstance(a, (tuple, list)):
        if not len(a) == len(b) == len(c):
            raise _Differs(f"argument {_path(path)} has a different length")
        for i, items in enumerate(zip(a, b, c)):
            _compare(*items, path + (i,), found)
        return
    if isinstance(b, dict) and isinstance(c, dict) and isinstance(a, dict):
        if not set(a) == set(b) == set(c):
            raise _Differs(f"argument {_path(path)} has different keys")
        for key in b:
            _compare(a[key], b[key], c[key], path + (key,), found)
        return

    def same(u, v) -> bool:
        try:
            return type(u) is type(v) and bool(u == v)
        except Exception:  # noqa: BLE001 - a value without a plain == (a tensor constant): identity
            return u is v

    if same(b, c):
        if not same(a, b):
            raise _Differs(f"argument {_path(path)} is {a!r} here and {b!r} in both modes")
        return
    if type(b) in _SCALARS and type(c) in _SCALARS and (same(a, b) or same(a, c)):
        found.append((path, b, c))
        return
    raise _Differs(f"argument {_path(path)} is {b!r} in training and {c!r} in eval")


# ops that return their input's values (a copy or a layout change): a capture may take them in one
# mode and not the other (transformers' attention makes its output contiguous only in training),
# which changes no value, so the comparison reads through them
_SAME_VALUES = {"contiguous", "clone", "alias", "detach", "lift_fresh_copy"}


def _reads_through(node: fx.Node) -> bool:
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.overloadpacket.__name__ in _SAME_VALUES and len(node.args) == 1 and not node.kwargs)


def _full_args(node: fx.Node) -> tuple:
    """``node.args`` with the op schema's defaults filled in for the positional arguments it
    leaves out (``sdpa(q, k, v, mask, 0.1)`` in training, ``sdpa(q, k, v, mask)`` in eval)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return tuple(node.args)
    args = list(node.args)
    for argument in target._schema.arguments[len(args):]:
        if argument.kwarg_only or argument.name in node.kwargs or not argument.has_default_value():
            break
        args.append(argument.default_value)
    return tuple(args)


def _counts_batches(node: fx.Node) -> bool:
    """A batch norm's ``num_batches_tracked += 1``, which an export in training mode records and
    one in eval mode does not. The comparison skips it; a graph exported in training mode counts
    in training only (:func:`_counting_in_training`), one exported in eval mode never counts
    (bookkeeping that only ``momentum=None`` reads)."""
    target = node.target
    buffer = node.args[0] if node.args else None
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and target.overloadpacket.__name__ == "add_" and not node.users and isinstance(buffer, fx.Node)
            and buffer.op in ("get_attr", "placeholder") and str(buffer.target).endswith("num_batches_tracked"))


def _value_nodes(nodes) -> Tuple[list, Dict[str, str]]:
    """The nodes that are neither :func:`_reads_through` nor :func:`_counts_batches`, and each
    node's name -> the name of the node whose values it has."""
    kept, source = [], {}
    for node in nodes:
        if _counts_batches(node):
            continue
        if _reads_through(node) and isinstance(node.args[0], fx.Node):
            source[node.name] = source.get(node.args[0].name, node.args[0].name)
        else:
            kept.append(node)
            source[node.name] = node.name
    return kept, source


def _renamed(value, source: Dict[str, str]):
    """``value`` with every node replaced by the name of the node whose values it has."""
    return fx.node.map_arg(value, lambda n: _Named(source.get(n.name, n.name)))


class _Named:
    """A node's place in a comparison: the name of the node whose values it has."""

    def __init__(self, name: str):
        self.name = name


def _mode_bindings(nodes, train_nodes, eval_nodes, what: str) -> Tuple[List[ModeBinding], Optional[str]]:
    """``(bindings, None)`` where three captures of one forward (as captured, all in training,
    all in eval) are one graph up to constant arguments (and ops that only copy values);
    ``([], reason)`` otherwise. Nodes are matched by their place among the value nodes (an op
    taken in one mode only shifts the names of those after it), named as in the first capture."""
    kept, names = _value_nodes(nodes)
    others = []
    for capture in (train_nodes, eval_nodes):
        their_kept, their_names = _value_nodes(capture)
        to_ours = {theirs.name: ours.name for ours, theirs in zip(kept, their_kept)}
        others.append((their_kept, {name: to_ours.get(rep, rep) for name, rep in their_names.items()}))
    (train_kept, train_names), (eval_kept, eval_names) = others
    if not len(kept) == len(train_kept) == len(eval_kept):
        first = next((n for n, t, e in zip(kept, train_kept, eval_kept)
                      if not n.op == t.op == e.op or not n.target == t.target == e.target), None)
        where = f"; they part at {_where(first)}" if first is not None else ""
        return [], (f"its forward takes different paths in training and eval mode (a branch on self.training: "
                    f"{len(train_kept)} against {len(eval_kept)} {what} nodes{where})")
    bindings: List[ModeBinding] = []
    for node, t, e in zip(kept, train_kept, eval_kept):
        found: List[Tuple[Tuple, Any, Any]] = []
        try:
            if not (node.op == t.op == e.op and node.target == t.target == e.target):
                raise _Differs("a different operation")
            _compare(_renamed(_full_args(node), names), _renamed(_full_args(t), train_names),
                     _renamed(_full_args(e), eval_names), ("args",), found)
            _compare(_renamed(node.kwargs, names), _renamed(t.kwargs, train_names), _renamed(e.kwargs, eval_names),
                     ("kwargs",), found)
        except _Differs as why:
            return [], (f"its forward differs between training and eval mode (a branch on self.training: at "
                        f"{_where(node)}, {why})")
        for path, train_value, eval_value in found:
            if len(path) != 2:  # inside a list or dict argument: not bound, so not one graph
                return [], f"its forward passes a mode-dependent value inside a list or dict (at {_where(node)})"
            bindings.append(ModeBinding(node.name, path[1], _owner(node), train_value, eval_value))
    return bindings, None


def _signature(node: fx.Node) -> Tuple:
    return node.op, node.target if node.op != "placeholder" else node.name


def _aligned_bindings(nodes, other_nodes, captured_in_training: bool) -> List[ModeBinding]:
    """The mode-dependent constants of the calls two captures in different modes make alike, where
    they are not one graph: the value nodes matched in order (``difflib`` on their operations),
    and in each matched pair whose inputs are matched too, the constant arguments that differ.
    ``nodes`` is the graph that is built (captured in training mode if ``captured_in_training``)."""
    kept, names = _value_nodes(nodes)
    other_kept, other_names = _value_nodes(other_nodes)
    matcher = difflib.SequenceMatcher(a=[_signature(n) for n in kept], b=[_signature(n) for n in other_kept],
                                      autojunk=False)
    pairs = [(kept[block.a + i], other_kept[block.b + i]) for block in matcher.get_matching_blocks()
             for i in range(block.size)]
    # a value only one mode makes (the branch's) matches anything: what differs there is the branch
    to_ours = {theirs.name: ours.name for ours, theirs in pairs}
    matched = set(to_ours.values())
    names = {name: rep if rep in matched else _UNMATCHED for name, rep in names.items()}
    other_names = {name: to_ours.get(rep, _UNMATCHED) for name, rep in other_names.items()}
    bindings = []
    for node, twin in pairs:
        found: List[Tuple[Tuple, Any, Any]] = []
        try:
            _compare(_renamed(_full_args(node), names), _renamed(_full_args(node), names),
                     _renamed(_full_args(twin), other_names), ("args",), found)
            _compare(_renamed(node.kwargs, names), _renamed(node.kwargs, names), _renamed(twin.kwargs, other_names),
                     ("kwargs",), found)
        except _Differs:
            continue  # it reads different matched values in the two modes: not the same call
        for path, ours, theirs in found:
            if len(path) == 2:
                train_value, eval_value = (ours, theirs) if captured_in_training else (theirs, ours)
                bindings.append(ModeBinding(node.name, path[1], _owner(node), train_value, eval_value))
    return bindings


class _Watch:
    """What a trace saw the forward do that its graph does not record (:func:`_watching`)."""

    def __init__(self):
        self.checkpointed: List[str] = []  # what torch.utils.checkpoint checkpointed
        self.switches: List[bool] = []  # the grad modes the forward switched to, outside checkpoints
        self.depth = 0  # inside a checkpoint call (its own grad switches are its business)


def _trace_in_mode(model: nn.Module, mode: bool, concrete_args, *, grad: Optional[bool] = None,
                   watch: Optional[_Watch] = None) -> fx.Graph:
    """A symbolic trace of ``model`` with every module in ``mode`` (and the grad mode ``grad``),
    watched (:func:`_watching`) when ``watch`` is given."""
    tracer = SASTracer()
    with _all_in_mode(model, mode), torch.set_grad_enabled(torch.is_grad_enabled() if grad is None else grad):
        with _watching(model, watch) if watch is not None else contextlib.nullcontext():
            return tracer.trace(model, concrete_args=concrete_args or None)


@contextlib.contextmanager
def _watching(model: nn.Module, watch: _Watch) -> Iterator[None]:
    """Watch, while the block traces ``model``, what FX runs and does not record.

    - ``torch.utils.checkpoint``: both forms look up their worker in their module at each call
      (the non-reentrant form a generator, the reentrant one ``CheckpointFunction``), so that is
      where to watch; the user's ``from ... import checkpoint`` is the same function. Recorded:
      the path of the module it calls ('' for the root), or "a function". (FX's stack traces
      would say it too, but recording them imports torch._dynamo, 0.6-0.9 s.)
    - grad mode switches: ``torch.no_grad()``, ``torch.enable_grad()`` and
      ``torch.set_grad_enabled`` all end in ``torch._C._set_grad_enabled``, looked up at each
      call. Those a checkpoint makes for itself are not the forward's.
    """
    import torch.utils.checkpoint as checkpointing

    paths = {id(module): path for path, module in model.named_modules()}

    def checkpointed(fn, call):
        watch.checkpointed.append(paths.get(id(getattr(fn, "__self__", fn)), "a function"))
        watch.depth += 1
        try:
            return call()
        finally:
            watch.depth -= 1

    patched = {}
    generator = getattr(checkpointing, "_checkpoint_without_reentrant_generator", None)
    if generator is not None:
        patched[checkpointing, "_checkpoint_without_reentrant_generator"] = (
            lambda fn, *args, **kwargs: checkpointed(fn, lambda: generator(fn, *args, **kwargs)))
    reentrant = getattr(checkpointing, "CheckpointFunction", None)
    if reentrant is not None:
        patched[checkpointing, "CheckpointFunction"] = types.SimpleNamespace(
            apply=lambda fn, *args: checkpointed(fn, lambda: reentrant.apply(fn, *args)))
    set_grad = torch._C._set_grad_enabled

    def switch(mode: bool) -> None:
        if not watch.depth:
            watch.switches.append(bool(mode))
        set_grad(mode)

    patched[torch._C, "_set_grad_enabled"] = switch
    originals = {key: getattr(*key) for key in patched}
    for (owner, name), value in patched.items():  # another torch without one of them: not watched
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in originals.items():
            setattr(owner, name, value)


@dataclass
class TraceModes:
    """What a capture of a model leaves out (:func:`trace_modes`, :func:`export_modes`).

    ``bindings``: the constants that depend on the mode (:func:`bind_mode_values`).
    ``why``: None when the graph is one graph in both modes up to ``bindings`` (and with gradients
    on or off), else the reason; ``bindings`` then holds those of the calls both modes make
    alike (matched in order, :func:`_aligned_bindings`; where the other mode cannot be captured,
    the flags of the calls known to take one), so a caller that builds from the captured graph
    anyway still reads them at run time.
    ``mode_paths``: ``why`` is that training and eval mode take different paths.
    ``only_grad_switches``: ``why`` is only that the forward switches gradients off or on for
    part of itself: the graph is the one path of both modes and grad modes, and only a graph
    built from it loses the switches.
    ``checkpointed``: what ``torch.utils.checkpoint`` checkpoints in training mode (module paths,
    '' for the root, or "a function"): a traced graph inlines it, so it keeps the activations
    checkpointing frees.
    """

    bindings: List[ModeBinding] = field(default_factory=list)
    why: Optional[str] = None
    checkpointed: List[str] = field(default_factory=list)
    # ``why`` is that the paths differ between the modes (the graph then has the captured mode's)
    mode_paths: bool = False
    # ``why`` is only that the forward switches grad mode inside: one path, which the user's own
    # forward on swapped modules keeps as written
    only_grad_switches: bool = False


def trace_modes(gm: fx.GraphModule, model: nn.Module) -> TraceModes:
    """Trace ``model`` in training and in eval mode (each with the concrete args ``gm`` was traced
    with) and compare both with ``gm``, node by node, and once more with the grad mode switched;
    see :class:`TraceModes`. The bindings are found whatever else ``why`` reports."""
    concrete_args = gm.meta.get(CONCRETE_ARGS_META)
    traces, watch = {}, _Watch()
    for mode in (True, False):
        try:
            traces[mode] = _trace_in_mode(model, mode, concrete_args, watch=watch if mode else None)
        except Exception as err:  # noqa: BLE001 - the forward itself fails in that mode
            return TraceModes(_flag_arguments(gm, model.training),
                              f"its forward does not trace in {'training' if mode else 'eval'} mode "
                              f"({first_line(err)})", mode_paths=True)
    checkpointed = sorted(set(watch.checkpointed))
    bindings, why = _mode_bindings(list(gm.graph.nodes), list(traces[True].nodes), list(traces[False].nodes),
                                   "graph")
    if why is not None:
        bindings = _aligned_bindings(list(gm.graph.nodes), list(traces[not model.training].nodes), model.training)
        return TraceModes(bindings, why, checkpointed, mode_paths=True)
    try:  # torch.is_grad_enabled() is a constant to the trace too: no graph holds both answers
        other_grad = _trace_in_mode(model, True, concrete_args, grad=not torch.is_grad_enabled())
        grad_dependent = other_grad.python_code("self").src != traces[True].python_code("self").src
    except Exception:  # noqa: BLE001 - the forward fails to trace with gradients switched
        grad_dependent = True
    if grad_dependent:
        return TraceModes(bindings, "its forward depends on torch.is_grad_enabled() (it traces differently with "
                                    "gradients on and off)", checkpointed)
    if watch.switches:
        switched = "off" if False in watch.switches else "on"
        return TraceModes(bindings, f"its forward switches gradients {switched} for part of itself (torch.no_grad() "
                                    "or torch.enable_grad() inside forward), which a traced graph drops, so its "
                                    "gradients would not be the model's", checkpointed, only_grad_switches=True)
    return TraceModes(bindings, None, checkpointed)


def export_modes(gm: fx.GraphModule, model: nn.Module, example_inputs) -> TraceModes:
    """:func:`trace_modes` for ``gm``, a ``torch.export`` capture of ``model`` in its current modes:
    ``model`` is exported again in each mode its modules are not all in already (it is exported
    as it is: pass a copy where it must not be), under ``no_grad`` as the capture was."""
    modes = {module.training for module in model.modules()}
    graphs = {}
    for mode in (True, False):
        if modes == {mode}:
            graphs[mode] = gm.graph
            continue
        try:
            with _all_in_mode(model, mode), torch.no_grad(), quiet_torch_logs():
                graphs[mode] = torch.export.export(model, example_inputs, strict=False).module().graph
        except Exception as err:  # noqa: BLE001 - the forward itself fails in that mode
            return TraceModes(_flag_arguments(gm, model.training) + _counting_in_training(gm),
                              f"its forward does not export in {'training' if mode else 'eval'} mode "
                              f"({first_line(err)})", mode_paths=True)
    bindings, why = _mode_bindings(list(gm.graph.nodes), list(graphs[True].nodes), list(graphs[False].nodes),
                                   "exported graph")
    if why is not None:
        bindings = _aligned_bindings(list(gm.graph.nodes), list(graphs[not model.training].nodes), model.training)
    return TraceModes(bindings + _counting_in_training(gm), why, mode_paths=why is not None)


def _counting_in_training(gm: fx.GraphModule) -> List[ModeBinding]:
    """Each batch norm's count of batches in ``gm`` adds its step in training and 0 in eval."""
    return [ModeBinding(node.name, 1, _owner(node), node.args[1], 0) for node in gm.graph.nodes
            if _counts_batches(node) and len(node.args) == 2 and type(node.args[1]) is int]


# where no second capture can say: the calls known to take the training flag, and where it is.
# A symbolic trace records the torch.nn.functional ones with it as ``training=`` (they pass it on
# to their torch-function handler by keyword); an export, the aten ops, by position.
_FLAG_FUNCTIONS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                   F.batch_norm, F.rrelu)
_FLAG_OPS = {"batch_norm": 5, "dropout": 2, "feature_dropout": 2, "alpha_dropout": 2}


def _flag_arguments(gm: fx.GraphModule, captured_in_training: bool) -> List[ModeBinding]:
    """The training flags of ``gm``'s dropouts and batch norms (functional calls of a symbolic
    trace, aten ops of an export) that hold the captured mode: what can be bound where the model
    cannot be captured in the other mode."""
    bindings = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function":
            continue
        key = None
        if target in _FLAG_FUNCTIONS:
            key = "training"
        elif isinstance(target, torch._ops.OpOverload):
            key = _FLAG_OPS.get(target.overloadpacket.__name__)
        if key is None:
            continue
        value = node.kwargs.get(key) if isinstance(key, str) else node.args[key] if len(node.args) > key else None
        if value is captured_in_training:
            bindings.append(ModeBinding(node.name, key, _owner(node), True, False))
    return bindings


def bind_mode_values(gm: fx.GraphModule, bindings: List[ModeBinding]) -> None:
    """Replace each bound constant of ``gm`` with the value its module's mode gives at run time.

    The value comes from a :class:`ModeValue` registered under the module whose forward made the
    call where ``gm`` holds that module's path (a GraphModule holds only the paths its graph
    uses), else under the nearest enclosing one it holds, else under the root. Raises
    ``KeyError`` naming a node the built graph no longer has (the caller's rewrite keeps the
    nodes it does not convert).
    """
    if not bindings:
        return
    nodes = {node.name: node for node in gm.graph.nodes}
    values: Dict[Tuple[str, Any, Any], fx.Node] = {}
    first = next(iter(gm.graph.nodes))
    while first.op == "placeholder":
        first = first.next
    for binding in bindings:
        node = nodes[binding.node]
        module = binding.module
        while module:
            try:
                gm.get_submodule(module)
                break
            except AttributeError:
                module = module.rpartition(".")[0]
        key = (module, (type(binding.train_value), binding.train_value), (type(binding.eval_value), binding.eval_value))
        if key not in values:
            owner = gm.get_submodule(module) if module else gm
            if (binding.train_value, binding.eval_value) == (True, False):
                name = "sas_training_flag"
            elif (binding.train_value, binding.eval_value) == (False, True):
                name = "sas_eval_flag"
            else:
                name = f"sas_mode_value_{sum(isinstance(m, ModeValue) for m in owner.children())}"
            existing = getattr(owner, name, None)
            if not (isinstance(existing, ModeValue) and (existing.train_value, existing.eval_value)
                    == (binding.train_value, binding.eval_value)):
                owner.add_module(name, ModeValue(binding.train_value, binding.eval_value).train(owner.training))
            with gm.graph.inserting_before(first):
                values[key] = gm.graph.call_module(f"{module}.{name}" if module else name)
        if isinstance(binding.key, int):  # a default the capture left out is written out first
            args = list(node.args if binding.key < len(node.args) else _full_args(node))
            args[binding.key] = values[key]
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, binding.key: values[key]}
    gm.recompile()
