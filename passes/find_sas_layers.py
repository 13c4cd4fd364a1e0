"""Analysis: find every conv/linear call of a captured graph and decide whether it becomes SAS.

Why: the rewrite, ``report`` and ``inspect`` must agree on which layers convert and why the
others stay dense; this pass is the one place that decides. It matches every spelling
(modules, ``F.linear``/``F.conv2d``/``torch.conv2d``, ATen ops from torch.export, dynamo's
``torch._C._nn.linear``), groups call sites that share a weight, applies the input-layer
policy and the user's ``filter_fn``, and records shapes when the capture carried them.

A shared weight is one tensor, whatever its names: call sites are grouped by the tensor
itself (two ``nn.Linear`` whose ``weight`` is one Parameter, a module called twice), so the
rewrite gives the whole group one wide weight. A weight that anything else also reads (a
tied embedding, a module that is not a conv/linear call) keeps the whole group dense, so the
tie holds; ``LayerPlan.shared_with`` names the group either way.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.runtime import sas_ops, sas_transposed  # noqa: F401  (registers torch.ops.sas.*)
from sas_compile.runtime.layers import SAS_LAYERS

from .capture import clean_module_path, example_sizes, layer_owner
from .plan import LayerPlan, Plan

__all__ = ["LayerCall", "match_layer_call", "find_sas_layers", "raw_input_nodes", "layers_from_modules",
           "OPAQUE_PROJECTION_MODULES", "OPAQUE_PROJECTION_FUNCTIONS", "opaque_projection_reason", "opaque_kind",
           "layer_plan_from_module", "already_sas_reason", "parameter_holders",
           "LINEAR_FUNCTIONS", "CONV_FUNCTIONS", "LAYER_MODULES", "CONV_DIMS", "SASOp", "SAS_OPS", "sas_op", "stores_weight", "stock_forward", "op_name"]

LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}
CONV_FUNCTIONS = {
    F.conv2d: "conv2d", torch.conv2d: "conv2d", torch.ops.aten.conv2d.default: "conv2d",
    torch.ops.aten.conv2d.padding: "conv2d",
    F.conv1d: "conv1d", torch.conv1d: "conv1d", torch.ops.aten.conv1d.default: "conv1d",
    torch.ops.aten.conv1d.padding: "conv1d",
    F.conv3d: "conv3d", torch.conv3d: "conv3d", torch.ops.aten.conv3d.default: "conv3d",
    torch.ops.aten.conv3d.padding: "conv3d",
}
# spatial dims of each convolution op
CONV_DIMS = {"conv1d": 1, "conv2d": 2, "conv3d": 3, "conv_transpose1d": 1, "conv_transpose2d": 2,
             "conv_transpose3d": 3}
TRANSPOSED_CONV_MODULES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# the stock layer modules SAS converts (a module swap replaces exactly these)
LAYER_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + TRANSPOSED_CONV_MODULES
# modules whose linear projections run inside them (not as separate linear calls the graph shows)
OPAQUE_PROJECTION_MODULES = (nn.MultiheadAttention, nn.RNNBase, nn.TransformerEncoderLayer,
                             nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder,
                             nn.Transformer, nn.Bilinear)
# ops that run a layer's projections inside one call (an RNN's gates, attention's in/out projections,
# a bilinear form, the encoder layer's inference fast path): no entry point converts them, each is
# listed dense with :func:`opaque_projection_reason`; the value is the kind of layer
OPAQUE_PROJECTION_FUNCTIONS = {
    torch.lstm: "rnn", torch.gru: "rnn", torch.rnn_tanh: "rnn", torch.rnn_relu: "rnn",
    torch.ops.aten.lstm.input: "rnn", torch.ops.aten.gru.input: "rnn", torch.ops.aten.rnn_tanh.input: "rnn",
    torch.ops.aten.rnn_relu.input: "rnn",
    F.bilinear: "bilinear", torch.bilinear: "bilinear", torch.ops.aten.bilinear.default: "bilinear",
    F.multi_head_attention_forward: "attention", torch._native_multi_head_attention: "attention",
    torch.ops.aten._native_multi_head_attention.default: "attention",
    torch._transformer_encoder_layer_fwd: "encoder_fast_path",
    torch.ops.aten._transformer_encoder_layer_fwd.default: "encoder_fast_path",
}
TRANSPOSED_CONV_FUNCTIONS = {
    F.conv_transpose1d: "conv_transpose1d", torch.conv_transpose1d: "conv_transpose1d",
    torch.ops.aten.conv_transpose1d.default: "conv_transpose1d",
    F.conv_transpose2d: "conv_transpose2d", torch.conv_transpose2d: "conv_transpose2d",
    torch.ops.aten.conv_transpose2d.input: "conv_transpose2d",
    F.conv_transpose3d: "conv_transpose3d", torch.conv_transpose3d: "conv_transpose3d",
    torch.ops.aten.conv_transpose3d.input: "conv_transpose3d",
}
_CONV_ARG_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


@dataclass
class LayerCall:
    """A conv/linear call site with its arguments normalised."""

    node: fx.Node
    op: str  # linear | conv1d | conv2d | conv3d | conv_transpose1d/2d/3d | <unsupported op name>
    x: fx.Node
    weight: object  # fx.Node (get_attr / placeholder / computed) or None for module calls
    bias: object
    module: Optional[nn.Module]
    module_path: Optional[str]
    stride: Tuple[int, ...] = ()
    padding: object = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    supported: bool = True
    unsupported_reason: Optional[str] = None
    weight_in_out: bool = False  # the weight is stored ``[in, out]`` (addmm's second matrix)
    weight_view: Optional[fx.Node] = None  # a matmul's transpose of its [out, in] weight (``x @ W.T``)
    output_padding: Tuple[int, ...] = ()  # a transposed convolution's


def _tup(v, n):
    return (v,) * n if isinstance(v, int) else tuple(v)


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def match_layer_call(node: fx.Node, gm: fx.GraphModule) -> Optional[LayerCall]:
    """A LayerCall when ``node`` is a conv/linear call in any spelling, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        x = node.args[0] if node.args else None
        if isinstance(mod, nn.Linear):
            return LayerCall(node, "linear", x, None, None, mod, node.target)
        if isinstance(mod, LAYER_MODULES[1:]):
            op = module_op(mod)
            n = CONV_DIMS[op]
            # a padding_mode other than 'zeros' is the SAS layer's too (it pads before projecting)
            call = LayerCall(node, op, x, None, None, mod, node.target, _tup(mod.stride, n), mod.padding,
                             _tup(mod.dilation, n), mod.groups)
            if isinstance(mod, TRANSPOSED_CONV_MODULES):
                call.output_padding = _tup(mod.output_padding, n)
                if len(node.args) > 1 or node.kwargs:  # forward(x, output_size): resolved per call by the layer
                    call.output_padding = ()
            return call
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in LINEAR_FUNCTIONS:
        return LayerCall(node, "linear", _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), None, None)
    if target in CONV_FUNCTIONS:
        op = CONV_FUNCTIONS[target]
        n = CONV_DIMS[op]
        args = [_arg(node, i, name, d) for i, (name, d) in enumerate(zip(_CONV_ARG_NAMES, (None, None, None, 1, 0, 1, 1)))]
        return LayerCall(node, op, args[0], args[1], args[2], None, None, _tup(args[3], n), args[4] if isinstance(args[4], str) else _tup(args[4], n),
                         _tup(args[5], n), int(args[6]))
    if target in TRANSPOSED_CONV_FUNCTIONS:
        # conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)
        op = TRANSPOSED_CONV_FUNCTIONS[target]
        n = CONV_DIMS[op]
        return LayerCall(node, op, _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias"), None, None,
                         _tup(_arg(node, 3, "stride", 1), n), _tup(_arg(node, 4, "padding", 0), n),
                         _tup(_arg(node, 7, "dilation", 1), n), int(_arg(node, 6, "groups", 1)),
                         output_padding=_tup(_arg(node, 5, "output_padding", 0), n))
    return None


ADDMM_FUNCTIONS = {torch.addmm, torch.ops.aten.addmm.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, torch.ops.aten.matmul.default, torch.ops.aten.mm.default}
OTHER_OPS_REASON = ("a linear written with other ops ({}) on a parameter, not as nn.Linear / F.linear: counted, kept "
                    "dense (sasify swaps a module whose whole forward it is, as transformers' Conv1D in GPT-2 or "
                    "FalconLinear, for a SAS linear; where the graph itself is rewritten it stays dense)")


def _other_ops_layer_call(node: fx.Node) -> Optional[LayerCall]:
    """A linear written with other ops, for the analysis: ``addmm(b, x, W)`` (``W`` stored
    ``[in, out]``), ``x @ W`` or ``x @ W.T``. The caller keeps it only where ``W`` is a
    parameter (a product of activations is no layer); the SWS width rules and the graph
    rewrite do not match it, a module swap may replace a module whose whole forward it is."""
    if node.op != "call_function":
        return None
    if node.target in ADDMM_FUNCTIONS and len(node.args) >= 3:
        if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        return LayerCall(node, "linear", node.args[1], node.args[2], node.args[0], None, None, supported=False,
                         unsupported_reason=OTHER_OPS_REASON.format("addmm"), weight_in_out=True)
    if node.target in MATMUL_FUNCTIONS and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        weight, view = node.args[1], None
        source = _transposed_2d(weight)
        if source is not None:
            weight, view = source, weight
        return LayerCall(node, "linear", node.args[0], weight, None, None, None, supported=False,
                         unsupported_reason=OTHER_OPS_REASON.format("x @ W.T" if view is not None else "x @ W"),
                         weight_in_out=view is None, weight_view=view)
    return None


def _transposed_2d(node: fx.Node) -> Optional[fx.Node]:
    """The node whose 2-D transpose ``node`` is (``W.T``, ``W.t()``, ``W.transpose(0, 1)``,
    ``aten.t`` / ``aten.permute(W, [1, 0])``), else None."""
    if node.op == "call_method" and node.target in ("t", "transpose", "permute"):
        dims = tuple(node.args[1:])
        if node.target == "t" or sorted(dims) in ([0, 1], [-2, -1]) or dims == ((1, 0),):
            return node.args[0] if isinstance(node.args[0], fx.Node) else None
        return None
    if node.op != "call_function":
        return None
    if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
        return node.args[0]
    if node.target in (torch.t, torch.ops.aten.t.default, torch.ops.aten.numpy_T.default):
        return node.args[0]
    if node.target in (torch.transpose, torch.ops.aten.transpose.int) and sorted(node.args[1:3]) in ([0, 1], [-2, -1]):
        return node.args[0]
    if node.target in (torch.permute, torch.ops.aten.permute.default) and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def _shape(node) -> Optional[Tuple[int, ...]]:
    if not isinstance(node, fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return example_sizes(meta.shape)
    val = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return example_sizes(val.shape)  # a dynamic size read without pinning the graph to it
    return None


def _weight_tensor(call: LayerCall, gm: fx.GraphModule, parameters: Dict[str, torch.Tensor]):
    """(kind, target, tensor): kind is module | attr | placeholder | computed."""
    if call.module is not None:
        return "module", f"{call.module_path}.weight", call.module.weight
    w = call.weight
    if isinstance(w, fx.Node) and w.op == "get_attr":
        try:
            return "attr", w.target, gm.get_parameter(w.target)
        except AttributeError:
            try:
                return "attr", w.target, gm.get_buffer(w.target)
            except AttributeError:
                return "computed", w.target, None
    if isinstance(w, fx.Node) and w.op == "placeholder" and w.name in parameters:
        return "placeholder", w.name, parameters[w.name]
    return "computed", getattr(w, "name", str(w)), None


def raw_input_nodes(gm: fx.GraphModule, param_placeholders: set) -> set:
    """Nodes computed from the network inputs alone, through no parameter or layer."""
    raw = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.name not in param_placeholders:
                raw.add(node)
            continue
        if node.op in ("get_attr", "output"):
            continue
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if any(True for _ in mod.parameters()) or any(True for _ in mod.buffers()):
                continue
        if match_layer_call(node, gm) is not None:
            continue
        inputs = node.all_input_nodes
        if inputs and all(i in raw for i in inputs):
            raw.add(node)
    return raw


def _innermost_module(node: fx.Node) -> Optional[Tuple[str, Any]]:
    """``(path as the capture wrote it, class)`` of the module an op ran in, from the
    ``nn_module_stack`` export and dynamo record (innermost last), else None."""
    stack = node.meta.get("nn_module_stack")
    return tuple(list(stack.values())[-1]) if stack else None


def _stack_layer_path(call: LayerCall) -> Optional[str]:
    """The path of the Linear/Conv module the call ran in, from ``nn_module_stack``, else None."""
    innermost = _innermost_module(call.node)
    if innermost is None:
        return None
    path, cls = innermost
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
    return clean_module_path(path) if any(k in cls_name for k in ("Linear", "Conv")) else None


def _layer_name(call: LayerCall, kind: str, target: str, gm: fx.GraphModule) -> str:
    if call.module_path is not None:
        return call.module_path
    if _stack_layer_path(call) is not None:
        return _stack_layer_path(call)
    if target.endswith(".weight"):
        return target[: -len(".weight")]
    return target


def find_sas_layers(gm: fx.GraphModule, plan: Plan, config) -> Plan:
    """Fill ``plan.layers`` with every conv/linear call of ``gm``: eligibility, reasons, shapes.

    Reads ``config.filter_fn`` and ``config.dense_input_layers``; ``plan.capture`` says how
    ``gm`` was captured, ``plan.parameters`` / ``plan.sources`` map a dynamo graph's lifted
    parameters to their tensors and user paths, and ``plan.model`` (an export capture) tells
    module calls, which the rewrite can swap, from functional ones. ReLU folds are decided by
    the next pass.
    """
    filter_fn = getattr(config, "filter_fn", None)
    dense_input_layers = getattr(config, "dense_input_layers", True)
    parameters, sources = plan.parameters, plan.sources
    raw = raw_input_nodes(gm, set(parameters))
    layers: List[LayerPlan] = []
    sites: Dict[object, List[LayerPlan]] = {}
    weights: List[torch.Tensor] = []  # alive until the groups are resolved: their ids are the group keys
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), SAS_LAYERS):
            mod = gm.get_submodule(node.target)
            layers.append(_existing_sas_layer(node, mod))
            continue
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), OPAQUE_PROJECTION_MODULES):
            layers.append(_opaque_module_layer(node, gm.get_submodule(node.target)))
            continue
        if node.op == "call_function" and node.target in OPAQUE_PROJECTION_FUNCTIONS:
            layers.append(_opaque_function_layer(node, OPAQUE_PROJECTION_FUNCTIONS[node.target], gm))
            continue
        existing = _existing_sas_call(node, gm, sources)
        if existing is not None:
            layers.append(existing)
            continue
        call = match_layer_call(node, gm) or _other_ops_layer_call(node)
        if call is None:
            continue
        kind, target, weight = _weight_tensor(call, gm, parameters)
        if call.op == "linear" and not call.supported and (kind == "computed" or weight is None or weight.dim() != 2):
            continue  # a product of activations (or a batched one), not a layer
        name = sources.get(target, None) if kind == "placeholder" else None
        if name is not None and _stack_layer_path(call) is not None:
            name = _stack_layer_path(call)  # the module that made the call (a tied weight has one source name)
        elif name is not None:
            name = name[:-7] if name.endswith(".weight") else name
        else:
            name = _layer_name(call, kind, target, gm)
        layer = _describe(call, kind, target, weight, name)
        layer.input_shape = _shape(call.x)
        layer.output_shape = _shape(node)
        layer.input_is_graph_input = call.x in raw
        layer.weight_kind = kind
        layer.call = call
        if kind == "placeholder":
            layer.parameter_sources = tuple(sources.get(n.name) if isinstance(n, fx.Node) else None
                                            for n in (call.weight, call.bias))
        layer.eligible, layer.reason = _eligibility(call, kind, weight, layer, filter_fn, dense_input_layers, gm,
                                                    plan.capture, plan.model, parameters)
        layers.append(layer)
        # one group per weight tensor, whatever name each call site reaches it by
        weights.append(weight)
        group = sites.setdefault(id(weight) if weight is not None else target, [])
        layer.weight_group = group[0].weight_target if group else target
        group.append(layer)
    # a dynamo capture of a model: layer modules holding a weight are judged across all its graphs
    # (pipeline._module_swap_conflicts), as a tied partner may be called in another graph
    defer = plan.capture == "dynamo" and plan.model is not None
    _resolve_shared_weights(sites, _other_weight_uses(gm, plan.model, sites, defer_layer_holders=defer))
    plan.layers = layers
    return plan


def module_op(mod: nn.Module) -> str:
    """``linear``, ``conv1d/2d/3d`` or ``conv_transpose1d/2d/3d`` for a layer module (dense or SAS)."""
    if hasattr(mod, "in_features"):
        return "linear"
    if getattr(mod, "transposed", False) is True:  # nn.ConvTranspose*d and SAS ones
        return f"conv_transpose{len(mod.kernel_size)}d"
    return f"conv{len(mod.kernel_size)}d"


def layer_plan_from_module(fqn: str, node: str, mod: nn.Module, eligible: bool, reason: Optional[str]) -> LayerPlan:
    """A LayerPlan read off a Linear/Conv module (dense or SAS: both keep narrow widths)."""
    op = module_op(mod)
    if op == "linear":
        return LayerPlan(fqn, node, op, eligible, reason, mod.in_features, mod.out_features,
                         has_bias=mod.bias is not None, weight_target=f"{fqn}.weight", module_target=fqn)
    return LayerPlan(fqn, node, op, eligible, reason, mod.in_channels, mod.out_channels, tuple(mod.kernel_size),
                     tuple(mod.stride), mod.padding, tuple(mod.dilation), mod.groups, mod.bias is not None,
                     f"{fqn}.weight", fqn)


def layers_from_modules(model: nn.Module, config) -> List[LayerPlan]:
    """Without a graph (a model no capture could trace): its layer modules, in registration order.

    The input-layer rule can only guess (the first layer module), and says so.
    """
    filter_fn = getattr(config, "filter_fn", None)
    layers, first = [], True
    for fqn, mod in model.named_modules():
        if isinstance(mod, SAS_LAYERS):
            layer = layer_plan_from_module(fqn, fqn, mod, False, already_sas_reason(mod.M))
            layer.sas_M = mod.M
        elif isinstance(mod, LAYER_MODULES):
            eligible, reason = True, None
            if first and getattr(config, "dense_input_layers", True):
                eligible, reason = False, ("input layer (assumed: the first layer module; pass example_inputs for an "
                                           "exact analysis), kept dense as in the reference code")
            elif filter_fn is not None and not filter_fn(mod, fqn):
                eligible, reason = False, "excluded by filter_fn"
            layer = layer_plan_from_module(fqn, fqn, mod, eligible, reason)
        else:
            continue
        first = False
        layers.append(layer)
    return layers


def already_sas_reason(M: int) -> str:
    """Why an existing SAS layer is left as it is (a trained wide weight is never re-expanded)."""
    return f"already a SAS layer (M={M}): stays at its M, its wide weight is not re-expanded"


def _existing_sas_layer(node: fx.Node, mod) -> LayerPlan:
    layer = layer_plan_from_module(node.target, node.name, mod, False, already_sas_reason(mod.M))
    layer.sas_M = mod.M
    layer.input_shape = _shape(node.args[0]) if node.args else None
    layer.output_shape = _shape(node)
    return layer


def opaque_kind(mod: nn.Module) -> str:
    """The kind of a module in ``OPAQUE_PROJECTION_MODULES``, for :func:`opaque_projection_reason`."""
    if isinstance(mod, nn.RNNBase):
        return "rnn"
    if isinstance(mod, nn.Bilinear):
        return "bilinear"
    if isinstance(mod, nn.MultiheadAttention):
        return "attention"
    return "transformer"


def opaque_projection_reason(kind: str, name: str) -> str:
    """Why a module or op that runs its projections inside one call stays dense, and what each
    entry point does with it (checked: dynamo keeps each of these calls whole)."""
    if kind == "rnn":
        return (f"{name}: its gate projections run inside one fused RNN op, not as linear calls: kept dense (SAS "
                "converts Linear and Conv1d/2d/3d layers). Under torch.compile, dynamo captures no graph of a "
                "forward that calls an RNN module (unless torch._dynamo.config.allow_rnn = True), so "
                "backend='sas' leaves every layer of that forward dense; sasify converts the layers around it")
    if kind == "bilinear":
        return (f"{name}: a bilinear layer (x1^T W x2), not a linear one: kept dense (SAS converts Linear and "
                "Conv1d/2d/3d layers)")
    if kind == "attention":
        return (f"{name}: its input and output projections run inside F.multi_head_attention_forward (or its "
                "inference fast path), one call that torch.compile also keeps whole, not as linear calls: kept "
                "dense")
    if kind == "encoder_fast_path":
        return (f"{name}: nn.TransformerEncoderLayer's inference fast path (torch._transformer_encoder_layer_fwd) "
                "runs its attention and feed-forward projections in one fused op: kept dense (with gradients on, "
                "the layer runs its Python code and its feed-forward linears convert)")
    return (f"{name}: its projections run inside the module, which this capture does not see into: kept dense "
            "(torch.compile(model, backend='sas') converts its feed-forward linears, except where an encoder "
            "layer takes PyTorch's inference fast path; its attention projections stay dense)")


def _opaque_module_layer(node: fx.Node, mod: nn.Module) -> LayerPlan:
    cls = type(mod).__name__
    layer = LayerPlan(node.target, node.name, cls.lower(), False, opaque_projection_reason(opaque_kind(mod), cls),
                      0, 0, module_target=node.target, weight_kind="module")
    layer.input_shape = _shape(node.args[0]) if node.args else None
    return layer


def _opaque_function_layer(node: fx.Node, kind: str, gm: fx.GraphModule) -> LayerPlan:
    """A dense layer for an op in ``OPAQUE_PROJECTION_FUNCTIONS``, named after the module it ran in
    (``nn_module_stack``: an export or dynamo graph), else after its node."""
    function = getattr(getattr(node.target, "overloadpacket", node.target), "__name__", str(node.target))
    innermost = _innermost_module(node)
    path, cls_name, opaque_module = None, function, False
    if innermost is not None:
        path = clean_module_path(innermost[0]) or None
        cls = innermost[1]  # a class (dynamo) or its qualified name (export)
        if isinstance(cls, str):
            cls_name = cls.rsplit(".", 1)[-1]
            cls = getattr(nn, cls_name, None)
        else:
            cls_name = getattr(cls, "__name__", function)
        opaque_module = path is not None and isinstance(cls, type) and issubclass(cls, OPAQUE_PROJECTION_MODULES)
    op = cls_name.lower() if opaque_module else function.lstrip("_")
    layer = LayerPlan(path or node.name, node.name, op, False, opaque_projection_reason(kind, cls_name if opaque_module
                                                                                         else function),
                      0, 0, module_target=path if opaque_module else None, weight_kind="module" if opaque_module
                      else "computed")
    layer.input_shape = _shape(node.args[0]) if node.args else None
    return layer


@dataclass(frozen=True)
class SASOp:
    """One ``sas::`` op: the layer it computes and where its ``M`` argument is."""

    kind: str  # linear | conv2d | conv_transpose, each also ``*_from_dense``
    op: str  # the layer op: linear | conv2d | conv_transpose
    m_index: int  # position of M among the op's arguments
    wide_weight: bool  # its weight argument is already the wide (M times) weight, not a dense one


# Every sas:: op, keyed by its overload packet: a graph may call the packet (dynamo records
# ``torch.ops.sas.linear``, the spelling SASLinear.forward uses) or an overload; ``sas_op`` finds
# the entry for either. A graph that sasify rewrites calls the ops' Python entry points, which take
# the ops' arguments and run the composite form under torch.func transforms and forward AD
# (``sas_ops``, *the composite form*); dynamo and export trace through them to the ops.
SAS_OPS: Dict[object, SASOp] = {
    torch.ops.sas.linear: SASOp("linear", "linear", 3, True),
    torch.ops.sas.conv2d: SASOp("conv2d", "conv2d", 7, True),
    sas_ops.sas_linear_call: SASOp("linear", "linear", 3, True),
    sas_ops.sas_conv2d_call: SASOp("conv2d", "conv2d", 7, True),
    torch.ops.sas.linear_from_dense: SASOp("linear_from_dense", "linear", 3, False),
    torch.ops.sas.conv2d_from_dense: SASOp("conv2d_from_dense", "conv2d", 7, False),
    torch.ops.sas.conv_transpose: SASOp("conv_transpose", "conv_transpose", 8, True),
    sas_transposed.sas_conv_transpose_call: SASOp("conv_transpose", "conv_transpose", 8, True),
    torch.ops.sas.conv_transpose_from_dense: SASOp("conv_transpose_from_dense", "conv_transpose", 8, False),
}


def sas_op(target) -> Optional[SASOp]:
    """The ``sas::`` op a ``call_function`` target calls, whichever spelling (packet or overload), else None."""
    try:
        return SAS_OPS.get(getattr(target, "overloadpacket", target))
    except TypeError:  # an unhashable target is no sas:: op
        return None


def _existing_sas_call(node: fx.Node, gm: fx.GraphModule, sources: Optional[Dict[str, str]] = None
                       ) -> Optional[LayerPlan]:
    """A LayerPlan (not eligible, ``sas_M`` set) for a ``sas::linear`` / ``sas::conv2d`` call on its own
    wide weight, else None. ``sources`` names a dynamo graph's lifted parameters by their user paths."""
    spec = sas_op(node.target) if node.op == "call_function" else None
    if spec is None or not spec.wide_weight:
        return None
    op, sources = spec.op, sources or {}
    M = int(_arg(node, spec.m_index, "M"))
    w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    is_attr = isinstance(w, fx.Node) and w.op == "get_attr"
    is_placeholder = isinstance(w, fx.Node) and w.op == "placeholder"
    target = w.target if is_attr else getattr(w, "name", str(w))
    tensor = _graph_tensor(gm, w.target) if is_attr else None
    shape = tuple(tensor.shape) if tensor is not None else _shape(w)
    name = sources.get(target, target) if is_placeholder else target
    name = name[: -len(".weight")] if name.endswith(".weight") else name
    groups = int(_arg(node, spec.m_index - 1, "groups", 1)) if op != "linear" else 1
    if op == "conv_transpose":  # the wide weight is [M * in, out/groups, *kernel]
        out_c, in_c = (shape[1] * groups, shape[0] // M) if shape else (-1, -1)
    else:
        out_c, in_c = (shape[0], shape[1] // M * groups) if shape else (-1, -1)
    kernel = tuple(shape[2:]) if shape and op != "linear" else ()
    if op == "conv2d" and kernel:  # the one conv op serves conv1d (3-D weight) and conv3d (5-D) layers
        op = f"conv{len(kernel)}d"
    elif op == "conv_transpose" and kernel:
        op = f"conv_transpose{len(kernel)}d"
    layer = LayerPlan(name, node.name, op, False, already_sas_reason(M), in_c, out_c, kernel, groups=groups,
                      has_bias=b is not None, weight_target=target,
                      weight_kind="placeholder" if is_placeholder else "attr", sas_M=M)
    if is_placeholder:
        layer.parameter_sources = tuple(sources.get(n.name) if isinstance(n, fx.Node) else None for n in (w, b))
    layer.input_shape, layer.output_shape = _shape(node.args[0]), _shape(node)
    return layer


def _describe(call: LayerCall, kind: str, target: str, weight, name: str) -> LayerPlan:
    has_bias = (call.module.bias is not None) if call.module is not None else call.bias is not None
    # a computed weight has no tensor, but the capture may know its shape
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else _shape(call.weight)
    if shape is not None and call.weight_in_out:
        shape = shape[::-1]
    if call.op == "linear":
        out_c, in_c = (shape[0], shape[1]) if shape else (-1, -1)
        return LayerPlan(name, call.node.name, "linear", True, None, in_c, out_c, has_bias=has_bias,
                         weight_target=target, module_target=call.module_path, weight_in_out=call.weight_in_out)
    if shape is not None and "transpose" in call.op:  # stored [in, out / groups, *kernel]
        out_c, in_c, kernel = shape[1] * call.groups, shape[0], tuple(shape[2:])
    elif shape is not None:
        out_c, in_c, kernel = shape[0], shape[1] * call.groups, tuple(shape[2:])
    else:
        out_c, in_c, kernel = -1, -1, ()
    return LayerPlan(name, call.node.name, call.op, True, None, in_c, out_c, kernel, call.stride, call.padding,
                     call.dilation, call.groups, has_bias, target, call.module_path)


def _get_submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _eligibility(call, kind, weight, layer, filter_fn, dense_input_layers, gm, capture, model,
                 parameters: Dict[str, torch.Tensor]) -> Tuple[bool, Optional[str]]:
    if call.op == "linear" and not call.supported and capture in ("dynamo", "export") and model is not None:
        # a module swap can replace a module whose whole forward is this linear (transformers' Conv1D)
        layer.module_target = _linear_module(call, gm, weight, model, parameters)
        if layer.module_target is None:
            return False, call.unsupported_reason
        why = _policy_reason(call, kind, weight, layer, filter_fn, dense_input_layers, gm, model)
        return why is None, why
    if not call.supported:
        return False, call.unsupported_reason
    if kind == "computed" or weight is None:
        return False, "the weight is computed inside the graph, not a parameter: nothing to widen"
    if kind == "module" and "forward" in vars(call.module):
        return False, (f"its forward is replaced on the instance ({getattr(call.module.forward, '__qualname__', 'a wrapper')}, "
                       "as accelerate's hooks do): a SAS layer would drop that wrapper")
    if kind == "module" and not stores_weight(call.module):
        return False, (f"{type(call.module).__name__}.weight is computed from other tensors before each call "
                       "(weight_norm, spectral_norm or a parametrization), not a stored parameter: nothing to widen")
    why = _policy_reason(call, kind, weight, layer, filter_fn, dense_input_layers, gm, model)
    if why is not None:
        return False, why
    if capture == "export" and call.module is None and kind == "attr":
        # torch.export inlines modules: only a whole nn.Linear/nn.Conv call can be swapped back
        owner_path = layer.weight_target.rsplit(".", 1)[0] if "." in layer.weight_target else ""
        last = _innermost_module(call.node)
        if last is not None and model is not None:
            # the module the call ran in; export may name a tied weight after another of its owners
            stack_path = clean_module_path(last[0])
            stack_owner = _get_submodule(model, stack_path)
            if isinstance(stack_owner, LAYER_MODULES) and stack_owner.weight is weight:
                owner_path = stack_path
        owner = _get_submodule(model, owner_path) if model is not None else None
        is_module_call = (last is not None and clean_module_path(last[0]) == owner_path
                          and isinstance(owner, LAYER_MODULES)
                          and stock_forward(owner)
                          and (owner.weight is weight or layer.weight_target == f"{owner_path}.weight"))
        if not is_module_call:
            return False, ("functional call (or a module with its own forward) in a model that symbolic tracing "
                           "cannot capture: only stock nn.Linear/nn.Conv1d/2d/3d modules are swapped there; "
                           "torch.compile(model, backend='sas') converts it")
        layer.module_target = owner_path
    if capture == "dynamo" and kind == "placeholder" and model is not None:
        # a model's analysis (report, sasify): the rewrite swaps modules in a copy of the model
        layer.module_target = _dynamo_module_call(call, weight, model)
        if layer.module_target is None:
            return False, ("functional call (or a module with its own forward) in a model captured by dynamo: "
                           "only stock nn.Linear/nn.Conv1d/2d/3d modules are swapped there; "
                           "torch.compile(model, backend='sas') converts it")
    return True, None


def stores_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is a tensor the module stores (a Parameter or buffer of its own),
    not one a hook or a parametrization computes before each call (then a wide copy of it would be
    overwritten, or would bypass the computation)."""
    if torch.nn.utils.parametrize.is_parametrized(module, "weight"):
        return False
    return "weight" in module._parameters or "weight" in module._buffers


def _policy_reason(call, kind, weight, layer, filter_fn, dense_input_layers, gm, model) -> Optional[str]:
    """The user's policy for a layer that could convert: a float weight, the input-layer rule and
    ``filter_fn``; None when it lets the layer convert."""
    if not weight.is_floating_point():
        return f"weight dtype {weight.dtype} is not a floating point type"
    if dense_input_layers and layer.input_is_graph_input:
        return ("input layer: reads the raw network input, kept dense as in the reference code "
                "(pass dense_input_layers=False to convert it)")
    if filter_fn is not None:
        owner = call.module
        if owner is None and kind in ("attr",) and "." in layer.weight_target:
            owner = gm.get_submodule(layer.weight_target.rsplit(".", 1)[0])
        elif owner is None and kind == "attr":
            owner = gm
        # a dynamo graph's parameters are inputs: under the backend (no model) no module to follow
        owner = layer_owner(model, layer.name, owner)
        if not filter_fn(owner, layer.name):
            return "excluded by filter_fn"
    return None


def _linear_module(call: LayerCall, gm: fx.GraphModule, weight, model: nn.Module,
                   parameters: Dict[str, torch.Tensor]) -> Optional[str]:
    """The path of the module whose whole forward is this linear written with other ops, on its own
    weight and bias, else None: ``addmm(b, x.view(-1, in), W).view(...)`` (transformers' Conv1D,
    ``W`` stored ``[in, out]``) or ``x @ W.T + b`` (FalconLinear). Such a module computes
    ``F.linear(x, W', b)``, so a SAS linear can take its place. Proved from the graph: every op that
    ran in the module is the product, the weight's transpose, a reshape or the add of its own bias,
    and its output has its input's leading sizes."""
    innermost = _innermost_module(call.node)
    if innermost is None:
        return None
    raw_path = innermost[0]
    path = clean_module_path(raw_path)
    owner = _get_submodule(model, path) if path else None
    if (owner is None or getattr(owner, "weight", None) is not weight or "forward" in vars(owner)
            or any(True for _ in owner.children()) or any(True for _ in owner.buffers())
            or set(dict(owner.named_parameters(recurse=False))) - {"weight", "bias"}):
        return None  # only its weight and bias: no buffer could stand in for its input
    bias = getattr(owner, "bias", None)
    if call.bias is not None and not (isinstance(bias, torch.Tensor) and _reads(call.bias, bias, gm, parameters)):
        return None  # addmm's first operand must be the module's own bias
    inside = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
              and (_innermost_module(n) or (None,))[0] == raw_path]
    bias_adds = [n for n in inside if _adds(n, bias, gm, parameters)]
    if call.bias is not None and bias_adds:
        return None  # addmm adds the bias already: another add is more than a linear
    if isinstance(bias, torch.Tensor) and call.bias is None and len(bias_adds) != 1:
        return None  # a module bias a matmul must add exactly once
    if any(n not in (call.node, call.weight_view) and n not in bias_adds and not _is_reshape(n) for n in inside):
        return None
    # the module's input and output: what enters it from outside, what leaves it
    members = set(inside)
    entering = {a for n in inside for a in n.all_input_nodes if a not in members and _shape(a) is not None
                and a.op != "get_attr" and a.name not in parameters}
    leaving = [n for n in inside if any(u not in members for u in n.users)]
    if len(entering) != 1 or len(leaving) != 1:
        return None
    x_shape, y_shape = _shape(next(iter(entering))), _shape(leaving[0])
    in_features, out_features = weight.shape if call.weight_in_out else weight.shape[::-1]
    if x_shape is None or y_shape is None or x_shape[-1] != in_features or y_shape != (*x_shape[:-1], out_features):
        return None
    return path


def _adds(node: fx.Node, bias, gm: fx.GraphModule, parameters: Dict[str, torch.Tensor]) -> bool:
    """Whether ``node`` adds the tensor ``bias`` (read from the graph) to something."""
    if not isinstance(bias, torch.Tensor):
        return False
    is_add = (node.op == "call_method" and node.target == "add") or (
        node.op == "call_function" and node.target in (operator.add, torch.add, torch.ops.aten.add.Tensor))
    return (is_add and len(node.args) >= 2 and node.kwargs.get("alpha", 1) == 1
            and any(_reads(a, bias, gm, parameters) for a in node.args[:2]))


def op_name(node: fx.Node) -> str:
    """The name a function or method call goes by (``aten.view.default``, ``torch.Tensor.view`` and
    ``x.view`` are all ``"view"``; ATen overloads by packet)."""
    if node.op == "call_method":
        return str(node.target)
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    return getattr(target, "__name__", str(target))


def _is_reshape(node: fx.Node) -> bool:
    """A reshape of a tensor, or arithmetic on sizes (never on tensors), in any capture's spelling."""
    name = op_name(node)
    if name in ("view", "reshape", "_unsafe_view", "contiguous"):
        return True
    value = node.meta.get("val", node.meta.get("example_value"))
    return name in ("size", "sym_size", "getitem", "add", "mul", "floordiv") and not isinstance(value, torch.Tensor)


def _reads(value, tensor, gm: fx.GraphModule, parameters: Dict[str, torch.Tensor]) -> bool:
    """Whether the graph value ``value`` is ``tensor`` (a get_attr, or a parameter dynamo lifted)."""
    if not isinstance(value, fx.Node):
        return False
    if value.op == "get_attr":
        return _graph_tensor(gm, value.target) is tensor
    return value.op == "placeholder" and parameters.get(value.name) is tensor


# a module swap replaces the module's forward: only these forwards are known to be the call the graph shows
STOCK_FORWARDS = tuple(cls.forward for cls in LAYER_MODULES)


def stock_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs nn.Linear/Conv1d/2d/3d's own forward: its class does not override
    it, and neither does the instance (accelerate and other tools replace ``module.forward``)."""
    return type(module).forward in STOCK_FORWARDS and "forward" not in vars(module)


def _dynamo_module_call(call: LayerCall, weight, model: nn.Module) -> Optional[str]:
    """The path in ``model`` of the stock ``nn.Linear``/``nn.Conv1d/2d/3d`` module whose own
    forward made ``call`` on its own weight (dynamo inlines module calls; ``nn_module_stack``
    names the module each op ran in), else None."""
    innermost = _innermost_module(call.node)
    if innermost is None:
        return None
    path = clean_module_path(innermost[0])
    owner = _get_submodule(model, path)
    if owner is None or not stock_forward(owner) or getattr(owner, "weight", None) is not weight:
        return None
    return path


def _other_weight_uses(gm: fx.GraphModule, model: Optional[nn.Module], sites: Dict[object, List[LayerPlan]],
                       *, defer_layer_holders: bool = False) -> Dict[object, List[str]]:
    """Per weight group: what else reads or holds that weight tensor besides its conv/linear call sites.

    Graph uses (a module call that is not one of the sites, e.g. the ``nn.Embedding`` of a
    tied LM head, or a ``get_attr`` read by another op) and modules of ``model`` (or ``gm``)
    that hold the tensor under another name without being one of the sites' modules. With
    ``defer_layer_holders`` a stock Linear/Conv module holding it as its weight is left to the
    caller, who sees every graph of the model (a tied partner may be called in another graph).
    """
    uses: Dict[object, List[str]] = {key: [] for key in sites if isinstance(key, int)}
    if not uses:
        return uses
    by_node = {layer.node: layer for group in sites.values() for layer in group}
    # a matmul's transpose of its weight (x @ W.T) is part of its call site
    views = {layer.call.weight_view.name: layer for layer in by_node.values()
             if layer.call is not None and layer.call.weight_view is not None}
    site_modules: Dict[object, set] = {key: set() for key in uses}
    attr_targets: Dict[object, set] = {key: set() for key in uses}
    for key in uses:
        for layer in sites[key]:
            call = layer.call
            if call.module is not None:
                site_modules[key].add(id(call.module))
            elif model is not None and layer.module_target is not None:  # export: the swapped module
                owner = _get_submodule(model, layer.module_target)
                if owner is not None:
                    site_modules[key].add(id(owner))
            if layer.weight_kind == "attr":
                attr_targets[key].add(layer.weight_target)
    called = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            called.add(id(mod))
            for pname, p in mod.named_parameters(remove_duplicate=False):
                site = by_node.get(node.name)
                if id(p) in uses and not (site is not None and pname == "weight" and site.call.module is mod):
                    uses[id(p)].append(f"{node.target} ({type(mod).__name__})")
        elif node.op == "get_attr":
            t = _graph_tensor(gm, node.target)
            if t is None or id(t) not in uses:
                continue
            for user in node.users:
                site = by_node.get(user.name) or views.get(user.name)
                if site is None or site.call is None or site.call.weight is not node:
                    uses[id(t)].append(f"{user.name} ({_op_name(user)})")
    root = model if model is not None else gm
    for path, mod in root.named_modules(remove_duplicate=False):
        if id(mod) in called:
            continue  # a module call of the graph: judged above
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            key = id(p)
            if key not in uses:
                continue
            full = f"{path}.{pname}" if path else pname
            if (id(mod) in site_modules[key] and pname == "weight") or full in attr_targets[key]:
                continue
            if defer_layer_holders and pname == "weight" and stock_forward(mod):
                continue
            uses[key].append(f"{full} ({type(mod).__name__})")
    return {key: list(dict.fromkeys(found)) for key, found in uses.items()}


def parameter_holders(model: nn.Module) -> Dict[int, List[str]]:
    """``id(Parameter) -> every name it is held under`` (``named_parameters`` lists only the first).

    A parametrized weight is named after what it computes: ``fc.parametrizations.weight.original``
    is listed as ``fc.weight``.
    """
    holders: Dict[int, List[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{path}.{pname}" if path else pname
            if ".parametrizations." in full and full.endswith(".original"):
                full = full.replace(".parametrizations.", ".")[: -len(".original")]
            names = holders.setdefault(id(p), [])
            if full not in names:
                names.append(full)
    return holders


def _graph_tensor(gm: nn.Module, target: str) -> Optional[torch.Tensor]:
    try:
        value = gm.get_parameter(target)
    except AttributeError:
        try:
            value = gm.get_buffer(target)
        except AttributeError:
            return None
    return value


def _op_name(node: fx.Node) -> str:
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _resolve_shared_weights(sites: Dict[object, List[LayerPlan]], others: Dict[object, List[str]]) -> None:
    """Call sites sharing a weight convert together or not at all (one wide weight serves all).

    A group whose weight something else also reads (``others``) stays dense: a wide weight
    cannot serve an embedding or another module, and two weights would untie it.
    """
    for key, group in sites.items():
        other = others.get(key, [])
        if len(group) < 2 and not other:
            continue
        counts, seen = Counter(layer.name for layer in group), Counter()
        for layer in group:
            if counts[layer.name] > 1:  # one module called at several sites: number the sites
                seen[layer.name] += 1
                layer.name = f"{layer.name}#{seen[layer.name]}"
        names = [layer.name for layer in group]
        for i, layer in enumerate(group):
            layer.shared_with = tuple(n for j, n in enumerate(names) if j != i) + tuple(other)
        target = group[0].weight_target
        if group[0].weight_kind == "placeholder" and group[0].parameter_sources and group[0].parameter_sources[0]:
            target = group[0].parameter_sources[0]  # a dynamo graph's input: the user's name for it
        dense = [layer for layer in group if not layer.eligible]
        geometries = {(layer.op, layer.groups) for layer in group}
        if other:
            reason = (f"weight {target} is tied to {', '.join(other)}, which cannot read a wide weight: "
                      "kept dense so that the tie holds")
        elif len(geometries) > 1:
            reason = (f"weight {target} is shared by call sites of different ops or groups "
                      f"({', '.join(names)}): one wide weight cannot serve them")
        elif dense:
            reason = f"weight {target} is shared with {dense[0].name}, which stays dense ({dense[0].reason})"
        else:
            continue
        for layer in group:
            if layer.eligible:
                layer.eligible = False
                layer.reason = reason
