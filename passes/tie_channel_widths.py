"""Analysis: which tensor widths of an FX graph must widen together for SWS, and what they widen to at M.

Why this pass exists: SWS widens every hidden width by sqrt(M), but a width is shared by
everything that touches it: a residual add ties the widths of both branches, a norm ties
its parameters, a reshape into heads ties the head size to the projection's width, a
concatenation's width is the sum of its inputs'. Widening one layer at a time gives a
model that does not run; this pass decides, once for the whole graph, which widths are
tied (``sws_width_model``: a union-find over width groups, filled by the per-op rules of
``sws_width_rules``) and which of them can widen safely.

Analysis once, decision per M: which widths are tied and which must keep their size (and
why) does not depend on M, so :func:`analyze_channel_widths` walks the graph once and returns
a :class:`ChannelWidthAnalysis`; ``analysis.at(M)`` decides the widths at one M cheaply.

Decision at M: a group widens to ``sws_width(C, M)`` when it is not fixed and holds the input
or output width of a conv/linear. Every segment must then stay an integer (``W * factor``;
e.g. the widened width must split into the same number of heads); a group that fails stays
at its size, with the reason. A layer's groups and fan-in then follow from its two widths by
the one per-layer rule, ``costs.sws_layer_shape``. Without example inputs the analysis
guesses one input from the first layer that reads it and says so in the notes.
"""
from __future__ import annotations

import logging
import math
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from sas_compile.runtime.projection import check_M

from .capture import normalize_example_inputs, propagate_shapes, shape_tree
from .costs import sws_layer_shape, sws_width
from .find_sas_layers import raw_input_nodes
from .sws_width_model import ChannelWidths, Dim, SWSLayerWidths
from .sws_width_rules import WidthWalk

log = logging.getLogger("sas_compile.passes")

__all__ = [
    "ChannelWidthAnalysis",
    "analyze_channel_widths",
    "tie_channel_widths",
    "sws_layer_widths",
    # the width model, re-exported: callers of this pass read its results in these types
    "ChannelWidths",
    "SWSLayerWidths",
    "Dim",
]

_DENSE_INPUT_REASON = "weight stays dense: the layer reads the raw network input (dense_input_layers=True, as sasify)"


class ChannelWidthAnalysis:
    """The M-independent result of one walk over a graph; :meth:`at` decides the widths at an M.

    ``walk`` holds every node's dims, the width groups (tied, fixed with their reasons) and
    every conv/linear call; ``raw_inputs`` the nodes computed from the network inputs alone.
    """

    def __init__(self, walk: WidthWalk, raw_inputs: set, notes: List[str]):
        self.walk = walk
        self.raw_inputs = raw_inputs
        self.notes = notes
        self._dims = self._integral_dims()
        self._at: Dict[int, ChannelWidths] = {}

    @property
    def layer_names(self) -> List[str]:
        """Node names of the conv/linear calls, in graph order."""
        return list(self.walk.layers)

    def _integral_dims(self) -> List[Tuple[Dim, str]]:
        """Every dim of the graph, with where it is: each must stay an integer after widening."""
        out: List[Tuple[Dim, str]] = list(self.walk.uf.requirements)

        def collect(value, where):
            if isinstance(value, Dim):
                out.append((value, where))
            elif isinstance(value, (list, tuple)):
                for v in value:
                    collect(v, where)

        for name, value in self.walk.env.items():
            collect(value, name)
        for target, dims in self.walk.params.items():
            collect(dims, target)
        return out

    def at(self, M: int) -> ChannelWidths:
        """The widths at ``M`` (cached per M): every group's width and every layer's widths."""
        check_M(M)
        if M not in self._at:
            self._at[M] = self._decide(M)
        return self._at[M]

    def _decide(self, M: int) -> ChannelWidths:
        walk = self.walk
        uf = walk.uf.copy()  # the decision fixes groups; the analysis stays as it is for other M
        widths = _group_widths(uf, self._dims, M)
        layers: Dict[str, SWSLayerWidths] = {}
        result = ChannelWidths(M, widths, walk.env, layers,
                               {n: (s.weight_target, s.bias_target) for n, s in walk.layers.items()},
                               walk.params, list(self.notes), uf, dict(walk.unfollowed))
        for name, site in walk.layers.items():
            shape = sws_layer_shape(site.base_in, site.base_out, M, groups=site.groups,
                                    kernel=math.prod(site.kernel_size),
                                    in_width=result.size_of(site.din), out_width=result.size_of(site.dout))
            why = []
            if shape.in_channels == site.base_in:
                why.append("input width stays: " + uf.reason_of(site.din))
            if shape.out_channels == site.base_out:
                why.append("output width stays: " + uf.reason_of(site.dout))
            widened = len(why) < 2
            reads_input = site.x in self.raw_inputs
            if widened and reads_input:
                why.append(_DENSE_INPUT_REASON)
            layers[name] = SWSLayerWidths(
                in_channels=shape.in_channels, out_channels=shape.out_channels, fan_in=shape.fan_in,
                out_features=shape.out_channels, groups=shape.groups, widened=widened,
                reason="; ".join(why) or None, base_in_channels=site.base_in, base_out_channels=site.base_out,
                kernel_size=site.kernel_size, op=site.op, M=M, sparse=widened and not reads_input,
                reads_network_input=reads_input,
            )
        log.debug("channel widths at M=%d: %d layers, %d widened, %d sparse", M, len(layers),
                  sum(1 for w in layers.values() if w.widened), sum(1 for w in layers.values() if w.sparse))
        return result


def _group_widths(uf, dims: List[Tuple[Dim, str]], M: int) -> Dict[int, int]:
    """Widen every free width group, then fix groups whose segments stop being integral (a fixpoint)."""
    while True:
        widths = {}
        for g in range(len(uf.groups)):
            if uf.find(g) != g or g in uf.alias:
                continue
            grp = uf.groups[g]
            widths[g] = sws_width(grp.size, M) if (grp.width and not grp.fixed and grp.size > 0) else grp.size
        changed = False
        for dim, where in dims:
            d = uf.resolve(dim)
            total = sum((widths[g] * f for g, f in d.segs), Fraction(0))
            if total.denominator != 1:
                for g, f in d.segs:
                    if (widths[g] * f).denominator != 1 and not uf.groups[g].fixed:
                        uf.groups[g].fixed = True
                        uf.groups[g].reason = (
                            f"widened width {widths[g]} does not split into {f.denominator} "
                            f"(heads or groups) at {where}"
                        )
                        changed = True
        if not changed:
            # aliased roots: report the width of what they are a multiple of
            for g in uf.alias:
                widths[g] = int(sum((widths[h] * f for h, f in uf.resolve(Dim(((g, Fraction(1)),))).segs),
                                    Fraction(0)))
            return widths


# --------------------------------------------------------------------------- shapes


def _has_shapes(gm: fx.GraphModule) -> bool:
    return any(node.op == "placeholder" and shape_tree(node) is not None for node in gm.graph.nodes)


def _has_fake_values(gm: fx.GraphModule) -> bool:
    """export/dynamo graphs carry every node's shape already (``val``/``example_value``)."""
    return any("val" in n.meta or "example_value" in n.meta for n in gm.graph.nodes if n.op == "placeholder")


def _guess_inputs(gm: fx.GraphModule) -> Optional[tuple]:
    """One plausible input per placeholder, from the first conv/linear/embedding reading it."""
    guesses = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        guess = None
        for user in node.users:
            if user.op != "call_module":
                continue
            mod = gm.get_submodule(user.target)
            if isinstance(mod, nn.Conv2d):
                guess = torch.randn(2, mod.in_channels, 32, 32)
            elif isinstance(mod, nn.Conv1d):
                guess = torch.randn(2, mod.in_channels, 64)
            elif isinstance(mod, nn.Conv3d):
                guess = torch.randn(2, mod.in_channels, 16, 16, 16)
            elif isinstance(mod, nn.Linear):
                guess = torch.randn(2, mod.in_features)
            elif isinstance(mod, nn.Embedding):
                guess = torch.randint(0, mod.num_embeddings, (2, 8))
            if guess is not None:
                break
        if guess is None:
            return None
        guesses.append(guess)
    return tuple(guesses)


def _shapes_match(gm: fx.GraphModule, inputs) -> bool:
    """Whether ``gm``'s placeholders already carry the shapes of ``inputs``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if len(placeholders) != len(tensors):
        return False
    for node, x in zip(placeholders, tensors):
        meta = node.meta.get("tensor_meta")
        if meta is None or tuple(meta.shape) != tuple(x.shape) or meta.dtype != x.dtype:
            return False
    return all("tensor_meta" in n.meta for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr"))


def _shapes(gm: fx.GraphModule, example_inputs) -> List[str]:
    """Put shapes on ``gm`` (from ``example_inputs``, else from a guess); notes on what was guessed."""
    if example_inputs is not None and not _has_fake_values(gm):
        inputs = normalize_example_inputs(example_inputs)
        if not _shapes_match(gm, inputs):  # the capture already propagated these very inputs
            propagate_shapes(gm, inputs)
        return []
    if _has_shapes(gm):
        return []
    guess = _guess_inputs(gm)
    try:
        if guess is None:
            raise RuntimeError("no conv/linear/embedding reads the inputs directly")
        propagate_shapes(gm, guess)
    except Exception as err:  # noqa: BLE001 - the guess may not fit the model
        return [f"no example_inputs and no guessable input shape ({err}); pass example_inputs"]
    return ["no example_inputs: shapes come from a guessed input "
            + ", ".join(str(tuple(g.shape)) for g in guess) + "; pass example_inputs for exact spatial sizes"]


def _raw_inputs(gm: fx.GraphModule) -> set:
    """Nodes computed from the network inputs alone: sasify's notion (``find_sas_layers``)."""
    params = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val", node.meta.get("example_value"))
            # lifted parameters (dynamo graphs) are not network inputs; the analysis reads them as parameters
            if isinstance(val, nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name:
                params.add(node.name)
    return raw_input_nodes(gm, params)


# --------------------------------------------------------------------------- entry points


def analyze_channel_widths(gm: fx.GraphModule, example_inputs=None, *,
                           filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
                           dense_input_layers: bool = True,
                           model: Optional[nn.Module] = None) -> ChannelWidthAnalysis:
    """Walk ``gm`` once: tie its widths and find the ones that must stay; ``.at(M)`` decides them.

    Shapes come from the nodes' metadata (``val`` of export/dynamo graphs, ``tensor_meta`` of
    ``capture.propagate_shapes``); with ``example_inputs`` shapes are propagated first.
    ``filter_fn(module, fqn) -> bool`` keeps a layer out of SWS when it returns False (its widths
    stay); ``module`` is the layer's module in the user's ``model`` where given (the graph of a
    copy holds stand-ins). ``dense_input_layers`` (sasify's policy, the default) keeps the weight
    of a layer reading the raw network input dense: its output width still widens, but it has no
    1:M mask (``sparse=False``). ``False`` masks it like every other widened layer.
    """
    notes = _shapes(gm, example_inputs)
    walk = WidthWalk(gm, filter_fn, model).run()
    if not _has_shapes(gm):
        for site in walk.layers.values():
            walk.uf.fix(site.din, "shapes unknown: pass example_inputs")
            walk.uf.fix(site.dout, "shapes unknown: pass example_inputs")
    raw = _raw_inputs(gm) if dense_input_layers else set()
    return ChannelWidthAnalysis(walk, raw, notes)


def tie_channel_widths(gm: fx.GraphModule, M: int, example_inputs=None, *, filter_fn=None,
                       dense_input_layers: bool = True, model: Optional[nn.Module] = None) -> ChannelWidths:
    """The widths of ``gm`` at one ``M``: ``analyze_channel_widths(...).at(M)``."""
    check_M(M)
    return analyze_channel_widths(gm, example_inputs, filter_fn=filter_fn, dense_input_layers=dense_input_layers,
                                  model=model).at(M)


def sws_layer_widths(gm: fx.GraphModule, M: int, example_inputs=None, *, filter_fn=None,
                     dense_input_layers: bool = True) -> Dict[str, SWSLayerWidths]:
    """SWS widths of every conv/linear call in ``gm`` at ``M``, keyed by node name (see :class:`SWSLayerWidths`).

    ``dense_input_layers`` as in :func:`analyze_channel_widths` (a layer reading the raw network
    input keeps a dense weight by default).
    """
    return tie_channel_widths(gm, M, example_inputs, filter_fn=filter_fn,
                              dense_input_layers=dense_input_layers).layers
