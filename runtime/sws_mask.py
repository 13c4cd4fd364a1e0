"""The SWS weight mask: a 1:M magnitude mask as a ``torch.nn.utils.parametrize`` parametrization.

Why here, beside the ops: the mask decides which weights the SWS kernels store and multiply
(``packing.pack_sws_weight`` packs exactly the weights it keeps), and both the SWS rewrite
(``passes/widen_for_sws.py``) and users' own layers register it.

The weight is viewed row-major as ``[out, in/groups * kernel]`` and flattened; every chunk of
M consecutive weights keeps exactly one, the largest magnitude, and a last partial chunk keeps
one: the paper's count ``ceil(in * out / M)``. A transposed convolution stores its weight
``[in, out/groups, *kernel]``; its mask (``transposed_groups``) is taken in the same
``[out, in/groups * kernel]`` view, so the chunks run along the channels the layer sums over,
as a convolution's do. The mask is recomputed every forward in training
with a straight-through gradient; ``freeze_mask=True`` computes it once and trains only the kept
weights: that mask is a persistent buffer, part of the state_dict, so a reloaded checkpoint
computes with the mask it was trained with. In eval mode, without autograd, the masked weight is
cached until the weight (or the frozen mask) changes.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .projection import check_M

__all__ = ["HOOK_DICTS", "OneOfMMask", "one_of_m_mask", "register_again", "register_mask", "sws_mask_of", "sws_masks", "drop_parametrization",
           "transposed_to_conv_layout", "conv_to_transposed_layout"]


def transposed_to_conv_layout(weight: Tensor, groups: int) -> Tensor:
    """A transposed convolution's ``[in, out/groups, *kernel]`` weight as ``[out, in/groups, *kernel]``
    (the layout of the convolution it is the gradient of, each group's in and out swapped)."""
    cin, og, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    if groups < 1 or cin % groups:
        raise ValueError(f"transposed_groups={groups}: the weight's {cin} input channels do not split into it")
    return weight.reshape(groups, cin // groups, og, *kernel).transpose(1, 2).reshape(groups * og, cin // groups, *kernel)


def conv_to_transposed_layout(weight: Tensor, groups: int) -> Tensor:
    """The inverse of :func:`transposed_to_conv_layout`."""
    cout, ig, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
    return weight.reshape(groups, cout // groups, ig, *kernel).transpose(1, 2).reshape(groups * ig, cout // groups, *kernel)


def one_of_m_mask(weight: Tensor, M: int, transposed_groups: Optional[int] = None) -> Tensor:
    """Bool mask keeping the largest-magnitude weight of every M consecutive (row-major) weights.

    ``transposed_groups``: ``weight`` is a transposed convolution's (with that many groups); the
    chunks are taken in its ``[out, in/groups, *kernel]`` view and the mask returned in its shape."""
    if transposed_groups is not None:
        mask = one_of_m_mask(transposed_to_conv_layout(weight, transposed_groups), M)
        return conv_to_transposed_layout(mask, transposed_groups)
    flat = weight.detach().reshape(-1).abs()
    n = flat.numel()
    pad = (-n) % M
    if pad:
        # a last partial chunk keeps one of the weights it has: padding can never win
        flat = torch.cat([flat, flat.new_full((pad,), -1.0)])
    keep = flat.view(-1, M).argmax(dim=1, keepdim=True)
    # out of place (a comparison, not a scatter into zeros): torch.jit.trace records it whole
    mask = keep == torch.arange(M, device=weight.device)
    return mask.view(-1)[:n].view(weight.shape)


def _cacheable(weight: Tensor) -> bool:
    """Whether an eval-mode product can be cached for ``weight``: a real tensor in eager mode. A
    trace (``torch.jit.trace``, ``torch.export``, ``torch.compile``) records the mask's ops
    instead: a cached product would be a constant in it, and a fake tensor has no data pointer."""
    return (type(weight) in (torch.Tensor, nn.Parameter) and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling())


class OneOfMMask(nn.Module):
    """Parametrization: the 1:M masked weight (see the module docstring for the pattern).

    ``state_dict`` keeps the plain dense weight (``parametrizations.weight.original``) and,
    with ``freeze_mask``, the frozen mask (``parametrizations.weight.0.frozen``). ``weight``
    freezes the mask of that weight now (else at the first forward), so that the state_dict
    holds it from the start. ``transposed_groups`` (the layer's groups) marks the weight of a
    transposed convolution: its chunks run along its input channels (see the module docstring).
    """

    def __init__(self, M: int, freeze_mask: bool = False, weight: Optional[Tensor] = None, *,
                 transposed_groups: Optional[int] = None):
        super().__init__()
        self.M = check_M(M)
        self.freeze_mask = freeze_mask
        if transposed_groups is not None and (isinstance(transposed_groups, bool) or not isinstance(transposed_groups, int)
                                              or transposed_groups < 1):
            raise ValueError(f"transposed_groups={transposed_groups!r}: expected the layer's groups, an int >= 1")
        self.transposed_groups = transposed_groups
        frozen = self._compute(weight) if freeze_mask and weight is not None else None
        # a frozen mask is state: a checkpoint without it would reload with a different mask
        self.register_buffer("frozen", frozen, persistent=freeze_mask)
        self._cache: Optional[Tensor] = None
        self._cache_key = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "frozen"
        if self.freeze_mask and self.frozen is None and key in state_dict:
            # not frozen yet here: take the checkpoint's mask rather than reject it
            self.frozen = torch.zeros_like(state_dict[key], dtype=torch.bool)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def mask(self, weight: Tensor) -> Tensor:
        """The current bool mask of ``weight`` (the frozen one when ``freeze_mask``)."""
        if self.freeze_mask:
            if self.frozen is None or self.frozen.shape != weight.shape:
                self.frozen = self._compute(weight)
            elif self.frozen.device != weight.device:  # loaded from a checkpoint on another device
                self.frozen = self.frozen.to(weight.device)
            return self.frozen
        return self._compute(weight)

    def _compute(self, weight: Tensor) -> Tensor:
        return one_of_m_mask(weight, self.M, self.transposed_groups)

    def conv_layout(self, weight: Tensor) -> Tensor:
        """``weight`` viewed as ``[out, in/groups, *kernel]``, the layout whose row-major chunks
        the mask keeps one of (a transposed convolution's weight is rearranged into it)."""
        if self.transposed_groups is None:
            return weight
        return transposed_to_conv_layout(weight, self.transposed_groups)

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training and not torch.is_grad_enabled() and _cacheable(weight):
            frozen = self.frozen if self.freeze_mask and self.frozen is not None else None
            key = (weight.data_ptr(), weight._version, weight.shape, weight.dtype,
                   None if frozen is None else (frozen.data_ptr(), frozen._version))
            if self._cache is None or self._cache_key != key:
                self._cache = weight.detach() * self.mask(weight)
                self._cache_key = key
            return self._cache
        mask = self.mask(weight)
        if self.freeze_mask:
            return weight * mask
        # straight-through: forward uses the masked weight, backward reaches every weight
        return weight + (weight * mask - weight).detach()

    def __getstate__(self):
        """Pickled and deep-copied without the eval cache: a copy of the masked weight, keyed by the
        address of a tensor the copy does not have."""
        state = self.__dict__.copy()
        state["_cache"] = state["_cache_key"] = None
        return state

    def extra_repr(self) -> str:
        extra = "" if self.transposed_groups is None else f", transposed_groups={self.transposed_groups}"
        return f"M={self.M}, freeze_mask={self.freeze_mask}{extra}"

    def __prepare_scriptable__(self):
        """``torch.jit.script`` cannot compile a parametrization (``torch.nn.utils.parametrize``
        builds the weight in a Python property): one error saying what works instead."""
        raise TypeError(
            "torch.jit.script cannot compile an SWS model: its 1:M masks are torch.nn.utils.parametrize "
            "parametrizations, which TorchScript does not support. torch.jit.trace it instead (in eval mode, "
            "under torch.no_grad(), it records the mask; torch.export works too), or bake the masks in first "
            "with torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight', leave_parametrized=True) "
            "on each masked layer")


def sws_mask_of(module: nn.Module, name: str = "weight") -> Optional[OneOfMMask]:
    """The :class:`OneOfMMask` parametrizing ``module.<name>``, or None when it has none."""
    if module is None or not parametrize.is_parametrized(module, name):
        return None
    return next((p for p in getattr(module.parametrizations, name) if isinstance(p, OneOfMMask)), None)


def sws_masks(model: nn.Module) -> dict:
    """``{parameter path: M}`` of every weight of ``model`` that carries a :class:`OneOfMMask`."""
    out = {}
    for path, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for name in module.parametrizations:
                mask = sws_mask_of(module, name)
                if mask is not None:
                    out[f"{path}.{name}" if path else name] = int(mask.M)
    return out


def drop_parametrization(module: nn.Module, name: str) -> None:
    """Remove every parametrization of ``module.<name>``: its stored original becomes the parameter again.

    ``module`` first gets its own copy of its parametrized class: parametrize keeps a module's
    parametrized attributes as properties of a class made for that module, which ``copy.deepcopy``
    shares with the original, so removing one on a copy would remove it from the model it was
    copied from too. (A GraphModule keeps its class: a copy of one is built with a class of its own.)
    """
    if not isinstance(module, torch.fx.GraphModule):
        cls = type(module)
        body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
    parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def register_mask(owner: nn.Module, name: str, mask: OneOfMMask) -> None:
    """Parametrize ``owner.<name>`` with ``mask`` (``unsafe``: the mask keeps the shape), so that
    the owner still pickles: ``torch.save`` of a whole SWS model, as of any model.

    parametrize makes ``owner`` an instance of a class of its own whose ``__getstate__`` refuses
    pickling ("only supported through state_dict()"); that class (shared by copies of ``owner``)
    gets a ``__reduce_ex__`` that pickles the plain layer with its stored original and the
    parametrizations beside it, registered again on load (:func:`_rebuild_parametrized`). The
    tensors themselves are pickled, so weights tied across layers stay one tensor. A GraphModule
    (an SWS graph masking a weight its root reads) pickles by fx's own reduce with the original as
    a plain attribute, which torch.load otherwise could not find: torch.save succeeded and
    loading failed.
    """
    parametrize.register_parametrization(owner, name, mask, unsafe=True)
    cls = type(owner)
    if not isinstance(owner, torch.fx.GraphModule):
        cls.__reduce_ex__ = _reduce_parametrized
        return
    cls.__reduce_ex__ = _reduce_parametrized_graph_module
    # fx's deepcopy rebuilds the graph's attributes from the instance dict, where the masked one
    # is not (an AttributeError on '_CodeOnlyModule')
    cls.__deepcopy__ = _deepcopy_parametrized_graph_module
    base = cls.__bases__[0]
    if "_wrapped_call" in vars(base):
        # fx's recompile wraps a subclass's __call__ in a call to its base's, which finds the
        # subclass's wrapper again: gm.recompile() then made every call recurse without end
        cls._wrapped_call = vars(base)["_wrapped_call"]


def _plain_state(state: dict, owner: str):
    """``state`` (a parametrized module's ``__dict__``) with each original as the plain parameter,
    and the parametrization lists to register again."""
    state = dict(state)
    state.pop("_compiled_call_impl", None)  # what module.compile() set: not pickled, as nn.Module does
    parameters, modules = dict(state["_parameters"]), dict(state["_modules"])
    parametrizations = {}
    for name, plist in modules.pop("parametrizations").items():
        if not hasattr(plist, "original"):  # a right_inverse that returned several tensors
            raise RuntimeError(f"{owner}.{name}: a parametrization with several originals pickles "
                               "only through state_dict()")
        parameters[name] = plist.original
        parametrizations[name] = list(plist)
    state["_parameters"], state["_modules"] = parameters, modules
    return state, parametrizations


def _reduce_parametrized_graph_module(gm: nn.Module, protocol):
    state, parametrizations = _plain_state(gm.__dict__, type(gm).__name__)
    # fx's reduce recompiles: reduce an instance of the graph's own class (see register_mask)
    plain = object.__new__(type(gm).__bases__[0])
    plain.__dict__.update(state)
    rebuild, args = torch.fx.GraphModule.__reduce__(plain)
    return _rebuild_parametrized_graph_module, (rebuild, args, parametrizations)


# the hook dicts of a module (nn.Module keeps each in its own attribute)
HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _deepcopy_parametrized_graph_module(gm: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of a GraphModule whose own weights are masked: its graph over copies of
    every attribute and module the graph reads. A masked weight of the root (or of a bare holder
    module) is copied as its stored original and parametrized again with copies of its
    parametrizations; a module the graph calls is copied whole, with its own, and set after fx
    assigns the graph's attributes (so a weight both called and read is masked once). Tensors in
    ``memo`` stay shared; the class name, the root's hooks and non-persistent buffers come along."""
    fx = torch.fx
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    root: dict = {}
    modules: dict = {}  # set after construction: fx would assign attributes onto them
    parametrized = []  # (owner path, name, parametrizations) to register again on the copy
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module") or node.target in root:
            continue
        parent, _, name = node.target.rpartition(".")
        owner = gm.get_submodule(parent) if parent else gm
        if node.op == "call_module":
            modules[node.target] = copy.deepcopy(getattr(owner, name), memo)
            root[node.target] = nn.Module()  # a placeholder while fx assigns the graph's attributes
        elif parametrize.is_parametrized(owner, name):
            plist = getattr(owner.parametrizations, name)
            root[node.target] = copy.deepcopy(plist.original, memo)
            if not any(node.target.startswith(f"{m}.") for m in called):  # else its module's copy holds them
                parametrized.append((parent, name, [copy.deepcopy(p, memo) for p in plist]))
        else:
            root[node.target] = copy.deepcopy(getattr(owner, name), memo)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    # parametrize named the class Parametrized<name>; it names the copy's class again
    out = fx.GraphModule(root, graph, class_name=type(gm).__bases__[0].__name__)
    memo[id(gm)] = out
    for target in sorted(modules, key=lambda t: t.count(".")):
        out.set_submodule(target, modules[target])
    for parent, name, plist in parametrized:  # the copied original is the owner's parameter now
        register_again(out.get_submodule(parent) if parent else out, name, plist)
    for name in HOOK_DICTS:
        if name in vars(gm):
            setattr(out, name, copy.copy(getattr(gm, name)))
    out._non_persistent_buffers_set |= {b for b in gm._non_persistent_buffers_set if b in out._buffers}
    out.training = gm.training  # the copied modules and parametrizations keep their own flags
    return out


def _rebuild_parametrized_graph_module(rebuild, args: tuple, parametrizations: dict) -> nn.Module:
    gm = rebuild(*args)
    for name, plist in parametrizations.items():
        register_again(gm, name, plist)
    return gm


def _reduce_parametrized(module: nn.Module, protocol):
    plain = type(module).__bases__[0]
    state, parametrizations = _plain_state(module.__dict__, plain.__name__)
    return _rebuild_parametrized, (plain, state, parametrizations)


def _rebuild_parametrized(cls, state: dict, parametrizations: dict) -> nn.Module:
    module = cls.__new__(cls)
    module.__setstate__(state)
    for name, plist in parametrizations.items():
        register_again(module, name, plist)
    return module


def register_again(owner: nn.Module, name: str, parametrizations) -> None:
    """Register ``parametrizations`` (a copied or unpickled list) on ``owner.<name>`` in order,
    an SWS mask through :func:`register_mask`."""
    for p in parametrizations:
        if isinstance(p, OneOfMMask):
            register_mask(owner, name, p)
        else:
            parametrize.register_parametrization(owner, name, p, unsafe=True)
