"""Training flags in a symbolically traced graph.

``torch.fx.symbolic_trace`` runs ``forward`` once with proxies, so ``self.training`` is read as
the plain bool it is at that moment: ``F.dropout(x, p, training=self.training)`` is recorded with
``training=True`` (or False) as a constant, and ``if self.training:`` keeps only the branch taken.
A GraphModule built from that graph (the result of ``swsify``, and of ``sasify`` where the rewrite
changes the graph) would then compute the traced mode's function in both modes: dropout after
``.eval()``, or none in training. Nothing about such a model looks wrong until its accuracy does.
The trace also runs through ``torch.utils.checkpoint``, so the graph drops the checkpointing.

:func:`trace_modes` traces the model again with every module in training mode and with every
module in eval mode and compares the graphs node by node:

- where they differ only in constants that are the mode itself (True in training, False in
  eval, or the reverse), :func:`bind_training_flags` replaces each constant in the built graph
  with the flag read at run time (a :class:`TrainingFlag` of the module whose forward made the
  call), so the GraphModule follows ``.train()`` / ``.eval()`` as the model does;
- any other difference (a branch on the flag, a mode-dependent shape) cannot be written into one
  graph, nor can checkpointing: the caller gets the reason, and keeps the user's own forward
  (``sasify``: module swaps) or refuses (``swsify``; it warns about checkpointing).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from .capture import CONCRETE_ARGS_META, SASTracer, TrainingFlag

__all__ = ["FlagBinding", "TraceModes", "TrainingFlag", "trace_modes", "bind_training_flags"]


@dataclass(frozen=True)
class FlagBinding:
    """One argument of one node that is a training flag: ``node``'s positional argument ``key``
    (an int) or keyword argument ``key`` (a str) is ``<module>.training`` (negated if
    ``inverted``); ``module`` is a module path, ``""`` for the root."""

    node: str
    key: Union[int, str]
    module: str
    inverted: bool


@contextlib.contextmanager
def _all_in_mode(model: nn.Module, mode: bool) -> Iterator[None]:
    """Every module of ``model`` in ``mode`` for the duration; each flag restored after (the
    user's model is traced as it is, and left as it was)."""
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


def _compare(a: Any, b: Any, c: Any, path: Tuple, found: List[Tuple[Tuple, bool]]) -> None:
    """Compare one argument of the traced graph (``a``) and of the training (``b``) and eval
    (``c``) traces; a leaf that is the mode itself is appended to ``found``."""
    if isinstance(b, fx.Node) or isinstance(c, fx.Node) or isinstance(a, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and isinstance(c, fx.Node)
                and a.name == b.name == c.name):
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
    if type(b) is bool and type(c) is bool and b != c:
        found.append((path, not b))  # True in training: the flag; False in training: its negation
        return
    try:
        same = type(a) is type(b) is type(c) and bool(a == b == c)
    except Exception:  # noqa: BLE001 - a value without a plain == (a tensor constant): compare identity
        same = a is b is c
    if not same:
        raise _Differs(f"argument {_path(path)} is {b!r} in training and {c!r} in eval")


def _path(path: Tuple) -> str:
    return path[0] + "".join(f"[{key!r}]" for key in path[1:])


def _trace_in_mode(model: nn.Module, mode: bool, concrete_args, *, stack_traces: bool = False,
                   grad: Optional[bool] = None) -> fx.Graph:
    tracer = SASTracer()
    tracer.record_stack_traces = stack_traces
    with _all_in_mode(model, mode), torch.set_grad_enabled(torch.is_grad_enabled() if grad is None else grad):
        return tracer.trace(model, concrete_args=concrete_args or None)


_CHECKPOINT_FILE = re.compile(r"torch[/\\]utils[/\\]checkpoint\.py")


@dataclass
class TraceModes:
    """What a symbolic trace of a model leaves out (:func:`trace_modes`).

    ``bindings``: the constants that are a training flag (:func:`bind_training_flags`).
    ``why``: None when the graph is one graph in both modes up to ``bindings`` (and with gradients
    on or off), else the reason.
    ``checkpointed``: the modules (paths, '' for the root) whose calls ran inside
    ``torch.utils.checkpoint`` in training mode: a traced graph inlines them, so it keeps the
    activations checkpointing frees.
    """

    bindings: List[FlagBinding] = field(default_factory=list)
    why: Optional[str] = None
    checkpointed: List[str] = field(default_factory=list)


def trace_modes(gm: fx.GraphModule, model: nn.Module) -> TraceModes:
    """Trace ``model`` in training and in eval mode (each with the concrete args ``gm`` was traced
    with) and compare both with ``gm``, node by node, and once more with the grad mode switched;
    see :class:`TraceModes`."""
    concrete_args = gm.meta.get(CONCRETE_ARGS_META)
    traces = {}
    for mode in (True, False):
        try:
            traces[mode] = _trace_in_mode(model, mode, concrete_args, stack_traces=mode)
        except Exception as err:  # noqa: BLE001 - the forward itself fails in that mode
            first = (str(err).strip() or type(err).__name__).splitlines()[0][:200]
            return TraceModes(why=f"its forward does not trace in {'training' if mode else 'eval'} mode ({first})")
    inside = {_owner(node) for node in traces[True].nodes
              if node.stack_trace and _CHECKPOINT_FILE.search(node.stack_trace)}
    # the outermost modules: a checkpointed block's own layers are not listed again
    checkpointed = sorted(path for path in inside
                          if not any(path != other and (other == "" or path.startswith(other + "."))
                                     for other in inside))
    try:  # torch.is_grad_enabled() is a constant to the trace too: no graph holds both answers
        other_grad = _trace_in_mode(model, True, concrete_args, grad=not torch.is_grad_enabled())
        grad_dependent = other_grad.python_code("self").src != traces[True].python_code("self").src
    except Exception:  # noqa: BLE001 - the forward fails to trace with gradients switched
        grad_dependent = True
    if grad_dependent:
        return TraceModes(why="its forward depends on torch.is_grad_enabled() (it traces differently with "
                              "gradients on and off)", checkpointed=checkpointed)
    nodes = list(gm.graph.nodes)
    train_nodes, eval_nodes = list(traces[True].nodes), list(traces[False].nodes)
    if not len(nodes) == len(train_nodes) == len(eval_nodes):
        first = next((n for n, t, e in zip(nodes, train_nodes, eval_nodes) if not n.name == t.name == e.name),
                     None)
        where = f"; the traces part at {_where(first)}" if first is not None else ""
        return TraceModes(why=(f"its forward takes different paths in training and eval mode (a branch on "
                               f"self.training: {len(train_nodes)} against {len(eval_nodes)} graph nodes{where})"),
                          checkpointed=checkpointed)
    bindings: List[FlagBinding] = []
    for node, t, e in zip(nodes, train_nodes, eval_nodes):
        try:
            if not (node.op == t.op == e.op and node.name == t.name == e.name and node.target == t.target == e.target):
                raise _Differs("a different operation")
            found: List[Tuple[Tuple, bool]] = []
            _compare(node.args, t.args, e.args, ("args",), found)
            _compare(node.kwargs, t.kwargs, e.kwargs, ("kwargs",), found)
        except _Differs as why:
            return TraceModes(why=(f"its forward differs between training and eval mode (a branch on "
                                   f"self.training: at {_where(node)}, {why})"), checkpointed=checkpointed)
        for path, inverted in found:
            if len(path) != 2:  # a flag inside a list or dict argument: not bound, so not one graph
                return TraceModes(why=f"its forward passes self.training inside a list or dict (at {_where(node)})",
                                  checkpointed=checkpointed)
            bindings.append(FlagBinding(node.name, path[1], _owner(node), inverted))
    return TraceModes(bindings, None, checkpointed)


def bind_training_flags(gm: fx.GraphModule, bindings: List[FlagBinding]) -> None:
    """Replace each bound constant of ``gm`` with the module's training flag read at run time.

    The flag is a :class:`TrainingFlag` registered under the module whose forward made the call
    where ``gm`` holds that module's path (a GraphModule holds only the paths its graph uses),
    else under the nearest enclosing one it holds, else under the root. Raises ``KeyError``
    naming a node the built graph no longer has (the caller's rewrite keeps the nodes it does not
    convert).
    """
    if not bindings:
        return
    nodes = {node.name: node for node in gm.graph.nodes}
    flags: Dict[Tuple[str, bool], fx.Node] = {}
    for binding in bindings:
        node = nodes[binding.node]
        module = binding.module
        while module:
            try:
                gm.get_submodule(module)
                break
            except AttributeError:
                module = module.rpartition(".")[0]
        key = (module, binding.inverted)
        if key not in flags:
            owner = gm.get_submodule(module) if module else gm
            name = "sas_eval_flag" if binding.inverted else "sas_training_flag"
            if not isinstance(getattr(owner, name, None), TrainingFlag):
                owner.add_module(name, TrainingFlag(binding.inverted).train(owner.training))
            first = next(iter(gm.graph.nodes))
            while first.op == "placeholder":
                first = first.next
            with gm.graph.inserting_before(first):
                flags[key] = gm.graph.call_module(f"{module}.{name}" if module else name)
        if isinstance(binding.key, int):
            args = list(node.args)
            args[binding.key] = flags[key]
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, binding.key: flags[key]}
    gm.recompile()
