"""The per-node plan: what the analysis decided about every conv/linear layer of a graph.

Data flows one way: capture (FX graph) -> analysis (this plan) -> rewrite -> lowering.
``report`` and ``inspect`` read the plan; they never re-derive eligibility.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple


@dataclass
class LayerPlan:
    """One conv2d / linear call site of the captured graph.

    ``name`` is the user's module path (``layer1.0.conv1``) when the layer is a module, or
    the path of the weight's owner plus the call's node name for functional calls.
    ``in_channels`` is the narrow input width (``Cin`` of a conv, ``in_features`` of a
    linear); ``cbar`` is the per-output-position fan-in ``Cin/groups * kh * kw``.
    """

    name: str
    node: str
    op: str  # "linear" | "conv2d"
    eligible: bool
    reason: Optional[str]
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...] = ()
    stride: Tuple[int, ...] = ()
    padding: Any = ()
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    has_bias: bool = False
    weight_target: Optional[str] = None  # attribute path of the weight (get_attr / module)
    module_target: Optional[str] = None  # module path when the call is a module call
    shared_with: Tuple[str, ...] = ()  # other call sites using the same weight
    input_is_graph_input: bool = False
    fold_relu: bool = False  # the SAS layer reads the pre-ReLU tensor
    relu_node: Optional[str] = None
    input_shape: Optional[Tuple[int, ...]] = None
    output_shape: Optional[Tuple[int, ...]] = None
    symbolic_input_shape: Optional[Tuple[str, ...]] = None
    symbolic_output_shape: Optional[Tuple[str, ...]] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def cbar(self) -> int:
        fan_in = self.in_channels // max(self.groups, 1)
        for k in self.kernel_size:
            fan_in *= k
        return fan_in

    @property
    def weight_numel(self) -> int:
        return self.out_channels * self.cbar

    @property
    def output_positions(self) -> Optional[int]:
        """Number of output positions (all dims but the channel one), if shapes are known."""
        if self.output_shape is None:
            return None
        n = 1
        dims = list(self.output_shape)
        if self.op == "conv2d":
            del dims[1]
        else:
            dims = dims[:-1]
        for d in dims:
            n *= int(d)
        return n

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["cbar"] = self.cbar
        return d


@dataclass
class Plan:
    """All conv/linear layers of one captured graph, in graph order, with the M they use."""

    M: int
    layers: List[LayerPlan]
    capture: str  # "symbolic_trace" | "export" | "dynamo"
    graph_before: Optional[str] = None
    graph_after: Optional[str] = None
    gm: Any = None  # the captured GraphModule (before the rewrite)
    model: Any = None  # the analysed module (the export path swaps modules in a copy of it)

    def eligible(self) -> List[LayerPlan]:
        return [layer for layer in self.layers if layer.eligible]

    def by_node(self) -> Dict[str, LayerPlan]:
        return {layer.node: layer for layer in self.layers}

    # formatting lives with the rest of the inspection output
    def __str__(self) -> str:
        from .inspection import plan_to_text

        return plan_to_text(self)

    def to_dict(self) -> Dict[str, Any]:
        from .inspection import plan_to_dict

        return plan_to_dict(self)

    def to_dot(self) -> str:
        from .inspection import plan_to_dot

        return plan_to_dot(self)

