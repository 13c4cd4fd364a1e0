"""Rewrite a captured graph into its SWS network: every tied width group widens once, sparse weights get a 1:M mask.

Why this pass exists: the SWS baseline is a *different network* (sqrt(M) times wider), not
a transformed copy of the trained one, so everything whose shape changes is rebuilt with
the layer types' default (kaiming) initialisation. The widths come from
``tie_channel_widths``; this pass only applies them: new conv/linear/norm/embedding
modules (Conv1d-3d, ConvTranspose1d-3d), resized graph parameters, the groups argument of a
functional depthwise conv, and the integer size arguments of reshapes that name a widened
width. Parameters and modules whose shapes stay are left as they are. Then every layer the analysis calls sparse gets the 1:M magnitude mask
(``runtime.sws_mask.OneOfMMask``) as a parametrization of its weight; a transposed
convolution's mask is told its groups, so that its chunks run along the channels it sums over.
A weight shared by a convolution and a transposed convolution (a tied autoencoder's) is masked
once, in the layout of the site that comes first in the graph.

A fresh parameter keeps ``requires_grad``, dtype and device of the one it replaces, and
parameters that were one tensor (tied weights, which the analysis widens as one) are one
tensor again after the rebuild: the first owner's fresh Parameter serves every owner.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import List, Optional, Tuple

import torch
from torch import fx, nn

from sas_compile.runtime.sws_mask import OneOfMMask, register_mask, sws_mask_of

from .find_sas_layers import LAYER_MODULES, TRANSPOSED_CONV_MODULES
from .rewrite_layers_to_sas import carry_hooks
from .sws_width_model import ChannelWidths
from .sws_width_rules import graph_attr, op_name, size_args

log = logging.getLogger("sas_compile.passes")

__all__ = ["widen_for_sws"]

_SIZE_ARG_OPS = {"view", "reshape", "_unsafe_view", "expand"}


def widen_for_sws(gm: fx.GraphModule, widths: ChannelWidths, *, freeze_mask: bool = False) -> fx.GraphModule:
    """Rebuild ``gm`` (in place) at the widths ``widths`` decided and mask its sparse weights; returns ``gm``.

    ``freeze_mask`` as in ``OneOfMMask``. Records on ``gm``: ``sws_widths`` (the analysis at
    this M), ``sws_M`` and ``sws_layers`` (layer node name -> weight target, every conv/linear).
    """
    tied = _tied_parameters(gm)
    _widen(gm, widths)
    _retie(gm, tied)
    layers = {}
    masked = 0
    for node_name, layer in widths.layers.items():
        weight_target = widths.layer_params[node_name][0]
        if layer.sparse:
            parent, _, attr = weight_target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            if sws_mask_of(owner, attr) is None:  # a module called at two sites is masked once
                # a frozen mask is taken now, so that the state_dict holds it from the start
                transposed = layer.groups if "transpose" in layer.op else None
                mask = OneOfMMask(widths.M, freeze_mask, weight=getattr(owner, attr), transposed_groups=transposed)
                register_mask(owner, attr, mask)
                mask.train(owner.training)
                masked += 1
        layers[node_name] = weight_target
    gm.sws_widths = widths
    gm.sws_M = widths.M
    gm.sws_layers = layers
    log.debug("widen_for_sws: %d of %d layers masked 1:%d", masked, len(layers), widths.M)
    return gm


def _tied_parameters(gm: nn.Module) -> List[List[Tuple[str, str]]]:
    """(module path, name) pairs that hold one Parameter, for every Parameter held more than once."""
    owners = defaultdict(list)
    for path, mod in gm.named_modules(remove_duplicate=False):
        for name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners[id(p)].append((path, name))
    return [group for group in owners.values() if len(group) > 1]


def _retie(gm: nn.Module, tied: List[List[Tuple[str, str]]]) -> None:
    """Make each tied group one Parameter again: the rebuild gave every owner its own."""
    for group in tied:
        (path, name), rest = group[0], group[1:]
        first = getattr(gm.get_submodule(path), name)
        for path, name in rest:
            owner = gm.get_submodule(path)
            current = getattr(owner, name)
            if current is first:
                continue
            if current.shape != first.shape:  # pragma: no cover - the analysis widens a tied tensor as one
                raise RuntimeError(f"widen_for_sws: tied parameter {path}.{name} widened to {tuple(current.shape)}, "
                                   f"its tie {group[0][0]}.{group[0][1]} to {tuple(first.shape)}")
            owner.register_parameter(name, first)


def _widen(gm: fx.GraphModule, widths: ChannelWidths) -> None:
    changed = 0
    done = set()
    weight_targets = {}
    for name, (wt, bt) in widths.layer_params.items():
        weight_targets[wt] = ("weight", name)
        if bt is not None:
            weight_targets[bt] = ("bias", name)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in done:
            done.add(node.target)
            new = _rebuild_module(gm, node, widths)
            if new is not None:
                carry_hooks(gm.get_submodule(node.target), new)  # the user's hooks run on the widened layer
                gm.set_submodule(node.target, new)
                changed += 1
        elif node.op == "get_attr" and node.target not in done:
            done.add(node.target)
            if _resize_attr(gm, node.target, widths, weight_targets):
                changed += 1
        elif node.op in ("call_function", "call_method"):
            if _update_size_args(gm, node, widths):
                changed += 1
    gm.recompile()
    log.debug("widen_for_sws: %d modules, parameters or size arguments changed", changed)


# --------------------------------------------------------------------------- modules


def _like(old: nn.Module, new: nn.Module) -> nn.Module:
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    old_params = dict(old.named_parameters())
    for name, p in new.named_parameters():
        if name in old_params:  # a frozen layer stays frozen
            p.requires_grad_(old_params[name].requires_grad)
    new.train(old.training)
    return new


def _rebuild_module(gm, node, widths: ChannelWidths) -> Optional[nn.Module]:
    mod = gm.get_submodule(node.target)
    t = node.target
    wshape = widths.param_shape(f"{t}.weight")
    layer = widths.layers.get(node.name)
    if isinstance(mod, LAYER_MODULES) and layer is None:
        # the analysis could not follow this call (its reason fixed the widths around it): as it is
        return None
    if isinstance(mod, TRANSPOSED_CONV_MODULES):
        if (layer.in_channels, layer.out_channels, layer.groups) == (mod.in_channels, mod.out_channels, mod.groups):
            return None
        cls = next(c for c in TRANSPOSED_CONV_MODULES if isinstance(mod, c))
        new = cls(layer.in_channels, layer.out_channels, mod.kernel_size, mod.stride, mod.padding,
                  mod.output_padding, layer.groups, mod.bias is not None, mod.dilation, mod.padding_mode)
        return _like(mod, new)
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if (layer.in_channels, layer.out_channels, layer.groups) == (mod.in_channels, mod.out_channels, mod.groups):
            return None
        cls = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(mod, c))
        new = cls(layer.in_channels, layer.out_channels, mod.kernel_size, mod.stride, mod.padding,
                  mod.dilation, layer.groups, mod.bias is not None, mod.padding_mode)
        return _like(mod, new)
    if isinstance(mod, nn.Linear):
        if (layer.in_channels, layer.out_channels) == (mod.in_features, mod.out_features):
            return None
        return _like(mod, nn.Linear(layer.in_channels, layer.out_channels, mod.bias is not None))
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        shape = widths.shape_of(node.name)
        c = shape[1] if shape is not None else (wshape or (mod.num_features,))[0]
        if c == mod.num_features:
            return None
        return _like(mod, type(mod)(c, mod.eps, mod.momentum, mod.affine, mod.track_running_stats))
    if isinstance(mod, nn.LayerNorm):
        shape = widths.shape_of(node.name)
        k = len(mod.normalized_shape)
        ns = tuple(shape[-k:]) if shape is not None else tuple(wshape or mod.normalized_shape)
        if ns == tuple(mod.normalized_shape):
            return None
        new = nn.LayerNorm(ns, mod.eps, mod.elementwise_affine, bias=getattr(mod, "bias", None) is not None)
        return _like(mod, new)
    if isinstance(mod, nn.GroupNorm):
        shape = widths.shape_of(node.name)
        if shape is None or shape[1] == mod.num_channels:
            return None
        return _like(mod, nn.GroupNorm(mod.num_groups, shape[1], mod.eps, mod.affine))
    if isinstance(mod, nn.Embedding):
        if wshape is None or tuple(wshape) == tuple(mod.weight.shape):
            return None
        new = nn.Embedding(wshape[0], wshape[1], mod.padding_idx, mod.max_norm, mod.norm_type,
                           mod.scale_grad_by_freq, mod.sparse)
        return _like(mod, new)
    for pname, p in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
        new_shape = widths.param_shape(f"{t}.{pname}")
        if new_shape is not None and tuple(new_shape) != tuple(p.shape):  # pragma: no cover - analysis fixes these
            raise RuntimeError(f"widen_for_sws: cannot resize {type(mod).__name__} '{t}'")
    return None


# --------------------------------------------------------------------------- graph parameters


def _stretch(old: torch.Tensor, shape) -> torch.Tensor:
    """Nearest-neighbour resize along every changed dim (constant fills stay constant)."""
    out = old.detach()
    for dim, (o, n) in enumerate(zip(old.shape, shape)):
        if o != n:
            idx = (torch.arange(n, device=old.device) * o) // n
            out = out.index_select(dim, idx)
    return out.clone()


def _resize_attr(gm, target: str, widths: ChannelWidths, weight_targets) -> bool:
    old = graph_attr(gm, target)
    new_shape = widths.param_shape(target)
    if not isinstance(old, torch.Tensor) or new_shape is None or tuple(new_shape) == tuple(old.shape):
        return False
    role = weight_targets.get(target)
    if role is not None:
        value = torch.empty(new_shape, dtype=old.dtype, device=old.device)
        fan_in = math.prod(new_shape[1:]) if role[0] == "weight" else None
        if role[0] == "weight":
            # what nn.Linear / nn.Conv2d.reset_parameters do
            nn.init.kaiming_uniform_(value, a=math.sqrt(5))
        else:
            w_target = widths.layer_params[role[1]][0]
            w_shape = widths.param_shape(w_target) or graph_attr(gm, w_target).shape
            fan_in = math.prod(w_shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(value, -bound, bound)
    elif target.endswith("running_mean"):
        value = torch.zeros(new_shape, dtype=old.dtype, device=old.device)
    elif target.endswith("running_var"):
        value = torch.ones(new_shape, dtype=old.dtype, device=old.device)
    else:
        value = _stretch(old, new_shape)
    parent, _, name = target.rpartition(".")
    owner = gm.get_submodule(parent) if parent else gm
    if isinstance(old, nn.Parameter):
        if name in owner._parameters:
            owner._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
        else:
            setattr(owner, name, nn.Parameter(value, requires_grad=old.requires_grad))
    elif name in owner._buffers:
        owner._buffers[name] = value
    else:
        setattr(owner, name, value)
    return True


# --------------------------------------------------------------------------- size arguments


def _update_size_args(gm, node: fx.Node, widths: ChannelWidths) -> bool:
    name = op_name(node)
    new_shape = widths.shape_of(node.name)
    dims = widths.node_dims.get(node.name)
    if name in _SIZE_ARG_OPS and new_shape is not None:
        args = size_args(node)
        if args is None or len(args) != len(new_shape):
            return False
        old_shape = tuple(widths.base_size_of(d) for d in dims)
        new_args = list(args)
        for i, a in enumerate(args):
            if isinstance(a, int) and a != -1 and new_shape[i] != old_shape[i]:
                new_args[i] = new_shape[i]
        if new_args == list(args):
            return False
        _write_size_args(node, new_args)
        return True
    if name == "unflatten" and new_shape is not None:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        sizes = node.args[2] if len(node.args) > 2 else node.kwargs["sizes"]
        if isinstance(dim, int) and isinstance(sizes, (list, tuple)):
            dim %= len(new_shape) - len(sizes) + 1
            new = [s if s == -1 else new_shape[dim + i] for i, s in enumerate(sizes)]
            if new != list(sizes):
                _set_arg(node, 2, "sizes", type(sizes)(new))
                return True
        return False
    if name in ("conv1d", "conv2d", "conv3d") and node.name in widths.layers:
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        new_groups = widths.layers[node.name].groups
        if groups != new_groups:  # a depthwise conv's groups follow its width
            args = list(node.args) + [None] * (6 - len(node.args))
            defaults = (None, None, None, 1, 0, 1)
            for i in range(len(node.args), 6):
                args[i] = node.kwargs.get(("input", "weight", "bias", "stride", "padding", "dilation")[i], defaults[i])
            kwargs = {k: v for k, v in node.kwargs.items() if k not in ("stride", "padding", "dilation", "groups", "bias")}
            node.args = tuple(args[:6]) + (new_groups,)
            node.kwargs = kwargs
            return True
        return False
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d") and node.name in widths.layers:
        # (input, weight, bias, stride, padding, output_padding, groups, dilation)
        groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
        new_groups = widths.layers[node.name].groups
        if groups != new_groups:  # a depthwise transposed conv's groups follow its width
            _set_arg(node, 6, "groups", new_groups)
            return True
        return False
    if name == "layer_norm" and new_shape is not None:
        shape_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        if isinstance(shape_arg, (list, tuple)):
            new = list(new_shape[-len(shape_arg):])
            if new != list(shape_arg):
                _set_arg(node, 1, "normalized_shape", type(shape_arg)(new))
                return True
        elif isinstance(shape_arg, int) and shape_arg != new_shape[-1]:
            _set_arg(node, 1, "normalized_shape", new_shape[-1])
            return True
    if name == "split" and isinstance(node.args[1] if len(node.args) > 1 else None, int):
        pieces = widths.node_dims.get(node.name)
        if isinstance(pieces, tuple) and pieces:
            dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
            size = widths.size_of(pieces[0][dim])
            if size != node.args[1]:
                _set_arg(node, 1, "split_size", size)
                return True
    return False


def _set_arg(node, idx, name, value):
    if len(node.args) > idx:
        args = list(node.args)
        args[idx] = value
        node.args = tuple(args)
    else:
        kwargs = dict(node.kwargs)
        kwargs[name] = value
        node.kwargs = kwargs


def _write_size_args(node, new_args: List) -> None:
    args = list(node.args[1:])
    if not args:
        key = "shape" if "shape" in node.kwargs else "size"
        kwargs = dict(node.kwargs)
        kwargs[key] = type(node.kwargs[key])(new_args)
        node.kwargs = kwargs
    elif len(args) == 1 and isinstance(args[0], (list, tuple)):
        node.args = (node.args[0], type(args[0])(new_args))
    else:
        node.args = (node.args[0], *new_args)
