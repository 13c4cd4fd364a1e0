"""SAS as a ``sparsify`` technique: ``SASConfig`` and ``sasify``.

``sasify`` captures the model, runs the analysis passes and the SAS rewrite of
``passes/pipeline.py``, and returns a model computing the same function with M-times wider,
trainable weights. The ``sas`` dynamo backend reads the same ``SASConfig``.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import List, Optional

from torch import fx, nn

from .api import FilterFn, attach_result, check_filter_fn, register_handler, sparsify
from .passes.capture import CaptureError, capture, copy_model
from .passes.find_sas_layers import sas_op
from .passes.mode_flags import bind_mode_values
from .passes.pipeline import SAS_REWRITE, analyze_model, run_passes
from .passes.plan import Plan
from .passes.rewrite_layers_to_sas import (carry_model_state, copy_for_rewrite, holds_stand_ins, is_module_swap,
                                           meta_stand_in, swap_sas_modules)
from .runtime.layers import SAS_LAYERS
from .runtime.projection import check_M, get_rule

log = logging.getLogger("sas_compile")

__all__ = ["SASConfig", "sasify", "apply_sas_plan", "existing_sas_layers", "INNER_COMPILERS"]

INNER_COMPILERS = ("inductor", "eager", "aot_eager")


@dataclass(frozen=True)
class SASConfig:
    """Options of the SAS conversion; also the options of ``torch.compile(backend="sas")``.

    M: slots per value, a power of two >= 2.
    rule: the index rule of the projection (``runtime.projection.register_rule`` adds one).
    dense_input_layers: keep layers that read the raw network input dense (the reference
        code's policy for the first convolution).
    fold_relu: let a SAS layer read the pre-ReLU tensor when its input is a ReLU.
    filter_fn: ``filter_fn(module, fqn) -> bool``; False keeps that layer dense.
    inner: the backend's compiler for the rewritten graph ("inductor", "eager", "aot_eager").
    mode: torch.compile's ``mode`` passed to inductor ("default", "reduce-overhead", "max-autotune", ...).
    explain: the backend prints, per captured graph, which layers converted and why the rest did not.
    train_dense: under the backend, let a backward train a dense model's weights through their
        SAS expansion (off: such a backward raises, saying to call ``sasify`` first).
    """

    M: int = 2
    rule: str = "sign_pattern"
    dense_input_layers: bool = True
    fold_relu: bool = True
    filter_fn: Optional[FilterFn] = None
    inner: str = "inductor"
    mode: Optional[str] = None
    explain: bool = False
    train_dense: bool = False

    def __post_init__(self):
        check_M(self.M)
        get_rule(self.rule, self.M)  # unknown rule -> ValueError listing the registered ones
        check_filter_fn(self.filter_fn)
        if self.inner not in INNER_COMPILERS:
            raise ValueError(f"inner={self.inner!r}: expected one of {INNER_COMPILERS}")


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are meta tensors (no data copied)."""
    memo = {id(t): meta_stand_in(t) for t in [*module.parameters(), *module.buffers()]}
    return copy_model(module, memo)


def apply_sas_plan(plan: Plan, config: SASConfig, *, weights_on_meta: bool = False,
                   copy_dense_weights: bool = False) -> nn.Module:
    """Build the SAS model ``plan`` describes at ``config.M`` (the analysed model is untouched).

    A copy of the user's model with its layer modules swapped whenever that expresses the
    whole rewrite (``is_module_swap``: always for a torch.export capture); otherwise the
    rewritten GraphModule of a symbolic-trace capture. ``weights_on_meta`` builds it on meta
    stand-ins of every parameter and buffer: the same graph and modules without the M-times
    wider weights in memory (what inspection needs: 0.8 GB for ResNet-50 at M = 8 otherwise).
    Otherwise the copy leaves out the dense weights that the rewrite replaces
    (``copy_for_rewrite``: a full copy held a second copy of them at the peak), unless
    ``copy_dense_weights``, or one of them is still held after the rewrite (then the
    conversion is redone on a full copy).
    """
    if weights_on_meta:
        clone = _meta_copy
    elif copy_dense_weights:
        clone = copy_model
    else:  # the converted layers' dense weights are not copied: they are replaced
        def clone(module):
            return copy_for_rewrite(module, plan)
    built = _apply_sas_plan(plan, config, clone)
    if not weights_on_meta and not copy_dense_weights and holds_stand_ins(built):
        # a replaced weight is still held where the plan does not rewrite (an attribute no call
        # reads): that holder gets a copy, as a plain deepcopy gives it
        log.debug("apply_sas_plan: a converted weight is also held elsewhere; copying every weight")
        return apply_sas_plan(plan, config, copy_dense_weights=True)
    return built


def _apply_sas_plan(plan: Plan, config: SASConfig, clone) -> nn.Module:
    if plan.capture == "symbolic_trace" and not is_module_swap(plan):
        gm = clone(plan.gm)
        run_passes(SAS_REWRITE, gm, plan, config)
        bind_mode_values(gm, plan.mode_bindings)  # the mode-dependent constants the trace took
        if plan.model is not None:
            gm.training = plan.model.training  # the root only: submodules keep their own flags
            carry_model_state(plan.model, gm)
        return gm
    model = clone(plan.model)
    swapped = swap_sas_modules(model, plan, config)
    lines = "\n".join(f"# {p} -> {type(model.get_submodule(p)).__name__}" for p in sorted(swapped))
    plan.graph_after = f"# {plan.capture} capture: modules swapped in a copy of the model, no graph rewrite\n" + lines
    if plan.capture == "symbolic_trace":
        try:
            plan.graph_after += "\n" + capture(model, allow_export=False).gm.code
        except CaptureError:  # the list of swaps above is then the record
            pass
    return model


def existing_sas_layers(model: nn.Module) -> List[str]:
    """The SAS layers already in ``model``: ``path (M=..)`` of each SAS module and ``sas::`` call.

    What another conversion must not pass over silently: SWS and SWAT start from a dense model.
    """
    found = [f"{path} (M={mod.M})" for path, mod in model.named_modules() if isinstance(mod, SAS_LAYERS)]
    for path, mod in model.named_modules():
        if isinstance(mod, fx.GraphModule):
            prefix = f"{path}." if path else ""
            found += [f"{prefix}{node.name} (sas::{sas_op(node.target).kind})" for node in mod.graph.nodes
                      if node.op == "call_function" and sas_op(node.target) is not None]
    return found


def _warn_existing_sas_layers(plan: Plan, M: int) -> None:
    existing = [layer for layer in plan.layers if layer.sas_M]
    if not existing:
        return
    listed = ", ".join(f"{layer.name} (M={layer.sas_M})" for layer in existing)
    log.warning("sasify(M=%d): %d layer(s) are already SAS layers and stay at their own M: %s",
                M, len(existing), listed)


def _graph_rewrite_causes(plan: Plan) -> List[str]:
    """The converted layers a module swap cannot express (:func:`is_module_swap`), and why."""
    causes = []
    for layer in plan.eligible():
        if layer.module_target is None:
            causes.append(f"{layer.name} (a functional {layer.op} on a parameter)")
        elif layer.fold_relu and layer.relu_module is None:
            causes.append(f"{layer.name} (its ReLU, folded into it, is a function call or read elsewhere)")
    return causes


def _warn_graph_rewrite(model: nn.Module, new: nn.Module, plan: Plan) -> None:
    """Say so when the result is a GraphModule, not the user's class: their methods are not on it."""
    if not isinstance(new, fx.GraphModule) or isinstance(model, fx.GraphModule):
        return
    causes = _graph_rewrite_causes(plan)
    own = sorted(name for name, value in vars(type(model)).items()
                 if callable(value) and not name.startswith("_") and name != "forward")
    folds_only = bool(causes) and all(layer.module_target is not None for layer in plan.eligible())
    log.warning(
        "sasify: the result is a torch.fx.GraphModule, not %s: %s %s the graph itself, which swapping "
        "modules in a copy of %s cannot express%s. Layer modules (nn.Linear, nn.Conv1d/2d/3d) and ReLUs as "
        "nn.ReLU modules read by one layer keep your class%s", type(model).__name__,
        ", ".join(causes[:4]) + (", ..." if len(causes) > 4 else "") or "its layers",
        "changes" if len(causes) == 1 else "change", type(model).__name__,
        f" (its own methods, {', '.join(own[:4])}, are not on the result)" if own else "",
        "; so does sasify(..., fold_relu=False), which leaves every ReLU where it is (the same function, "
        "each SAS layer then projecting the ReLU's output)" if folds_only else "")


@register_handler(SASConfig)
def _convert(model: nn.Module, config: SASConfig, example_inputs) -> nn.Module:
    # a model neither symbolic tracing nor torch.export captures whole (data-dependent code, a
    # cache object in its output) is captured by dynamo, graph by graph, and converted by module swaps
    plan = analyze_model(model, example_inputs, config, dynamo_fallback=True)
    if plan.capture == "dynamo":
        log.info("sasify: %s was captured by dynamo (%s); its layer modules are swapped in a copy",
                 type(model).__name__, "; ".join(plan.graph_breaks))
    if plan.not_one_graph:
        log.warning("sasify: %s: %s", type(model).__name__, plan.not_one_graph)
    new = apply_sas_plan(plan, config)
    _warn_graph_rewrite(model, new, plan)
    for layer in plan.layers:
        if not layer.eligible and not layer.sas_M:
            log.info("sasify: %s stays dense: %s", layer.name, layer.reason)
    for line in plan.not_in_graphs:
        log.info("sasify: %s (stays dense)", line)
    _warn_existing_sas_layers(plan, config.M)
    # the plan without its references to the original model (it would ride along in pickles)
    applied = dataclasses.replace(plan, M=config.M, gm=None, model=None, example_inputs=None, parameters={})
    for layer in applied.layers:
        layer.call = None
    new.sas_plan = applied
    return attach_result(new, config, applied)


def sasify(model: nn.Module, *, M: int = 2, example_inputs=None, filter_fn: Optional[FilterFn] = None,
           dense_input_layers: bool = True, fold_relu: bool = True, rule: str = "sign_pattern") -> nn.Module:
    """Return a new model whose eligible conv/linear layers are SAS layers computing the same function.

    ``sparsify(model, SASConfig(M=M, ...), filter_fn=..., example_inputs=...)``. The wide
    weights are ordinary trainable parameters initialised from the trained dense ones
    (``Wt[:, c*M+m] = s_c(m) W[:, c]``), so the result equals the original model on any
    input until it is trained. ``model`` itself is not modified.

    Args:
        model: any ``nn.Module``.
        M: slots per value; a power of two >= 2 (2, 4, 8, ...).
        example_inputs: a tensor, tuple or dict of keyword inputs; needed only for models that
            ``torch.fx.symbolic_trace`` cannot trace (they are then captured with ``torch.export``).
        filter_fn: ``filter_fn(module, fqn) -> bool``; False keeps that layer dense. ``module`` is
            the layer's module in ``model`` itself (for a functional call, the module holding the
            weight; the root for a root parameter), ``fqn`` its path.
        dense_input_layers: keep layers reading the raw network input dense (default, as the
            reference code keeps the first convolution dense).
        fold_relu: a SAS layer whose input is a ReLU reads the pre-ReLU tensor instead.
        rule: the projection's index rule (``sign_pattern``, or one added with ``register_rule``).

    Returns:
        the SAS model. The user's own class (a deep copy with modules swapped: ``len()``,
        indexing, custom methods and ``isinstance`` keep working) whenever the rewrite is a
        pure module swap: every converted layer is an ``nn.Linear`` or ``nn.Conv1d/2d/3d``
        module, and every folded ReLU an ``nn.ReLU`` module called once and read only by the
        SAS layer (it becomes ``nn.Identity``, and the SAS layer computes ``layer(relu(x))``,
        also when called on its own; ``fold_relu=False`` keeps every ReLU module as it is);
        always for a ``torch.export`` capture. A ``torch.fx.GraphModule`` only where the
        graph itself changes: a ReLU folded that a module swap cannot express (``F.relu``, a
        ReLU module called twice or read elsewhere) or a functional ``F.linear``/``F.conv2d``
        call rewritten. Either way every converted
        parameter keeps its name, ``requires_grad``, dtype and device, and a weight shared by
        several layers stays one shared (wide) Parameter, or the group stays dense when
        something else also reads it (a tied embedding). Layers that already are SAS layers
        stay at their own M (a warning lists them). Its ``sas_plan`` (also ``sparsify_plan``)
        is the :class:`~sas_compile.plan.Plan` that was applied: which layers converted,
        which stayed dense and why, and which share a weight (``shared_with``).
    """
    config = SASConfig(M=M, rule=rule, dense_input_layers=dense_input_layers, fold_relu=fold_relu)
    return sparsify(model, config, filter_fn=filter_fn, example_inputs=example_inputs)
