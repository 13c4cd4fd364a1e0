"""The per-op width rules of the SWS analysis (passes/sws_width_rules.py): a small graph in, widths out.

Each test traces a few ops, runs the analysis and checks the widths (and the reasons for the
ones that stay) that the op's rule implies; the table tests check that every spelling of an op
reaches the same rule and that an op without a rule fixes the widths it touches.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from sas_compile.passes.capture import propagate_shapes, shape_tree
from sas_compile.passes.costs import sws_width
from sas_compile.passes.sws_width_rules import (
    MODULE_WIDTH_RULES,
    WIDTH_RULES,
    WidthWalk,
    elementwise,
    has_width_rule,
    layer,
    layer_norm_module,
    unknown_op,
    width_rule_for,
)
from sas_compile.passes.tie_channel_widths import analyze_channel_widths

from zoo import models as zoo_models

torch.manual_seed(0)


def widths(module: nn.Module, *inputs, M: int = 2):
    """Trace ``module``, analyse it on ``inputs``; the widths at ``M``."""
    gm = fx.symbolic_trace(module)
    return analyze_channel_widths(gm, inputs).at(M)


def layer_widths(cw, name):
    w = cw.layers[name]
    return w.in_channels, w.out_channels


# --------------------------------------------------------------------------- the table


class Spellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = torch.relu(x) + F.relu(x) + x.relu() + self.act(x)
        y = self.fc(self.norm(y)) + F.linear(y, self.w)
        return torch.cumsum(y, 1)


def test_every_spelling_of_an_op_reaches_one_rule():
    gm = fx.symbolic_trace(Spellings())
    rules = {n.name: width_rule_for(n, gm) for n in gm.graph.nodes if n.op.startswith("call")}
    assert rules["relu"] is rules["relu_1"] is rules["relu_2"] is rules["act"] is elementwise
    assert rules["fc"] is rules["linear"] is layer  # nn.Linear and F.linear: find_sas_layers.match_layer_call
    assert rules["norm"] is layer_norm_module
    assert rules["cumsum"] is unknown_op
    # the ATen spellings of an exported graph
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    relu = graph.call_function(torch.ops.aten.relu.default, (x,))
    lin = graph.call_function(torch.ops.aten.linear.default, (relu, w))
    graph.output(lin)
    aten = fx.GraphModule(nn.Module(), graph)
    assert width_rule_for(relu, aten) is elementwise and width_rule_for(lin, aten) is layer


def test_module_rules_follow_subclasses_and_opaque_modules_have_none():
    class MyReLU(nn.ReLU):
        pass

    assert has_width_rule(MyReLU()) and has_width_rule(nn.Conv1d(2, 2, 1)) and has_width_rule(nn.Linear(2, 2))
    assert not has_width_rule(nn.MultiheadAttention(4, 2)) and not has_width_rule(nn.TransformerEncoderLayer(4, 2))
    graph = fx.Graph()
    node = graph.call_module("act", (graph.placeholder("x"),))
    graph.output(node)
    gm = fx.GraphModule(nn.ModuleDict({"act": MyReLU()}), graph)  # tracing would see through MyReLU
    assert width_rule_for(node, gm) is elementwise
    assert all(callable(rule) for rule in list(WIDTH_RULES.values()) + list(MODULE_WIDTH_RULES.values()))


def test_an_op_without_a_rule_fixes_every_width_it_touches():
    class Cumsum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.c(torch.cumsum(self.b(torch.relu(self.a(x))), 1))

    cw = widths(Cumsum(), torch.randn(2, 3))
    assert layer_widths(cw, "a") == (3, sws_width(8, 2))  # a's output feeds b only
    assert layer_widths(cw, "b") == (sws_width(8, 2), 8)  # b's output goes through cumsum: stays
    assert "unsupported op cumsum" in cw.layers["b"].reason
    assert layer_widths(cw, "c") == (8, 2) and not cw.layers["c"].widened


# --------------------------------------------------------------------------- elementwise, broadcast


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x):
        h = self.a(x)
        h = h + self.b(torch.relu(h))  # ties b's output to a's
        return self.head(h * self.scale * x[:, :1])  # [8] ties, [N, 1] broadcasts


def test_residual_add_ties_branches_and_broadcast_does_not():
    cw = widths(Residual(), torch.randn(5, 4))
    wide = sws_width(8, 2)
    assert layer_widths(cw, "a") == (4, wide) and layer_widths(cw, "b") == (wide, wide)
    assert layer_widths(cw, "head") == (wide, 3)
    assert cw.param_shape("scale") == (wide,)
    assert cw.shape_of("add") == (5, wide)
    assert cw.shape_of("getitem") == (5, 1)  # the broadcast operand keeps its size


def test_an_add_into_the_network_output_keeps_both_branches():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 6), nn.Linear(8, 6)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            return self.a(h) + self.b(h)

    cw = widths(TwoHeads(), torch.randn(2, 4))
    for name in ("a", "b"):
        assert layer_widths(cw, name) == (sws_width(8, 2), 6)
        assert "network output" in cw.layers[name].reason


# --------------------------------------------------------------------------- joins, reshapes, permutations


class Joins(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(3, 8), nn.Linear(3, 6), nn.Linear(14, 4)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x, img):
        y = self.mix(torch.cat([self.a(x), self.b(x)], dim=1))
        z = self.fc(torch.flatten(F.adaptive_avg_pool2d(self.conv(img), 4), 1))
        return y + z


def test_concatenation_adds_widths_and_flatten_multiplies_by_positions():
    cw = widths(Joins(), torch.randn(2, 3), torch.randn(2, 3, 8, 8))
    assert layer_widths(cw, "mix") == (sws_width(8, 2) + sws_width(6, 2), 4)  # 11 + 8, not sws(14)
    assert layer_widths(cw, "fc") == (sws_width(8, 2) * 16, 4)  # channels x spatial positions
    assert cw.shape_of("adaptive_avg_pool2d") == (2, sws_width(8, 2), 4, 4)


class Heads(nn.Module):
    """A projection viewed into heads with sizes read from the tensor (``x.size(-1) // heads``)."""

    def __init__(self, dim, heads=2):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.out = nn.Linear(5, dim), nn.Linear(5, dim), nn.Linear(dim, 3)

    def forward(self, x):
        b, t = x.shape[0], x.shape[1]
        q = self.q(x)
        q = q.view(b, t, self.heads, q.size(-1) // self.heads).transpose(1, 2)
        k = self.k(x).reshape(b, t, self.heads, -1).permute(0, 2, 3, 1)
        att = torch.softmax(q @ k, dim=-1)  # [b, heads, t, t]
        v = k.mT  # [b, heads, t, head size]: mT swaps the last two dims only
        return self.out((att @ v).transpose(1, 2).reshape(b, t, -1))


def test_heads_stay_and_the_head_size_follows_the_width():
    x = torch.randn(2, 7, 5)
    cw = widths(Heads(24), x)
    wide = sws_width(24, 2)  # 34 = 2 heads x 17
    assert layer_widths(cw, "q") == (5, wide) and layer_widths(cw, "k") == (5, wide)
    assert layer_widths(cw, "out") == (wide, 3)
    assert cw.shape_of("view") == (2, 7, 2, 17)
    assert cw.shape_of("permute") == (2, 2, 17, 7)


def test_a_width_that_does_not_split_into_the_heads_stays_with_the_reason():
    cw = widths(Heads(16), torch.randn(2, 7, 5))  # 16 * sqrt(2) -> 23: not 2 heads
    assert layer_widths(cw, "q") == (5, 16)
    assert "does not split into 2" in cw.layers["q"].reason
    assert widths(Heads(16), torch.randn(2, 7, 5), M=4).layers["q"].out_channels == 32  # 2 x 16 at M = 4


def test_indexing_a_channel_and_slicing_a_width_fix_it():
    class Index(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(3, 8), nn.Linear(3, 8), nn.Linear(5, 2)

        def forward(self, x):
            return self.c(self.a(x)[:, :5]) + self.a(x)[:, 0:1] * self.b(x)[:, 2].unsqueeze(1)

    cw = widths(Index(), torch.randn(2, 3))
    assert layer_widths(cw, "a") == (3, 8) and "slicing a width" in cw.layers["a"].reason
    assert layer_widths(cw, "b") == (3, 8) and "indexing a single channel" in cw.layers["b"].reason


# --------------------------------------------------------------------------- norms, embedding, convolutions


class Norms(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.gn = nn.GroupNorm(groups, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.fc(self.emb(ids))  # [b, t, 8]
        h = self.bn(h.transpose(1, 2)).transpose(1, 2)
        h = self.gn(self.ln(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def test_norm_parameters_and_running_stats_follow_the_width_vocabulary_stays():
    ids = torch.randint(0, 10, (2, 6))
    cw = widths(Norms(groups=2), ids, M=4)
    wide = sws_width(8, 4)
    assert layer_widths(cw, "fc") == (wide, wide)
    assert cw.param_shape("emb.weight") == (10, wide)  # vocabulary size stays
    for target in ("bn.weight", "bn.running_mean", "bn.running_var", "ln.weight", "ln.bias", "gn.weight"):
        assert cw.param_shape(target) == (wide,), target


def test_group_norm_needs_the_width_to_split_into_its_groups():
    ids = torch.randint(0, 10, (2, 6))
    cw = widths(Norms(groups=4), ids, M=2)  # 11 does not split into 4 groups
    assert layer_widths(cw, "fc") == (sws_width(8, 2), 8)  # the embedding width is another width
    assert "does not split into 4 (heads or groups) at gn" in cw.layers["fc"].reason
    assert layer_widths(widths(Norms(groups=4), ids, M=4), "fc") == (16, 16)


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.pw = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, img):
        h = self.pool(self.grouped(F.relu(self.dw(self.stem(img)))))  # [b, 8, 4, 4]
        h = self.pw(h.flatten(2))  # [b, 6, 16]
        return self.head(F.max_pool1d(h, 16).squeeze(2))


def test_depthwise_groups_follow_the_width_grouped_convs_keep_their_groups():
    cw = widths(Convs(), torch.randn(2, 3, 8, 8), M=4)
    wide = sws_width(8, 4)  # 16
    dw, grouped, pw = cw.layers["dw"], cw.layers["grouped"], cw.layers["pw"]
    assert (dw.in_channels, dw.out_channels, dw.groups, dw.fan_in) == (wide, wide, wide, 9)
    assert (grouped.in_channels, grouped.out_channels, grouped.groups, grouped.fan_in) == (wide, wide, 2, 8 * 9)
    assert (pw.in_channels, pw.out_channels, pw.kernel_size, pw.op) == (wide, sws_width(6, 4), (1,), "conv1d")
    assert cw.shape_of("pool") == (2, wide, 4, 4) and cw.shape_of("max_pool1d") == (2, sws_width(6, 4), 1)


def test_a_grouped_conv_whose_widened_width_does_not_split_stays():
    cw = widths(Convs(), torch.randn(2, 3, 8, 8), M=2)  # 8 -> 11, not 2 groups
    assert layer_widths(cw, "grouped") == (8, 8) and "does not split into 2" in cw.layers["grouped"].reason


def test_an_op_that_moves_channels_into_space_fixes_them():
    class Shuffle(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.out = nn.Conv2d(3, 8, 1), nn.Conv2d(2, 4, 1)

        def forward(self, img):
            return self.out(F.pixel_shuffle(self.up(img), 2))  # [b, 8, h, w] -> [b, 2, 2h, 2w]

    gm = fx.symbolic_trace(Shuffle())
    cw = analyze_channel_widths(gm, (torch.randn(1, 3, 4, 4),)).at(4)
    assert layer_widths(cw, "up") == (3, 8) and "pixel_shuffle changes the channel dim" in cw.layers["up"].reason
    assert cw.shape_of("pixel_shuffle") == (1, 2, 8, 8)


# --------------------------------------------------------------------------- every rule keeps sizes consistent


@pytest.mark.parametrize("name", sorted(zoo_models()))
def test_every_node_s_dims_have_the_node_s_sizes(name):
    """Whatever a rule ties, the dims it gives a node have that node's sizes before widening."""
    factory, make_x = zoo_models()[name]
    gm = fx.symbolic_trace(factory())
    x = make_x()
    propagate_shapes(gm, (x,))
    walk = WidthWalk(gm).run()
    checked = 0
    for node in gm.graph.nodes:
        dims, shape = walk.env.get(node.name), shape_tree(node)
        if isinstance(dims, list) and shape is not None and all(isinstance(s, int) for s in shape):
            assert tuple(int(walk.uf.dim_size(d)) for d in dims) == shape, node.name
            checked += 1
    assert checked > 5
