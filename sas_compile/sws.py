"""SWS: the paper's baseline, a sqrt(M)-wide network with 1:M sparse weights.

``swsify(model, M=...)`` captures the model, ties its widths across the whole graph
(``passes/tie_channel_widths.py``), rebuilds it sqrt(M) times wider with fresh default
initialisation (``passes/widen_for_sws.py``) and puts a 1:M mask on the weight of every
widened conv/linear (Linear, Conv1d, Conv2d). The mult count then stays close to the base
model's, which is the comparison the paper makes against SAS at the same mult budget.

Like ``sasify``, ``dense_input_layers=True`` (the default) keeps the weight of a layer that
reads the raw network input dense: its output width widens, but it has no mask (a first
conv with one input channel would otherwise keep one of every M kernel taps), so SAS and
SWS treat that layer the same way.

The 1:M pattern
---------------
The weight is viewed row-major as ``[out, in/groups * kernel]`` (``kh * kw`` for conv2d,
``k`` for conv1d) and flattened; every chunk
of M consecutive weights keeps exactly one, the largest magnitude, and a last partial
chunk keeps one. This gives the paper's count ``ceil(in * out / M)`` exactly; when
``in_features % M != 0`` a chunk may straddle two rows (such a layer cannot be packed into
2:4 rows; ``export_sws_weights`` says so). The mask is recomputed every forward in training
with a straight-through gradient (the dense weight gets the gradient of the masked one),
so masks follow weight updates; ``freeze_mask=True`` computes it once and trains only the
kept weights. In eval mode, without autograd, the masked weight is cached until the weight
changes or the model goes back to training.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .api import FilterFn, attach_result, check_filter_fn, register_handler, sparsify
from .passes.plan import LayerPlan, Plan
from .runtime.projection import check_M
from sas_compile.runtime.sws_mask import OneOfMMask, one_of_m_mask

__all__ = [
    "swsify",
    "SWSConfig",
    "build_sws",
    "OneOfMMask",
    "one_of_m_mask",
    "sws_costs",
    "export_sws_weights",
]


def build_sws(
    model: nn.Module,
    *,
    M: int = 2,
    example_inputs=None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    freeze_mask: bool = False,
    dense_input_layers: bool = True,
) -> fx.GraphModule:
    """Build the SWS baseline of ``model``: sqrt(M) times wider, 1:M sparse weights.

    ``model`` is not modified. ``example_inputs`` (a tensor or tuple) gives exact shapes and
    lets models that ``symbolic_trace`` cannot trace be captured with ``torch.export``; the
    built model is run on them once as a check. ``filter_fn(module, fqn) -> bool`` keeps a
    conv/linear out of SWS (its widths stay, its weight stays dense) when it returns False.
    ``dense_input_layers`` (default True, as ``sasify``) keeps the weight of a layer reading
    the raw network input dense (no mask) while its output width still widens; False masks
    it 1:M like the others.
    Every module or parameter whose shape changes is freshly initialised (layer defaults);
    the rest are copies of the original's. The result is a GraphModule whose ``sws_widths``
    attribute holds the analysis (widths per layer with the reasons a width stays).
    """
    from sas_compile.passes.capture import normalize_example_inputs
    from sas_compile.passes.tie_channel_widths import tie_channel_widths
    from sas_compile.passes.widen_for_sws import widen_for_sws

    M = check_M(M)
    if not isinstance(model, nn.Module):
        raise TypeError(f"swsify: model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError("swsify: filter_fn must be a callable (module, fqn) -> bool")
    example_inputs = normalize_example_inputs(example_inputs)
    work = copy.deepcopy(model)
    gm, method = _capture(work, example_inputs)
    if method == "export":
        gm = _trainable_graph(gm)
    widths = tie_channel_widths(gm, M, example_inputs, filter_fn=filter_fn,
                                dense_input_layers=bool(dense_input_layers))
    widen_for_sws(gm, widths)
    layers = {}
    for node_name, layer in widths.layers.items():
        weight_target = widths.layer_params[node_name][0]
        if layer.sparse:
            owner, attr = _owner_of(gm, weight_target)
            parametrize.register_parametrization(owner, attr, OneOfMMask(M, freeze_mask), unsafe=True)
        layers[node_name] = weight_target
    gm.sws_widths = widths
    gm.sws_M = M
    gm.sws_layers = layers
    gm.train(model.training)
    if example_inputs is not None:
        _check_runs(gm, example_inputs, model)
    return gm


def _capture(work: nn.Module, example_inputs):
    """symbolic_trace, or torch.export when tracing fails or leaves opaque layers with weights.

    A leaf module the width analysis cannot see into (``nn.TransformerEncoderLayer``,
    ``nn.MultiheadAttention``) would stay unwidened; export shows its linears and reshapes.
    """
    from sas_compile.passes.capture import capture
    from sas_compile.passes.tie_channel_widths import op_name

    captured = capture(work, example_inputs)
    if captured.method != "symbolic_trace" or example_inputs is None:
        return captured.gm, captured.method
    gm = captured.gm
    opaque = [
        n.target for n in gm.graph.nodes
        if n.op == "call_module" and op_name(n, gm).startswith("module:")
        and any(True for _ in gm.get_submodule(n.target).parameters())
    ]
    if opaque:
        try:
            with torch.no_grad():
                return torch.export.export(work, example_inputs, strict=False).module(), "export"
        except Exception:  # noqa: BLE001 - keep the traced graph; the analysis says what stays
            pass
    return gm, captured.method


_TRAINING_ARG = {"batch_norm": 5, "dropout": 2, "feature_dropout": 2, "alpha_dropout": 2}


def _trainable_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule of an exported graph whose batch norms and dropouts follow ``.train()``.

    ``torch.export`` bakes the training flag into the graph and its module refuses
    ``.eval()``; the SWS model is trained from scratch and evaluated, so the flag is read
    from the module's ``training`` attribute instead.
    """
    graph = gm.graph
    flag = None
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
            continue
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        idx = _TRAINING_ARG.get(target.overloadpacket.__name__)
        if idx is None or len(node.args) <= idx or not isinstance(node.args[idx], bool):
            continue
        if flag is None:
            with graph.inserting_before(next(iter(graph.nodes))), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `training` is an attribute of every module
                flag = graph.get_attr("training")
        args = list(node.args)
        args[idx] = flag
        node.args = tuple(args)
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    new.meta = getattr(gm, "meta", {})
    return new


def _owner_of(gm: nn.Module, target: str):
    parent, _, attr = target.rpartition(".")
    return (gm.get_submodule(parent) if parent else gm), attr


def _check_runs(gm, example_inputs, model) -> None:
    modes = {m: m.training for m in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad():
            gm(*example_inputs)
    except Exception as err:
        raise RuntimeError(
            f"swsify: the widened {type(model).__name__} does not run on example_inputs ({err}). "
            "Exclude the layers around the failing op with filter_fn, and please report the model."
        ) from err
    finally:
        for m, t in modes.items():
            m.train(t) if isinstance(m, OneOfMMask) else setattr(m, "training", t)


def _layer_weight(model: nn.Module, target: str) -> Tensor:
    owner, attr = _owner_of(model, target)
    return getattr(owner, attr)


def _mask_of(model: nn.Module, target: str) -> Optional[Tensor]:
    owner, attr = _owner_of(model, target)
    if not parametrize.is_parametrized(owner, attr):
        return None
    plist = getattr(owner.parametrizations, attr)
    for p in plist:
        if isinstance(p, OneOfMMask):
            return p.mask(plist.original)
    return None


def sws_costs(model_or_layer: nn.Module, example_inputs=None) -> Dict[str, Dict[str, Any]]:
    """Widths, nonzeros and mults of the conv/linear layers of a built SWS model.

    Keys are the layers' node names in the swsify'd graph (or ``""`` for a single layer).
    Per layer: ``name`` (the module path), ``in_channels``, ``out_channels``, ``in_features`` (fan-in per output),
    ``out_features``, ``groups``, ``weight_numel``, ``nonzeros`` (counted from the live mask;
    all weights when the layer is dense), ``mults_per_position`` (== nonzeros), ``sparse``;
    with ``example_inputs`` also ``positions`` and ``mults``. Counted from the built model,
    not from the analysis, so it checks what ``report`` predicts.
    """
    if isinstance(model_or_layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        return {"": _layer_costs(model_or_layer, "weight", model_or_layer)}
    layers = getattr(model_or_layer, "sws_layers", None)
    if layers is None:
        raise ValueError(
            "sws_costs: expected a model built by sas_compile.swsify (or one nn.Conv1d/nn.Conv2d/nn.Linear), "
            f"got {type(model_or_layer).__name__}"
        )
    positions = _positions(model_or_layer, example_inputs) if example_inputs is not None else {}
    out = {}
    for node_name, target in layers.items():
        owner, attr = _owner_of(model_or_layer, target)
        costs = _layer_costs(owner, attr, _graph_layer(model_or_layer, node_name))
        costs["name"] = target[: -len(".weight")] if target.endswith(".weight") else target
        if node_name in positions:
            costs["positions"] = positions[node_name]
            costs["mults"] = positions[node_name] * costs["nonzeros"]
        out[node_name] = costs
    return out


def _graph_layer(gm, node_name):
    for node in gm.graph.nodes:
        if node.name == node_name:
            if node.op == "call_module":
                return gm.get_submodule(node.target)
            return node
    return None


def _layer_costs(owner: nn.Module, attr: str, layer) -> Dict[str, Any]:
    weight = getattr(owner, attr)
    mask = None
    if parametrize.is_parametrized(owner, attr):
        plist = getattr(owner.parametrizations, attr)
        mask = next((p.mask(plist.original) for p in plist if isinstance(p, OneOfMMask)), None)
    out_features = weight.shape[0]
    fan_in = weight[0].numel() if weight.shape[0] else 0
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        groups, in_channels = layer.groups, layer.in_channels
    elif isinstance(layer, nn.Linear):
        groups, in_channels = 1, layer.in_features
    elif isinstance(layer, fx.Node) and weight.dim() in (3, 4):  # F.conv1d / F.conv2d
        groups = layer.args[6] if len(layer.args) > 6 else layer.kwargs.get("groups", 1)
        # the graph's groups argument is the widened one (a depthwise conv's follows its width)
        in_channels = weight.shape[1] * groups
    else:
        groups, in_channels = 1, weight.shape[1]
    numel = weight.numel()
    nonzeros = int(mask.sum()) if mask is not None else numel
    return {
        "in_channels": int(in_channels), "out_channels": int(out_features), "in_features": int(fan_in),
        "out_features": int(out_features), "groups": int(groups), "weight_numel": int(numel),
        "nonzeros": nonzeros, "mults_per_position": nonzeros, "sparse": mask is not None,
    }


def _positions(gm, example_inputs) -> Dict[str, int]:
    """Output positions (all dims but the channel one) of every layer, from one shape pass."""
    from sas_compile.passes.capture import normalize_example_inputs
    from sas_compile.passes.tie_channel_widths import propagate_shapes

    propagate_shapes(gm, normalize_example_inputs(example_inputs))
    out = {}
    for node in gm.graph.nodes:
        if node.name not in gm.sws_layers:
            continue
        shape = tuple(node.meta["tensor_meta"].shape)
        wdim = _layer_weight(gm, gm.sws_layers[node.name]).dim()
        is_conv = wdim >= 3 and len(shape) >= wdim - 1
        dims = list(shape)
        # a conv's channel dim precedes its spatial dims (-3 for conv2d, -2 for conv1d)
        del dims[-(wdim - 1) if is_conv else -1]
        n = 1
        for d in dims:
            n *= int(d)
        out[node.name] = n
    return out


def export_sws_weights(model: nn.Module, *, strict: bool = True) -> Dict[str, Any]:
    """Pack every masked weight of a built SWS model into the runtime's 2:4 format.

    Returns ``{layer node name: PackedSparseWeight}`` (``sas_compile.runtime.packing``) of the
    masked weight viewed as ``[out, in/groups * kernel]`` (conv1d ``[out, in*k]``, conv2d
    ``[out, in*kh*kw]``); dense layers (no mask) are left out: 1:2 is a valid 2:4 pattern and 1:4
    is stored as 2:4 with explicit zeros. A layer whose 1:M chunks straddle rows
    (``in_features % M != 0``) cannot be packed: ``strict`` raises a ValueError naming it,
    ``strict=False`` leaves it out.
    """
    from sas_compile.runtime.packing import pack_sws_weight

    layers = getattr(model, "sws_layers", None)
    if layers is None:
        raise ValueError("export_sws_weights: expected a model built by sas_compile.swsify")
    M = model.sws_M
    out = {}
    for node_name, target in layers.items():
        owner, attr = _owner_of(model, target)
        if not parametrize.is_parametrized(owner, attr):
            continue
        with torch.no_grad():
            weight = getattr(owner, attr).detach()
        flat = weight.reshape(weight.shape[0], -1)
        if flat.shape[1] % M:
            if strict:
                raise ValueError(
                    f"export_sws_weights: layer {node_name} ({target}) has {flat.shape[1]} weights per "
                    f"row, not a multiple of M={M}: its 1:{M} chunks straddle rows and do not fit 2:4 "
                    "rows. Pass strict=False to leave it out, or exclude it with swsify's filter_fn."
                )
            continue
        out[node_name] = pack_sws_weight(flat.contiguous(), M)
    return out


@dataclass(frozen=True)
class SWSConfig:
    """Options of the SWS baseline (``swsify``): M, the input-layer policy, frozen masks, the filter."""

    M: int = 2
    dense_input_layers: bool = True
    freeze_mask: bool = False
    filter_fn: Optional[FilterFn] = None

    def __post_init__(self):
        check_M(self.M)
        check_filter_fn(self.filter_fn, "swsify: filter_fn")


@register_handler(SWSConfig)
def _convert(model: nn.Module, config: SWSConfig, example_inputs) -> nn.Module:
    built = build_sws(model, M=config.M, example_inputs=example_inputs, filter_fn=config.filter_fn,
                      freeze_mask=config.freeze_mask, dense_input_layers=config.dense_input_layers)
    layers = []
    for node_name, w in built.sws_widths.layers.items():
        name = built.sws_layers[node_name]
        name = name[: -len(".weight")] if name.endswith(".weight") else name
        layers.append(LayerPlan(name, node_name, w.op, bool(w.sparse), w.reason, w.in_channels, w.out_channels,
                                tuple(w.kernel_size), groups=w.groups, weight_target=built.sws_layers[node_name],
                                sws_M=config.M if w.sparse else None))
    return attach_result(built, config, Plan(layers=layers, capture="symbolic_trace"))


def swsify(
    model: nn.Module,
    *,
    M: int = 2,
    example_inputs=None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    freeze_mask: bool = False,
    dense_input_layers: bool = True,
) -> fx.GraphModule:
    """Build the SWS baseline of ``model``: sqrt(M) times wider, 1:M sparse weights.

    ``sparsify(model, SWSConfig(M=M, ...), filter_fn=..., example_inputs=...)``; ``model`` is
    not modified. ``example_inputs`` (a tensor or tuple) gives exact shapes and lets models
    that ``symbolic_trace`` cannot trace be captured with ``torch.export``; the built model is
    run on them once as a check. ``filter_fn(module, fqn) -> bool`` keeps a conv/linear out of
    SWS (its widths stay, its weight stays dense) when it returns False. ``dense_input_layers``
    (default True, as ``sasify``) keeps the weight of a layer reading the raw network input
    dense (no mask) while its output width still widens; False masks it 1:M like the others.
    Every module or parameter whose shape changes is freshly initialised (layer defaults);
    the rest are copies of the original's. The result is a GraphModule whose ``sws_widths``
    attribute holds the width analysis and whose ``sparsify_plan`` lists the layers (sparse
    or why not).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swsify: model must be an nn.Module, got {type(model).__name__}")
    config = SWSConfig(M=M, freeze_mask=freeze_mask, dense_input_layers=bool(dense_input_layers))
    return sparsify(model, config, filter_fn=filter_fn, example_inputs=example_inputs)
