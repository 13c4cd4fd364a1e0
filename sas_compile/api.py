"""``sasify`` and the analysis entry points: capture -> plan -> rewrite.

The order of passes lives here and nowhere else:
``capture`` -> ``find_sas_layers`` -> ``fold_relu_into_projection`` -> ``rewrite_layers_to_sas``.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from .passes.capture import CaptureError, capture
from .passes.find_sas_layers import find_sas_layers, layer_plan_from_module
from .passes.fold_relu_into_projection import fold_relu_into_projection
from .passes.rewrite_layers_to_sas import _sas_module, _set_submodule, rewrite_layers_to_sas
from .plan import Plan
from .runtime.projection import check_M

log = logging.getLogger("sas_compile")

__all__ = ["SASConfig", "analyze", "rewrite_plan", "sasify", "CaptureError"]

FilterFn = Callable[[Optional[nn.Module], str], bool]


@dataclass(frozen=True)
class SASConfig:
    """Options of the SAS conversion (also accepted as ``torch.compile`` backend options).

    M: slots per value, a power of two >= 2.
    filter_fn: ``filter_fn(module, fqn) -> bool``; False keeps that layer dense.
    dense_input_layers: keep layers that read the raw network input dense (the reference
        code's policy for the first convolution).
    fold_relu: let a SAS layer read the pre-ReLU tensor when its input is a ReLU.
    """

    M: int = 2
    filter_fn: Optional[FilterFn] = None
    dense_input_layers: bool = True
    fold_relu: bool = True

    def __post_init__(self):
        check_M(self.M)


def _module_walk_plan(model: nn.Module, M: int, filter_fn, dense_input_layers: bool, why: str) -> Plan:
    """Without a graph (no example inputs, untraceable model): the layer modules, in order."""
    from .layers import SAS_LAYERS

    layers = []
    first = True
    for fqn, mod in model.named_modules():
        if isinstance(mod, SAS_LAYERS):
            layer = layer_plan_from_module(fqn, fqn, mod, False, f"already a SAS layer (M={mod.M})")
            layer.extra["sas_M"] = mod.M
        elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            eligible, reason = True, None
            if getattr(mod, "padding_mode", "zeros") != "zeros":
                eligible, reason = False, f"padding_mode={mod.padding_mode!r}: SAS convolutions support only zero padding"
            elif first and dense_input_layers:
                eligible, reason = False, ("input layer (assumed: the first layer module; pass example_inputs for an "
                                           "exact analysis), kept dense as in the reference code")
            elif filter_fn is not None and not filter_fn(mod, fqn):
                eligible, reason = False, "excluded by filter_fn"
            layer = layer_plan_from_module(fqn, fqn, mod, eligible, reason)
            layer.extra["weight_kind"] = "module"
        else:
            continue
        first = False
        layers.append(layer)
    plan = Plan(M=M, layers=layers, capture="modules", model=model)
    plan.graph_before = f"# no graph: {why}"
    return plan


def analyze(model: nn.Module, example_inputs=None, *, M: int = 2, filter_fn: Optional[FilterFn] = None,
            dense_input_layers: bool = True, fold_relu: bool = True) -> Plan:
    """Capture ``model`` and decide, per conv/linear call, whether it becomes SAS and why.

    Without ``example_inputs`` the plan has no shapes (costs per output position); a model
    that symbolic tracing cannot capture is then analysed from its layer modules alone.
    """
    check_M(M)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        captured = capture(model, example_inputs)
    except CaptureError as err:
        if example_inputs is not None:
            raise
        return _module_walk_plan(model, M, filter_fn, dense_input_layers, str(err))
    plan = find_sas_layers(captured.gm, M=M, capture=captured.method, filter_fn=filter_fn,
                           dense_input_layers=dense_input_layers, model=model)
    plan.model = model
    if fold_relu and captured.method == "symbolic_trace":
        fold_relu_into_projection(plan, captured.gm)
    elif captured.method != "symbolic_trace":
        for layer in plan.eligible():
            layer.extra["fold_relu_reason"] = "module swap (torch.export capture) keeps the model's ReLUs"
    return plan


def rewrite_plan(plan: Plan) -> nn.Module:
    """Build the SAS model the plan describes (the analysed model is left untouched)."""
    if plan.capture == "symbolic_trace":
        gm = copy.deepcopy(plan.gm)
        rewrite_layers_to_sas(gm, plan)
        plan.graph_after = gm.code
        if plan.model is not None:
            gm.train(plan.model.training)
        return gm
    model = copy.deepcopy(plan.model)
    swapped = set()
    for layer in plan.eligible():
        path = layer.module_target
        if path is None or path in swapped:
            continue
        _set_submodule(model, path, _sas_module(model.get_submodule(path), plan.M, False))
        swapped.add(path)
    plan.graph_after = f"# {plan.capture} capture: modules swapped in place, no graph rewrite\n" + "\n".join(
        f"# {p} -> {type(model.get_submodule(p)).__name__}" for p in sorted(swapped))
    return model


def sasify(model: nn.Module, *, M: int = 2, example_inputs=None, filter_fn: Optional[FilterFn] = None,
           dense_input_layers: bool = True, fold_relu: bool = True) -> nn.Module:
    """Return a new model whose eligible conv/linear layers are SAS layers computing the same function.

    The wide weights are ordinary trainable parameters initialised from the trained dense
    ones (``Wt[:, c*M+m] = s_c(m) W[:, c]``), so the result equals the original model on any
    input until it is trained. ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``.
        M: slots per value; a power of two >= 2 (2, 4, 8, ...).
        example_inputs: a tensor or tuple; needed only for models that ``torch.fx.symbolic_trace``
            cannot trace (they are then captured with ``torch.export``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; False keeps that layer dense.
        dense_input_layers: keep layers reading the raw network input dense (default, as the
            reference code keeps the first convolution dense).
        fold_relu: a SAS layer whose input is a ReLU reads the pre-ReLU tensor instead.

    Returns:
        the SAS model; its ``sas_plan`` attribute is the :class:`~sas_compile.plan.Plan` that
        was applied (which layers converted, which stayed dense and why).
    """
    config = SASConfig(M=M, filter_fn=filter_fn, dense_input_layers=dense_input_layers, fold_relu=fold_relu)
    plan = analyze(model, example_inputs, M=config.M, filter_fn=config.filter_fn,
                   dense_input_layers=config.dense_input_layers, fold_relu=config.fold_relu)
    if plan.capture == "modules":
        raise CaptureError(plan.graph_before.removeprefix("# no graph: "))
    new = rewrite_plan(plan)
    for layer in plan.layers:
        if not layer.eligible:
            log.info("sasify: %s stays dense: %s", layer.name, layer.reason)
    # the plan without its references to the original model (it would ride along in pickles)
    new.sas_plan = dataclasses.replace(plan, gm=None, model=None)
    return new
