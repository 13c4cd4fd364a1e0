"""SWAT as a compiler mode: ``swatify(model)`` trains with sparse weights and activations.

Why: the SWAT reference code (github AamirRaihan/SWAT) swaps layers by hand, keeps per-layer
state in files read and written every batch and needs C++ extensions. Here one call on an
unmodified model swaps every conv/linear module for a SWAT module that runs the ``swat::``
ops (``sas_compile.runtime.swat``); its thresholds and step counter are module buffers, so
the model trains under ``torch.compile`` and DDP and saves with ``state_dict``.

Per-layer densities
-------------------
``distribution="uniform"``: every layer keeps ``1 - sparsity`` of its weights and activations,
except the first layer that reads the raw network input, which stays dense (as SAS and the
sparse-training literature do: it is tiny and its input has few channels); the overall
density is therefore slightly above ``1 - sparsity``.
``distribution="erk"``: Erdos-Renyi-Kernel (RigL, Evci et al. 2020, used by the SWAT paper):
the density of a layer with weight shape ``(Co, Ci, kh, kw)`` is proportional to
``(Co + Ci + kh + kw) / (Co * Ci * kh * kw)``, scaled so the network keeps exactly
``1 - sparsity`` of all its weights; layers that would exceed 1 are dense and the rest are
renormalised. A layer's activations use the layer's weight density (the same K rule).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .api import FilterFn, analyze, attach_result, check_filter_fn, register_handler, sparsify
from .passes import costs
from .passes.capture import copy_model
from .passes.find_sas_layers import TRANSPOSED_CONV_MODULES, layer_plan_from_module, parameter_holders, stores_weight
from .passes.plan import Plan
from .passes.rewrite_layers_to_sas import carry_hooks
from .runtime import swat as ops
from .runtime.sas_ops import composite_transform_active
from .sas import existing_sas_layers

__all__ = [
    "swatify",
    "SWATConfig",
    "discover_layers",
    "SWATLayer",
    "SWATLinear",
    "SWATConv1d",
    "SWATConv2d",
    "SWATConv3d",
    "SWATConvTranspose",
    "BitmaskReLU",
    "DISTRIBUTIONS",
    "erk_densities",
    "swat_layers",
    "swat_costs",
]

DISTRIBUTIONS = ("uniform", "erk")
_SOURCE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *TRANSPOSED_CONV_MODULES)


# ---------------------------------------------------------------- modules


class SWATLayer(nn.Module):
    """Shared state of a SWAT conv/linear: the original Parameters, thresholds and step buffers.

    ``weight_threshold`` and ``activation_threshold`` are recomputed from the current weight
    and batch on training steps ``0, period, 2*period, ...`` and reused in between; ``step``
    counts training forwards (with grad enabled). In eval mode the layer runs with the
    sparse weight of the last refresh (see :meth:`sparse_weight`).
    """

    channel_dim = 1

    def __init__(
        self,
        source: nn.Module,
        *,
        weight_density: float,
        activation_density: float,
        structure: str = "unstructured",
        period: int = 100,
        sync_thresholds: bool = True,
    ):
        super().__init__()
        self.weight = source.weight
        self.bias = source.bias
        self.weight_density = _check_density(weight_density, "weight_density")
        self.activation_density = _check_density(activation_density, "activation_density")
        self.structure = ops.check_structure(structure)
        self.period = _check_period(period)
        self.sync_thresholds = bool(sync_thresholds)
        with torch.no_grad():
            w_thr = ops.kth_largest(ops.weight_scores(self._scored_weight(), structure), self.weight_density)
        self.register_buffer("weight_threshold", w_thr.clone())
        self.register_buffer("activation_threshold", torch.zeros((), dtype=self.weight.dtype,
                                                                 device=self.weight.device))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=self.weight.device))

    def __prepare_scriptable__(self):
        """One error for ``torch.jit.script``: a SWAT layer's training step is its own op with state."""
        raise TypeError(_SWAT_SCRIPT_ERROR)

    @property
    def is_dense(self) -> bool:
        return self.weight_density >= 1.0 and self.activation_density >= 1.0

    def _scored_weight(self) -> Tensor:
        """The weight as the top-K ranks it: input channels on dim 1."""
        return self.weight

    def sparse_weight(self) -> Tensor:
        """``W_k``: the weight reduced to its top-K magnitudes with the current threshold."""
        if self.weight_density >= 1.0:
            return self.weight
        return ops.mask_weight(self.weight, self.weight_threshold, self.structure)

    def _sparse_step(self, x: Tensor) -> bool:
        """Whether this forward is a SWAT training step; counts it and refreshes thresholds."""
        if self.is_dense or not (self.training and torch.is_grad_enabled()):
            return False
        if composite_transform_active():
            ops.refuse_higher_order(f"{type(self).__name__} in a training step under a torch.func transform or "
                                    "forward-mode AD")
        torch.ops.swat.refresh_thresholds(
            x, self._scored_weight(), self.weight_threshold, self.activation_threshold, self.step,
            self.period, self.weight_density, self.activation_density, self.structure,
            self.channel_dim, self.sync_thresholds,
        )
        return True

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight.shape)}, weight_density={self.weight_density:.4g}, "
                f"activation_density={self.activation_density:.4g}, structure={self.structure}, "
                f"period={self.period}")


class SWATLinear(SWATLayer):
    """``nn.Linear`` trained with SWAT (``swat::linear``)."""

    channel_dim = -1

    def forward(self, x: Tensor) -> Tensor:
        if self._sparse_step(x):
            return ops.swat_linear(x, self.weight, self.bias, self.weight_threshold,
                                   self.activation_threshold, self.structure)
        return F.linear(x, self.sparse_weight(), self.bias)


class SWATConv2d(SWATLayer):
    """``nn.Conv2d`` trained with SWAT (``swat::conv2d``); any padding mode, any groups."""

    _dense_conv = staticmethod(F.conv2d)  # eval mode and dense steps

    def __init__(self, source: nn.Module, **kwargs):
        super().__init__(source, **kwargs)
        self.stride = tuple(source.stride)
        self.dilation = tuple(source.dilation)
        self.groups = source.groups
        # string or non-zero padding modes become an explicit F.pad, so the op sees ints
        if isinstance(source.padding, str) or source.padding_mode != "zeros":
            self.pre_pad = tuple(source._reversed_padding_repeated_twice)
            self.pad_mode = "constant" if source.padding_mode == "zeros" else source.padding_mode
            self.padding = (0,) * len(self.stride)
        else:
            self.pre_pad = None
            self.pad_mode = "constant"
            self.padding = tuple(source.padding)

    def _conv_args(self) -> Tuple[List[int], List[int], List[int]]:
        return list(self.stride), list(self.padding), list(self.dilation)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        stride, padding, dilation = self._conv_args()
        if self._sparse_step(x):
            return ops.swat_conv2d(x, self.weight, self.bias, self.weight_threshold,
                                   self.activation_threshold, stride, padding, dilation,
                                   self.groups, self.structure)
        return self._dense_conv(x, self.sparse_weight(), self.bias, stride, padding, dilation, self.groups)


class SWATConv3d(SWATConv2d):
    """``nn.Conv3d`` trained with SWAT: the same op on a 5-D weight (scores per weight, or per input
    channel over its three kernel dims; an activation channel is one sample's volume)."""

    _dense_conv = staticmethod(F.conv3d)


class SWATConv1d(SWATConv2d):
    """``nn.Conv1d`` trained with SWAT: runs as a conv2d of height 1 (same scores and masks)."""

    def _conv_args(self):
        return [1, *self.stride], [0, *self.padding], [1, *self.dilation]

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        stride, padding, dilation = self._conv_args()
        x2 = x.unsqueeze(2)
        if self._sparse_step(x2):
            y = ops.swat_conv2d(x2, self.weight.unsqueeze(2), self.bias, self.weight_threshold,
                                self.activation_threshold, stride, padding, dilation,
                                self.groups, self.structure)
            return y.squeeze(2)
        return F.conv1d(x, self.sparse_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class SWATConvTranspose(SWATLayer):
    """``nn.ConvTranspose1d/2d/3d`` trained with SWAT (``swat::conv_transpose``): any groups,
    dilation and output padding, and ``forward(x, output_size)`` as the source takes it.

    Its ``[in, out/groups, *kernel]`` weight is ranked on the view with input channels on dim 1
    (``runtime.swat.in_channel_view``), so ``structure="channel"`` removes input channels, as it
    does for a convolution; an activation channel is one sample's map of an input channel.
    """

    transposed = True

    def __init__(self, source: nn.Module, **kwargs):
        super().__init__(source, **kwargs)
        self.stride = tuple(source.stride)
        self.padding = tuple(source.padding)
        self.output_padding = tuple(source.output_padding)
        self.dilation = tuple(source.dilation)
        self.kernel_size = tuple(source.kernel_size)
        self.groups = source.groups

    def _scored_weight(self) -> Tensor:
        return ops.in_channel_view(self.weight)

    def sparse_weight(self) -> Tensor:
        if self.weight_density >= 1.0:
            return self.weight
        return ops.mask_transposed_weight(self.weight, self.weight_threshold, self.structure)

    def forward(self, x: Tensor, output_size: Optional[List[int]] = None) -> Tensor:
        n = len(self.kernel_size)
        # the output padding an output_size asks for, resolved as nn.ConvTranspose*d resolves it
        output_padding = nn.modules.conv._ConvTransposeNd._output_padding(
            self, x, output_size, list(self.stride), list(self.padding), list(self.kernel_size), n,
            list(self.dilation))
        if self._sparse_step(x):
            return ops.swat_conv_transpose(x, self.weight, self.bias, self.weight_threshold,
                                           self.activation_threshold, self.stride, self.padding, output_padding,
                                           self.dilation, self.groups, self.structure)
        conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
        return conv(x, self.sparse_weight(), self.bias, self.stride, self.padding, output_padding, self.groups,
                    self.dilation)


_SWAT_SCRIPT_ERROR = (
    "torch.jit.script cannot compile a SWAT model: its training step updates thresholds and saves compressed "
    "activations in Python. For inference, torch.jit.trace it in eval mode under torch.no_grad() (which records "
    "the top-K weights it computes with) or torch.export it; train it as the eager module")


class BitmaskReLU(nn.Module):
    """``nn.ReLU`` (exact, out of place) whose backward keeps a 1-bit mask, not the output.

    Why: ``torch.relu`` saves its dense output, which is the next layer's input, so without
    this swap the dense activation stays alive beside SWAT's compressed copy.
    """

    def __prepare_scriptable__(self):
        raise TypeError(_SWAT_SCRIPT_ERROR)

    def forward(self, x: Tensor) -> Tensor:
        # torch.jit.trace gets the plain relu: its sanity check reruns without gradients
        if torch.is_grad_enabled() and x.requires_grad and not composite_transform_active() \
                and not torch.jit.is_tracing():
            return ops.swat_relu(x)
        return torch.relu(x)


_SWAT_CLASS = {nn.Linear: SWATLinear, nn.Conv1d: SWATConv1d, nn.Conv2d: SWATConv2d, nn.Conv3d: SWATConv3d,
               **{cls: SWATConvTranspose for cls in TRANSPOSED_CONV_MODULES}}


# ---------------------------------------------------------------- argument checks


def _check_density(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{what}={value!r}: expected a number in (0, 1] (the kept fraction)")
    return float(value)


def _check_period(period) -> int:
    if isinstance(period, bool) or not isinstance(period, int) or period < 1:
        raise ValueError(f"period={period!r}: expected an int >= 1 (training steps between "
                         "top-K threshold refreshes)")
    return period


def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r}: expected a number in [0, 1) (the removed "
                         "fraction of weights and activations, e.g. 0.8 or 0.9)")
    return float(sparsity)


# ---------------------------------------------------------------- densities


def erk_densities(shapes: Dict[str, Sequence[int]], density: float) -> Dict[str, float]:
    """Per-layer densities by the Erdos-Renyi-Kernel rule with overall ``density`` of weights.

    ``shapes`` maps a layer name to its weight shape. Layers whose density would exceed 1
    are made dense and the others renormalised until the total nonzeros are
    ``density * sum(numel)``.
    """
    _check_density(density, "density")
    numel = {name: math.prod(shape) for name, shape in shapes.items()}
    raw = {name: sum(shape) / numel[name] for name, shape in shapes.items()}
    dense: set = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        if divisor == 0:
            return {n: 1.0 for n in shapes}
        eps = budget / divisor
        over = {n for n in shapes if n not in dense and eps * raw[n] >= 1.0}
        if not over:
            return {n: (1.0 if n in dense else eps * raw[n]) for n in shapes}
        dense |= over


# ---------------------------------------------------------------- layer discovery


def _swat_reason(module: nn.Module) -> Optional[str]:
    """Why a Linear/Conv module cannot become a SWAT layer, or None."""
    if not stores_weight(module):
        # old-style weight_norm recomputes it before each call: no stored values to sparsify
        return "its weight is computed before each call (weight_norm): no stored values to sparsify"
    if "forward" in vars(module):
        return "its forward is replaced on the instance (as accelerate's hooks do): a SWAT layer would drop it"
    return None


def discover_layers(
    model: nn.Module, example_inputs, filter_fn, plan: Optional[Plan] = None
) -> Tuple[List[str], Optional[str]]:
    """Names of the conv/linear modules to convert, and the one reading the raw input (if known).

    The analysis plan of the model (``plan``, or one captured from ``example_inputs``) says
    which layer reads the raw input; without either it is the first conv/linear module in
    registration order.
    """
    names = [n for n, m in model.named_modules() if type(m) in _SWAT_CLASS and _swat_reason(m) is None]
    first: Optional[str] = names[0] if names else None
    if plan is None and example_inputs is not None:
        plan = analyze(model, example_inputs, fold_relu=False, dynamo_fallback=True)
    if plan is not None and plan.capture != "modules":
        inputs = [layer.module_path for layer in plan.layers
                  if layer.input_is_graph_input and layer.module_path in names]
        first = inputs[0] if inputs else None
    if filter_fn is not None:
        modules = dict(model.named_modules())
        names = [n for n in names if filter_fn(modules[n], n)]
    return names, first


@dataclass(frozen=True)
class SWATConfig:
    """Options of SWAT training (``swatify``); see :func:`swatify` for each field."""

    sparsity: float = 0.9
    distribution: str = "uniform"
    structure: str = "unstructured"
    period: int = 100
    relu_bitmask: bool = True
    filter_fn: Optional[FilterFn] = None

    def __post_init__(self):
        _check_sparsity(self.sparsity)
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution={self.distribution!r} is not supported: use one of {DISTRIBUTIONS}")
        ops.check_structure(self.structure)
        _check_period(self.period)
        check_filter_fn(self.filter_fn)


@register_handler(SWATConfig)
def _convert(model: nn.Module, config: SWATConfig, example_inputs) -> nn.Module:
    sas_layers = existing_sas_layers(model)
    if sas_layers:
        raise ValueError(
            f"swatify: {type(model).__name__} already has SAS layers: {', '.join(sas_layers)}. SWAT trains the "
            "nn.Linear / nn.Conv1d/2d/3d / nn.ConvTranspose1d/2d/3d layers of a dense model and has no SAS-layer "
            "version: call swatify on the dense model instead."
        )
    model = copy_model(model)
    names, first = discover_layers(model, example_inputs, config.filter_fn)
    modules = dict(model.named_modules())
    paths = _paths_by_module(model)
    density = 1.0 - config.sparsity
    if config.distribution == "erk":
        densities = _erk_by_weight(names, modules, density)
    else:
        densities = {n: (1.0 if n == first else density) for n in names}
    for name in names:
        source = modules[name]
        # the SWAT layer holds the source's own Parameters: frozen stays frozen, tied stays tied
        layer = _SWAT_CLASS[type(source)](
            source, weight_density=densities[name], activation_density=densities[name],
            structure=config.structure, period=config.period,
        )
        layer.train(source.training)
        carry_hooks(source, layer)
        for path in paths[id(source)]:  # a module registered under several names is swapped under all
            _set_submodule(model, path, layer)
    if config.relu_bitmask:
        relus = {id(m): m for m in model.modules() if type(m) is nn.ReLU}
        for relu in relus.values():
            bitmask = BitmaskReLU()
            bitmask.train(relu.training)
            for path in paths[id(relu)]:
                _set_submodule(model, path, bitmask)
    holders = parameter_holders(model)
    layers = []
    for fqn, mod in modules.items():
        if type(mod) in _SWAT_CLASS:
            converted = fqn in densities
            reason = None if converted else (_swat_reason(mod) or "excluded by filter_fn")
            layer = layer_plan_from_module(fqn, fqn, mod, converted, reason)
            tied = holders.get(id(mod.weight), [layer.weight_target])
            layer.weight_group = tied[0]
            layer.shared_with = tuple(name for name in tied if name != layer.weight_target)
            layers.append(layer)
    return attach_result(model, config, Plan(layers=layers, capture="modules", technique="SWAT"))


def _paths_by_module(model: nn.Module) -> Dict[int, List[str]]:
    """Every name each module object is registered under (``named_modules`` lists only the first)."""
    paths: Dict[int, List[str]] = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(mod), []).append(path)
    return paths


def _erk_by_weight(names: List[str], modules: Dict[str, nn.Module], density: float) -> Dict[str, float]:
    """ERK densities with each weight tensor counted once: tied layers share one weight and its density."""
    first_of: Dict[int, str] = {}
    for n in names:
        first_of.setdefault(id(modules[n].weight), n)
    erk = erk_densities({n: tuple(modules[n].weight.shape) for n in first_of.values()}, density)
    return {n: erk[first_of[id(modules[n].weight)]] for n in names}


def swatify(
    model: nn.Module,
    *,
    sparsity: float = 0.9,
    distribution: str = "uniform",
    structure: str = "unstructured",
    period: int = 100,
    example_inputs=None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    relu_bitmask: bool = True,
) -> nn.Module:
    """A copy of ``model`` whose nn.Linear, nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d layers train with SWAT.

    ``sparsify(model, SWATConfig(sparsity=..., ...), filter_fn=..., example_inputs=...)``.
    Forward: weights reduced to their top-K magnitudes per layer, activations dense.
    Backward: input gradient from the sparse weights, weight gradient from the top-K
    activations (saved compressed) and the dense output gradient. The thresholds are
    recomputed every ``period`` training steps and reused in between.

    ``sparsity`` is the removed fraction; ``distribution`` ``"uniform"`` (first layer on the
    raw input dense) or ``"erk"`` sets the per-layer densities (module docstring);
    ``structure`` ``"unstructured"`` or ``"channel"`` (the same input channels removed for
    every filter). ``filter_fn(module, fqn) -> bool`` picks the layers. With
    ``relu_bitmask`` every ``nn.ReLU`` module becomes a :class:`BitmaskReLU` (same values and
    gradients), so the dense layer inputs are not kept alive by the ReLUs' backward. The
    original model is untouched; the result's ``sparsify_plan`` lists the converted layers.

    ``torch.compile``: the number of kept activations is only known at run time, so compile
    with ``fullgraph=True`` (or set ``torch._dynamo.config.capture_dynamic_output_shape_ops``);
    otherwise dynamo breaks the graph at every SWAT layer (still correct).

    A SWAT layer holds its source's own Parameters, so ``requires_grad``, names, dtypes and
    ties (two layers sharing one weight) stay as they were; a module registered under several
    names is swapped under all of them. A model that already has SAS layers is refused.
    """
    check_filter_fn(filter_fn)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    config = SWATConfig(sparsity=sparsity, distribution=distribution, structure=structure, period=period,
                        relu_bitmask=relu_bitmask)
    return sparsify(model, config, filter_fn=filter_fn, example_inputs=example_inputs)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    if name == "":
        raise ValueError("model: swatify converts the layers inside a model; wrap a bare "
                         "nn.Linear / nn.Conv2d in nn.Sequential")
    model.set_submodule(name, module)


def swat_layers(model: nn.Module) -> Dict[str, SWATLayer]:
    """The SWAT layers of a swatified model by module path."""
    return {n: m for n, m in model.named_modules() if isinstance(m, SWATLayer)}


# ---------------------------------------------------------------- mult accounting


def swat_costs(
    layer,
    weight_density: Optional[float] = None,
    activation_density: Optional[float] = None,
    *,
    structure: Optional[str] = None,
    output_positions: Optional[int] = None,
) -> Dict[str, int]:
    """Training mults of one layer with SWAT, the accounting the SWAT paper reports.

    ``layer`` is a :class:`~sas_compile.plan.LayerPlan`, an nn.Linear/Conv1d/2d/3d/ConvTranspose1d/2d/3d
    or a SWAT layer (whose densities and structure are the defaults). ``output_positions`` (batch
    times spatial output size; a transposed convolution's input size, which it multiplies per)
    defaults to the plan's, else 1 (mults per position).
    Returns ``forward_mults`` (nonzero weights x positions), ``backward_input_mults`` (the
    same sparse weights against the dense output gradient) and ``backward_weight_mults``
    (the kept activation fraction of the dense ``Co * Cbar`` per position). Densities of 1
    give the dense counts.
    """
    if hasattr(layer, "cbar") and hasattr(layer, "out_channels") and hasattr(layer, "op"):
        geometry = layer
        if output_positions is None and layer.output_positions is not None:
            output_positions = int(layer.output_positions)
    elif isinstance(layer, (*_SOURCE_TYPES, SWATLayer)):
        w = layer.weight
        groups = int(getattr(layer, "groups", 1))
        if getattr(layer, "transposed", False) is True:  # stored [in, out/groups, *kernel]
            geometry = costs.Geometry(f"conv_transpose{w.dim() - 2}d", w.shape[0], w.shape[1] * groups,
                                      tuple(w.shape[2:]), groups, layer.bias is not None)
        else:
            geometry = costs.Geometry("linear" if w.dim() == 2 else f"conv{w.dim() - 2}d", w.shape[1] * groups,
                                      w.shape[0], tuple(w.shape[2:]), groups, layer.bias is not None)
    else:
        raise TypeError(f"layer: expected a LayerPlan, a conv/linear module or a SWAT layer, "
                        f"got {type(layer).__name__}")
    if isinstance(layer, SWATLayer):
        weight_density = layer.weight_density if weight_density is None else weight_density
        activation_density = layer.activation_density if activation_density is None else activation_density
        structure = layer.structure if structure is None else structure
    if weight_density is None or activation_density is None:
        raise ValueError("weight_density / activation_density: give both for a layer that is "
                         "not a SWAT layer (e.g. 0.1 for 90% sparsity)")
    counts = costs.layer_cost(geometry, "swat", positions=1 if output_positions is None else int(output_positions),
                              weight_density=_check_density(weight_density, "weight_density"),
                              activation_density=_check_density(activation_density, "activation_density"),
                              structure=ops.check_structure(structure or "unstructured"))
    return {k: int(v) for k, v in counts.items()}
