"""Carry a widened SWS graph back into the user's model as module and parameter swaps.

Why this pass exists: ``widen_for_sws`` rewrites the GraphModule ``symbolic_trace`` made, and a
GraphModule is not the user's class: ``sws[0]`` on a ``Sequential``, ``sws.layer4[-1]`` on a
ResNet (its containers are bare ``nn.Module`` s there) and the class's own methods fail on it.
Where the rewrite changed no node of the graph (no size argument of a reshape, no ``groups`` of a
functional convolution) and every layer is a module call, the SWS network is the user's model
with some modules and parameters replaced; this pass makes those replacements in the copy that
was traced, which then runs its own ``forward`` (its ``.train()``/``.eval()`` branches,
checkpoints and grad-mode switches as written).

``graph_signature`` records the graph before the rewrite; ``swap_into_model`` compares, swaps
(a swapped module takes the hooks of the one it replaces, as sasify's swaps do), and checks
that weights tied in the user's model are still one tensor. It returns why not, or
None when the copy now is the SWS model.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from .rewrite_layers_to_sas import carry_hooks

__all__ = ["graph_signature", "same_outputs", "swap_into_model", "tied_parameter_paths"]


def graph_signature(gm: fx.GraphModule) -> List[Tuple[str, str, str, str, str]]:
    """What each node calls and with what, as text: a rewrite that changes any of it shows."""
    return [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in gm.graph.nodes]


def _owner(root: nn.Module, target: str) -> Tuple[nn.Module, str]:
    parent, _, attr = target.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def _raw(owner: nn.Module, attr: str):
    """The stored tensor (a parametrized one's original), not the value a parametrization computes."""
    if parametrize.is_parametrized(owner, attr):
        return getattr(owner.parametrizations, attr).original
    return getattr(owner, attr)


def _changed_nodes(gm: fx.GraphModule, before) -> List[str]:
    after = graph_signature(gm)
    if [entry[0] for entry in after] != [entry[0] for entry in before]:
        return ["nodes were added or removed"]
    return [new[0] for old, new in zip(before, after) if old != new]


def swap_into_model(gm: fx.GraphModule, model: nn.Module, before, layers: Dict[str, str],
                    ties: List[List[str]]) -> Optional[str]:
    """Make ``model`` (the module ``gm`` was traced from) the SWS network ``gm`` now is.

    ``before`` is ``graph_signature(gm)`` taken before the rewrite, ``layers`` the SWS layers
    (node name -> weight target), ``ties`` the parameter paths that were one tensor in the user's
    model. Returns None when done, else why the rewrite is not a set of swaps; ``model`` may then
    be partly changed (it is a private copy: discard it).
    """
    changed = _changed_nodes(gm, before)
    if changed:
        return (f"the rewrite changes the graph itself ({', '.join(changed[:4])}{', ...' if len(changed) > 4 else ''}: "
                "size arguments of reshapes or the groups of a functional convolution follow the new widths)")
    nodes = {n.name: n for n in gm.graph.nodes}
    functional = [name for name in layers if nodes[name].op != "call_module"]
    if functional:
        return f"{', '.join(functional[:4])} {'is a functional call' if len(functional) == 1 else 'are functional calls'}"
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, attr = _owner(gm, node.target)
            if parametrize.is_parametrized(owner, attr):
                return f"{node.target} is a masked weight read by a function call"
    paths: Dict[int, List[str]] = {}  # a module registered under several names is swapped under all
    for path, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(path)
    for node in gm.graph.nodes:
        if node.op == "call_module":
            new = gm.get_submodule(node.target)
            try:
                old = model.get_submodule(node.target)
            except AttributeError:  # the graph's own (the mode flag bind_mode_values reads)
                continue
            if new is not old:
                new.train(old.training)
                carry_hooks(old, new)  # activation logging or feature extraction on a widened layer
                for path in paths[id(old)]:
                    model.set_submodule(path, new)
        elif node.op == "get_attr":
            new = getattr(*_owner(gm, node.target))
            try:
                owner, attr = _owner(model, node.target)
                old = getattr(owner, attr)
            except AttributeError:  # the graph's own (a mode flag it reads): the forward does not need it
                continue
            if old is new:
                continue
            if attr in owner._parameters:
                owner._parameters[attr] = new
            elif attr in owner._buffers:
                owner._buffers[attr] = new
            else:
                setattr(owner, attr, new)
    for group in ties:
        held = set()
        for path in group:
            try:
                held.add(id(_raw(*_owner(model, path))))
            except AttributeError:  # its owner was rebuilt without it (a rebuilt weight_norm'd layer)
                return f"the tied weight {path} is not in the widened model"
        if len(held) > 1:
            return f"the tied weights {', '.join(group)} would no longer be one tensor"
    return None


def tied_parameter_paths(model: nn.Module) -> List[List[str]]:
    """The paths of every parameter ``model`` holds more than once (tied weights)."""
    paths: Dict[int, List[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(p), []).append(name)
    return [group for group in paths.values() if len(group) > 1]


def same_outputs(a, b) -> bool:
    """Whether two model outputs are the same structure holding equal tensors (floats to 1e-5):
    tensors, mappings (a ``transformers`` ModelOutput, a user's dict subclass), sequences and
    objects compared by their attributes."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() or a.is_complex():  # a tolerance for sums not bitwise reproducible (CUDA)
            return torch.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
        return torch.equal(a, b)
    if isinstance(a, Mapping):
        return list(a.keys()) == list(b.keys()) and all(same_outputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_outputs(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return same_outputs(vars(a), vars(b))
    try:
        return bool(a == b)
    except Exception:  # an object without a truth value for ==
        return False
