"""Capture a model as an FX graph: ``symbolic_trace`` first, ``torch.export`` when it fails.

Why two ways: symbolic tracing keeps the user's module structure (the rewrite can swap
modules and re-wire a ReLU's consumers) but stops at data-dependent Python; ``torch.export``
(non-strict, fake tensors) captures most real architectures (``transformers`` models) given
example inputs. A model neither can capture gets an error naming the code that broke
tracing and pointing to ``torch.compile(model, backend="sas")``, which handles graph breaks.

A rewrite that must see inside every layer (SWS widens the linears inside
``nn.MultiheadAttention``) asks for export also when tracing leaves opaque leaf modules
(:func:`capture_seeing_into_leaves`); an exported graph that must train and evaluate is
made a plain GraphModule by :func:`trainable_export_graph` (``mode_flags`` makes it follow
``.train()`` / ``.eval()`` again). Shapes on
every node come from one place, :func:`propagate_shapes`, read back by :func:`shape_tree`.
"""
from __future__ import annotations

import contextlib
import copy
import contextvars
import io
import inspect

import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

log = logging.getLogger("sas_compile.passes")

__all__ = ["Captured", "CaptureError", "ExampleInputsError", "quiet_torch_logs", "capture_with_dynamo", "copy_model",
           "DynamoGraph", "dynamo_placeholder_sources", "layer_owner", "in_resume_frame", "capture",
           "capture_seeing_into_leaves", "trainable_export_graph", "normalize_example_inputs", "bind_example_inputs",
           "propagate_shapes", "shapes_from_real_runs", "shape_tree", "SASTracer", "first_line"]


class ExampleInputsError(ValueError):
    """The example inputs do not fit the model (a shape or dtype a layer cannot take)."""


@contextlib.contextmanager
def quiet_torch_logs():
    """Keep torch's own error logs (fake-tensor tracebacks, export diagnostics) off stderr while
    a capture is attempted: sas-compile reports the failure itself, in one line."""
    names = ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes", "torch._dynamo",
             "torch.export", "torch._export", "torch.fx.passes.shape_prop")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        # ShapeProp prints the traceback of a failing node itself
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _shape_error(model: nn.Module, err: BaseException) -> ExampleInputsError:
    """One line: which layer the example inputs did not fit, and torch's own reason."""
    cause = err.__cause__ or err
    where = ""
    match = re.search(r"node=%\w+ : \[[^\]]*\] = call_(?:module|function|method)\[target=([^\]]+)\]", str(err))
    if match:
        where = f" at {match.group(1)}"
    return ExampleInputsError(f"example_inputs do not fit {type(model).__name__}{where}: {first_line(cause)}")


class CaptureError(RuntimeError):
    """Neither symbolic tracing nor torch.export could capture the model."""


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str  # "symbolic_trace" | "export"
    example_inputs: Optional[Tuple[Any, ...]]
    trace_error: Optional[str] = None


CONCRETE_ARGS_META = "sas_concrete_args"  # gm.meta key: the concrete args a symbolic trace took


class SASTracer(fx.Tracer):
    """Symbolic tracer that also keeps sas-compile's own layers as leaf modules, and the type of
    the mappings a forward returns or passes on (a ``transformers`` ``ModelOutput``, an
    ``OrderedDict``): FX records any dict as a plain one, so a traced model returned a dict where
    the model returns ``outputs.last_hidden_state``."""

    def create_arg(self, a):
        if isinstance(a, dict) and type(a) is not dict and not isinstance(a, fx.immutable_collections.immutable_dict):
            items = {key: super(SASTracer, self).create_arg(value) for key, value in a.items()}
            if all(isinstance(key, str) for key in items):
                return self.create_node("call_function", type(a), (), items)
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        from sas_compile.runtime.layers import SAS_LAYERS

        return isinstance(m, SAS_LAYERS) or getattr(m, "_sas_compile_leaf", False) or super().is_leaf_module(m, qualname)


def normalize_example_inputs(example_inputs) -> Optional[Tuple[Any, ...]]:
    """``None``, a tensor, or a tuple/list of positional inputs -> a tuple (or None)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got {type(example_inputs).__name__}"
    )


def _forward_parameters(model: nn.Module) -> Optional[List[inspect.Parameter]]:
    try:
        return list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin or C forward: no Python signature
        return None


def bind_example_inputs(model: nn.Module, example_inputs) -> Optional[Tuple[Any, ...]]:
    """:func:`normalize_example_inputs`, and a dict of keyword inputs (``{"input_ids": ...,
    "attention_mask": ...}``, as language models are called) bound to ``model.forward``'s
    positional parameters: a parameter the dict skips takes its default. Keyword-only
    parameters and names the forward does not have get a TypeError naming them."""
    if not isinstance(example_inputs, dict):
        return normalize_example_inputs(example_inputs)
    params = _forward_parameters(model)
    if params is None:
        raise TypeError(f"example_inputs as a dict needs {type(model).__name__}.forward's signature, which Python "
                        "cannot read: pass a tuple of positional inputs")
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = {p.name for p in positional}
    keyword_only = [name for name in example_inputs if name not in names
                    and any(p.name == name and p.kind == p.KEYWORD_ONLY for p in params)]
    unknown = [name for name in example_inputs if name not in names and name not in keyword_only]
    if keyword_only or unknown:
        what = (f"keyword-only argument(s) {keyword_only} (example_inputs are passed by position; their defaults "
                "apply)" if keyword_only else "")
        what += ("; " if what and unknown else "") + (f"no parameter(s) named {unknown}" if unknown else "")
        raise TypeError(f"example_inputs for {type(model).__name__}.forward"
                        f"({', '.join(p.name for p in positional)}): {what}")
    last = max(i for i, p in enumerate(positional) if p.name in example_inputs) if example_inputs else -1
    values = []
    for p in positional[: last + 1]:
        if p.name in example_inputs:
            values.append(example_inputs[p.name])
        elif p.default is not p.empty:
            values.append(p.default)
        else:
            raise TypeError(f"example_inputs for {type(model).__name__}.forward: no value for its required "
                            f"argument {p.name!r}")
    return tuple(values)


def _none_arguments(model: nn.Module, example_inputs: Optional[Tuple[Any, ...]]) -> Dict[str, None]:
    """The forward's positional parameters that are None in this call (given as None, or left to a
    None default): traced as the constant None (:func:`_trace_fitting`), ``if mask is not None``
    takes the branch the call takes (a traced placeholder is never None, and the graph then
    failed on the example). FX asserts at each call of that graph that they are still None."""
    params = _forward_parameters(model)
    if example_inputs is None or params is None or any(p.kind == p.VAR_POSITIONAL for p in params):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {p.name: None for i, p in enumerate(positional)
            if (example_inputs[i] is None if i < len(example_inputs) else p.default is None)}


def _trace_fitting(model: nn.Module, example_inputs, nones: Dict[str, None]) -> Optional[fx.GraphModule]:
    """The graph traced with the call's None arguments as constants (:func:`_none_arguments`), if it
    traces and runs on ``example_inputs``; else None. Tried only where the plain trace failed, so a
    graph that takes an optional tensor keeps it as an input wherever it can."""
    try:
        gm = _symbolic_trace(model, nones)
        with quiet_torch_logs():
            propagate_shapes(gm, example_inputs)
        return gm
    except Exception as err:  # noqa: BLE001 - the caller reports its own failure
        log.debug("symbolic_trace with %s as None failed for %s: %s", sorted(nones), type(model).__name__,
                  first_line(err))
        return None


def _symbolic_trace(model: nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> fx.GraphModule:
    tracer = SASTracer()
    graph = tracer.trace(model, concrete_args=concrete_args or None)
    for node in graph.nodes:
        # a forward annotated under `from __future__ import annotations` gives its placeholders
        # and output string types, which fx's code makes a global that torch.save cannot pickle
        if isinstance(node.type, str):
            node.type = None
    name = model.__class__.__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta[CONCRETE_ARGS_META] = concrete_args  # a retrace (mode_flags) takes the same ones
    return gm


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type where it has none), at most 300 characters."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _user_frame(err: BaseException) -> str:
    """The innermost traceback frame outside torch: the user's code that broke tracing."""
    tb = err.__traceback__
    where = ""
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if "/torch/" not in filename and "sas_compile" not in filename and "/passes/" not in filename:
            where = f"{filename}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}"
        tb = tb.tb_next
    return where


def _norm_output_on_meta(module: nn.Module, x) -> Optional[torch.Tensor]:
    """The output of a normalisation on a meta input (its shape, dtype and layout), or None to run
    the module. BatchNorm's meta kernel is a Python decomposition: answering it here halves a warm
    ``report`` of ResNet-50 (0.16 -> 0.08 s). A misfit (wrong rank or width) runs the module,
    which raises torch's own error."""
    if not (isinstance(x, torch.Tensor) and x.is_meta):
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        module._check_input_dim(x)
        fits = x.shape[1] == module.num_features
    elif isinstance(module, nn.LayerNorm):
        n = len(module.normalized_shape)
        fits = tuple(x.shape[x.dim() - n:]) == tuple(module.normalized_shape)
    elif isinstance(module, nn.GroupNorm):
        fits = x.dim() >= 2 and x.shape[1] == module.num_channels
    else:
        return None
    return torch.empty_like(x) if fits else None


class _MetaShapeProp(ShapeProp):
    """``ShapeProp`` for meta tensors, normalisations answered by :func:`_norm_output_on_meta`."""

    def call_module(self, target, args, kwargs):
        out = None if kwargs or len(args) != 1 else _norm_output_on_meta(self.fetch_attr(target), args[0])
        return super().call_module(target, args, kwargs) if out is None else out


def _propagate_on_meta(gm: fx.GraphModule, example_inputs) -> bool:
    """Shapes from the graph run on meta tensors (parameters swapped for meta stand-ins, nothing
    copied or computed); False when some op has no meta kernel, so fake tensors take over.

    Why: the same shapes as fake tensors in a fraction of the time (no fake-tensor start-up),
    and the user's tensors are never touched.
    """
    from torch.nn.utils.stateless import _reparametrize_module

    stand_ins = {name: torch.empty_like(t, device="meta")
                 for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]}
    inputs = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in example_inputs]
    try:
        with torch.no_grad(), _reparametrize_module(gm, stand_ins), quiet_torch_logs():
            _MetaShapeProp(gm).propagate(*inputs)
    except Exception:  # noqa: BLE001 - an op without a meta kernel, or inputs that do not fit
        return False
    return True


_real_runs = contextvars.ContextVar("sas_compile_shapes_from_real_runs", default=False)


@contextlib.contextmanager
def shapes_from_real_runs():
    """Within this block, captures take their shapes from running the model itself (eval mode,
    no autograd) instead of from meta tensors.

    For a caller that owns the model and has run it on the example inputs anyway (the command
    line builds it with random weights): at a report's usual input sizes one real forward is
    cheaper than the first call of torch's Python meta kernels, which imports torch._dynamo
    (0.6-0.9 s per process).
    """
    token = _real_runs.set(True)
    try:
        yield
    finally:
        _real_runs.reset(token)


def propagate_shapes(gm: fx.GraphModule, example_inputs, *, run_for_real: bool = False) -> None:
    """Shapes on every node (``meta["tensor_meta"]``), computed on meta or fake tensors: the
    user's model (BatchNorm statistics included) is never run for real.

    ``run_for_real=True`` runs ``gm`` itself, in eval mode and without autograd (its state stays
    as it is), for modules torch cannot copy to fake tensors, e.g. a GraphModule whose own
    parameters carry a parametrization (a built SWS model); so does every call inside
    :func:`shapes_from_real_runs`.
    """
    if not (run_for_real or _real_runs.get()):
        if _propagate_on_meta(gm, example_inputs):
            return
        from torch._subclasses.fake_tensor import FakeTensorMode

        # torch logs a failing op with its traceback before raising: the caller reports the error
        with torch.no_grad(), quiet_torch_logs():
            ShapeProp(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(*example_inputs)
        return
    modes = {m: m.training for m in gm.modules()}
    try:
        for m in gm.modules():
            m.training = False
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        for m, t in modes.items():
            m.training = t


def capture(model: nn.Module, example_inputs=None, *, allow_export: bool = True) -> Captured:
    """Capture ``model`` (traced as it is: callers pass a copy if they rewrite it)."""
    example_inputs = normalize_example_inputs(example_inputs)
    nones = _none_arguments(model, example_inputs)
    try:
        gm = _symbolic_trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure moves on to export
        gm = None
        trace_error = f"{first_line(err)}" + (f" (at {_user_frame(err)})" if _user_frame(err) else "")
        log.debug("symbolic_trace failed for %s: %s", type(model).__name__, trace_error)
        if nones:  # ``if mask is not None and ...`` on a traced placeholder: trace the call's Nones
            gm = _trace_fitting(model, example_inputs, nones)
    if gm is not None:
        if example_inputs is None:
            return Captured(gm, "symbolic_trace", example_inputs)
        try:
            with quiet_torch_logs():
                propagate_shapes(gm, example_inputs)
            return Captured(gm, "symbolic_trace", example_inputs)
        except Exception as err:  # noqa: BLE001 - the graph is fine: the inputs do not fit it
            fitting = _trace_fitting(model, example_inputs, nones) if nones else None
            if fitting is None:
                raise _shape_error(model, err) from err
            return Captured(fitting, "symbolic_trace", example_inputs)
    if not allow_export or example_inputs is None:
        raise CaptureError(
            f"torch.fx.symbolic_trace cannot trace {type(model).__name__}: {trace_error}. "
            "Pass example_inputs so that sas-compile can capture it with torch.export, or use "
            "torch.compile(model, backend='sas'), which handles data-dependent code with graph breaks."
        )
    try:
        with torch.no_grad(), quiet_torch_logs():
            ep = torch.export.export(model, example_inputs, strict=False)
        gm = ep.module()
    except Exception as err:  # noqa: BLE001
        where = _user_frame(err)
        why = (f"symbolic tracing failed ({trace_error}) and torch.export failed ({first_line(err)}"
               + (f", at {where}" if where else "") + ")")
        error = CaptureError(
            f"sas-compile cannot capture {type(model).__name__} as one graph: {why}. Data-dependent control "
            "flow cannot be rewritten ahead of time: use torch.compile(model, backend='sas'), which converts "
            "every captured graph around the graph breaks."
        )
        error.why = why
        raise error from err
    return Captured(gm, "export", example_inputs, trace_error)


def clean_module_path(path: str) -> str:
    """``L['self'].layer1[0].conv1`` / ``L['s']._modules['fc']._parameters['weight']`` -> ``layer1.0.conv1`` / ``fc.weight``."""
    # the frame's root: L['self'], or L['args'][0] where a decorator's ``wrapper(*args)`` took self
    path = re.sub(r"^L\['args'\]\[0\]|^L\['[^']+'\]", "", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("_modules", "_parameters", "_buffers", "__dict__")]
    return ".".join(parts)


def layer_owner(model: Optional[nn.Module], fqn: str, fallback: Optional[nn.Module]) -> Optional[nn.Module]:
    """The module of the user's ``model`` that a layer named ``fqn`` belongs to, for
    ``filter_fn(module, fqn)``: the module at ``fqn`` (an ``nn.Linear`` whose weight a graph
    reads as an attribute), else the module holding the parameter ``fqn`` (``inner.w``), else
    ``fallback``. A traced graph holds stand-in modules for attributes it reads: a filter must
    see the module the user wrote, whatever the graph calls it."""
    if model is None:
        return fallback
    for path in (fqn, fqn.rpartition(".")[0]):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    return fallback


def shape_tree(node: fx.Node):
    """A node's shape from its metadata: a tuple of ints, nested tuples for a multi-output node, or None.

    Export and dynamo graphs carry ``val`` / ``example_value`` (fake tensors);
    :func:`propagate_shapes` leaves ``tensor_meta``.
    """
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is None:
        val = node.meta.get("tensor_meta")
    return _shape_of(val) if val is not None else None


def example_sizes(shape) -> Optional[Tuple[int, ...]]:
    """The sizes of ``shape`` on the captured example, as ints, or None where one has no value.

    Under the backend a dynamic size is a SymInt: ``int()`` on it would add a guard that pins the
    graph to this one size, and dynamo would then recompile the model for every new size (then
    run it uncompiled past its recompile limit). Its hint is the example's value, without a guard.
    """
    sizes = []
    for size in shape:
        if isinstance(size, torch.SymInt):
            node = size.node
            value = node.maybe_as_int()  # a size the graph already pins
            if value is None and node.has_hint():
                value = int(node.hint)
            if value is None:
                return None  # data-dependent (unbacked): no value to read
            sizes.append(value)
        else:
            sizes.append(int(size))
    return tuple(sizes)


def _shape_of(val):
    if hasattr(val, "shape") and hasattr(val, "dtype"):  # a (fake) tensor, ShapeProp's TensorMetadata
        return example_sizes(val.shape)
    if isinstance(val, (list, tuple)) and not isinstance(val, torch.Size):
        return tuple(_shape_of(v) for v in val)
    return None


def capture_seeing_into_leaves(model: nn.Module, example_inputs, *,
                               sees_into: Callable[[nn.Module], bool]) -> Captured:
    """:func:`capture`, or torch.export when symbolic tracing leaves opaque leaf modules with weights.

    A leaf module the caller cannot see into (``sees_into(module)`` is False: e.g.
    ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention`` for the SWS width analysis) hides
    the layers inside it; export (with ``example_inputs``) shows its linears and reshapes. When
    export fails the traced graph is kept, and the caller's analysis says what stays.
    """
    captured = capture(model, example_inputs)
    if captured.method != "symbolic_trace" or captured.example_inputs is None:
        return captured
    gm = captured.gm
    opaque = [
        n.target for n in gm.graph.nodes
        if n.op == "call_module" and not sees_into(gm.get_submodule(n.target))
        and any(True for _ in gm.get_submodule(n.target).parameters())
    ]
    if not opaque:
        return captured
    try:
        with torch.no_grad():
            exported = torch.export.export(model, captured.example_inputs, strict=False).module()
    except Exception as err:  # noqa: BLE001 - keep the traced graph; the analysis says what stays
        log.debug("export of %s for opaque leaves %s failed: %s", type(model).__name__, opaque, first_line(err))
        return captured
    return Captured(exported, "export", captured.example_inputs)


def trainable_export_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A plain GraphModule of an exported graph, which ``.train()`` / ``.eval()`` can switch.

    ``torch.export``'s module refuses ``.eval()`` and checks its inputs with a guard call; this
    one does neither. Export bakes ``self.training`` into the graph as constants: the caller
    reads those at run time (``mode_flags.export_modes`` finds them, ``bind_mode_values`` binds them).
    """
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            graph.erase_node(node)
    # unpickling re-traces the code with the tracer class the graph records; export's needs
    # arguments that pickle does not keep (loading failed), FX's own traces these aten calls
    graph._tracer_cls, graph._tracer_extras = None, {}
    new = fx.GraphModule(gm, graph, type(gm).__name__)
    new.meta = getattr(gm, "meta", {})
    return new


def dynamo_placeholder_sources(gm: fx.GraphModule) -> dict:
    """Placeholder name -> the parameter's path in the user's model, from dynamo's metadata."""
    sources = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        grapharg = node.meta.get("grapharg")
        source = getattr(grapharg, "source", None)
        name = getattr(source, "name", None)
        name = name() if callable(name) else name
        if isinstance(name, str):
            sources[node.name] = clean_module_path(name)
    return sources


def in_resume_frame() -> bool:
    """Whether dynamo is capturing a graph that resumes after a graph break (its inputs are
    activations, not the network's input)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().f_code.co_name.startswith("torch_dynamo_resume_in_")
    except Exception:  # noqa: BLE001 - outside dynamo (a direct call): treat inputs as network inputs
        return False


@dataclass
class DynamoGraph:
    """One graph dynamo captured: the graph, its inputs (parameters are real), where they come from."""

    gm: fx.GraphModule
    example_inputs: Tuple[Any, ...]
    parameters: dict
    sources: dict
    resumes: bool  # captured after a graph break


def _graph_break_reasons() -> list:
    """Dynamo's graph breaks of the last compile, one line each: the reason and the user's line.

    torch 2.13 counts them under "unimplemented" (with hints, many lines), older ones under
    "graph_break"."""
    counters = torch._dynamo.utils.counters
    reasons = list(counters.get("graph_break", {})) or list(counters.get("unimplemented", {}))
    lines_out = []
    for reason in reasons:
        lines = [line.strip() for line in str(reason).splitlines() if line.strip()]
        where = next((line[2:] for line in lines if line.startswith("# File")), None)
        lines_out.append(lines[0] + (f" at {where}" if where else ""))
    return sorted(lines_out)


def tensors_in(value, depth: int = 3):
    """The tensors in ``value`` and the lists, tuples and dicts it holds, ``depth`` levels down."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (list, tuple, dict)):
        for item in value.values() if isinstance(value, dict) else value:
            yield from tensors_in(item, depth - 1)


def copy_model(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, also for a model holding a tensor a forward pre-hook computes.

    ``torch.nn.utils.weight_norm`` (deprecated, still common in audio models) keeps ``weight`` as a
    computed tensor, not a graph leaf, which ``deepcopy`` refuses; the copy gets it detached, and
    the copied hook recomputes it at the copy's next call."""
    memo = dict(memo or {})
    for mod in module.modules():
        for value in vars(mod).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf and id(value) not in memo:
                memo[id(value)] = value.detach()
    return copy.deepcopy(module, memo)  # a root-masked SWS graph too (runtime.sws_mask.register_mask)


def capture_with_dynamo(model: nn.Module, example_inputs) -> Tuple[list, list]:
    """Every graph dynamo captures when ``model`` runs on ``example_inputs``, and the graph breaks.

    The fallback for a model neither symbolic tracing nor torch.export can capture as one graph
    (data-dependent control flow, a cache object in its output): dynamo splits it at the breaks.
    The model runs once, for real, without autograd, on a copy that shares its parameters (no
    second copy of the weights; nothing writes them without autograd) and has its own buffers
    and attributes (BatchNorm statistics and anything else the forward updates are untouched), with
    the random number generators restored afterwards (a dropout in training mode draws). The graphs
    hold the user's own parameters, so identity (a tied weight) and ``filter_fn``'s modules are
    those of ``model``. Returns ``([DynamoGraph], [graph break reasons])``.
    """
    import torch._dynamo

    example_inputs = normalize_example_inputs(example_inputs)
    graphs: list = []

    def record(gm, inputs):
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        parameters = {node.name: value for node, value in zip(placeholders, inputs)
                      if isinstance(value, torch.nn.Parameter)}
        graphs.append(DynamoGraph(gm, tuple(inputs), parameters, dynamo_placeholder_sources(gm), in_resume_frame()))
        return gm.forward

    work = copy_model(model, {id(p): p for p in model.parameters()})
    devices = sorted({t.device.index or 0 for t in [*model.parameters(), *tensors_in(example_inputs)] if t.is_cuda})
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with torch.no_grad(), quiet_torch_logs(), torch.random.fork_rng(devices=devices):
            torch.compile(work, backend=record)(*example_inputs)
        breaks = _graph_break_reasons()
    finally:
        torch._dynamo.reset()
    return graphs, breaks
