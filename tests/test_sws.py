"""SWS (issue 3): whole-graph sqrt(M) widening, the 1:M weight mask, export, accounting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

import sas_compile
from sas_compile.accounting import sws_width
from sas_compile.passes.tie_channel_widths import sws_layer_widths
from sas_compile.sws import OneOfMMask, export_sws_weights, measure_sws_model, one_of_m_mask

from zoo import models as zoo_models

torch.manual_seed(0)


# --------------------------------------------------------------------------- models


class ConcatNet(nn.Module):
    """Two branches concatenated along channels: the consumer's width is the sum of both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(14)
        self.mix = nn.Conv2d(14, 12, 1)
        self.fc = nn.Linear(12 * 2 * 2, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        y = F.adaptive_avg_pool2d(F.relu(self.mix(F.relu(self.bn(y)))), 2)
        return self.fc(torch.flatten(y, 1))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, dim=12, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean((2, 3))))


class Attention(nn.Module):
    """Hand-written attention: q/k/v/out linears and an int-sized reshape into heads."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        att = torch.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1)
        return self.out((att @ v).transpose(1, 2).reshape(b, t, -1))


class Encoder(nn.Module):
    def __init__(self, d_in=10, dim=24, heads=2, classes=3):
        super().__init__()
        self.embed = nn.Linear(d_in, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.attn(self.norm1(x))
        x = x + self.fc2(F.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class TorchEncoder(nn.Module):
    def __init__(self, dim=16, classes=3):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.layer(self.embed(x)).mean(1))


def _forward_backward(model, x):
    model.train()
    out = model(*x)
    out = out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    return out


def _layers_by_target(s):
    return {s.sws_layers[n]: w for n, w in s.sws_widths.layers.items()}


# --------------------------------------------------------------------------- widths


def test_paper_example_layer_widths_and_mults():
    model = nn.Sequential(nn.Linear(10, 288), nn.ReLU(), nn.Linear(288, 64), nn.ReLU(), nn.Linear(64, 10))
    x = torch.randn(3, 10)
    s = sas_compile.swsify(model, M=8, example_inputs=x)
    w = _layers_by_target(s)["2.weight"]
    assert (w.in_features, w.out_features) == (815, 181)
    assert w.nonzeros == 18440
    costs = {c["name"]: c for c in measure_sws_model(s).values()}
    assert costs["2"]["in_features"] == 815 and costs["2"]["out_features"] == 181
    assert costs["2"]["nonzeros"] == 18440 == math.ceil(815 * 181 / 8)
    assert s.get_submodule("2").weight.shape == (181, 815)
    # network input and output widths stay
    assert s.get_submodule("0").in_features == 10 and s.get_submodule("4").out_features == 10


def test_resnet18_residual_widths_and_shapes():
    from sas_compile.models import resnet18

    model = resnet18(num_classes=10, width=16)
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(model, M=2, example_inputs=x)
    assert s(x).shape == (2, 10)
    widths = _layers_by_target(s)
    assert widths["conv1.weight"].in_channels == 3 and widths["conv1.weight"].out_channels == sws_width(16, 2)
    assert widths["fc.weight"].out_channels == 10 and widths["fc.weight"].in_channels == sws_width(128, 2)
    # residual adds tie conv2 of every block to the block's input width (and the downsample)
    for i, base in enumerate((16, 32, 64, 128), start=1):
        for blk in (0, 1):
            for conv in ("conv1", "conv2"):
                w = widths[f"layer{i}.{blk}.{conv}.weight"]
                assert w.out_channels == sws_width(base, 2) and w.widened
        bn = s.get_submodule(f"layer{i}.1.bn2")
        assert bn.num_features == sws_width(base, 2)
    _forward_backward(s, (x,))
    # the original is untouched
    assert model.conv1.out_channels == 16 and not parametrize.is_parametrized(model.conv1)


def test_concat_widths_add_up_per_segment():
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(ConcatNet(), M=2, example_inputs=x)
    w = _layers_by_target(s)
    assert w["mix.weight"].in_channels == sws_width(8, 2) + sws_width(6, 2)  # 11 + 8, not sws(14)
    assert s.bn.num_features == w["mix.weight"].in_channels
    assert w["fc.weight"].in_channels == sws_width(12, 2) * 4  # channels x spatial positions
    assert s(x).shape == (2, 5)
    _forward_backward(s, (x,))


def test_convnext_block_depthwise_layernorm_layer_scale():
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(ConvNeXtTiny(dim=12), M=4, example_inputs=x)
    wide = sws_width(12, 4)
    dw = s.get_submodule("blocks.0.dwconv")
    assert dw.groups == dw.in_channels == dw.out_channels == wide  # groups follow the width
    assert s.get_submodule("blocks.0.norm").normalized_shape == (wide,)
    assert s.get_submodule("blocks.1.pw1").out_features == sws_width(48, 4)
    gamma = s.get_submodule("blocks.0").gamma
    assert gamma.shape == (wide,) and torch.all(gamma == 0.5)  # constant fills stay constant
    assert s(x).shape == (2, 4)
    _forward_backward(s, (x,))


def test_transformer_block_heads_stay_head_size_grows():
    x = torch.randn(2, 5, 10)
    s = sas_compile.swsify(Encoder(dim=24, heads=2), M=2, example_inputs=x)
    w = _layers_by_target(s)
    wide = sws_width(24, 2)  # 34 = 2 heads x 17
    for name in ("q", "k", "v"):
        assert w[f"attn.{name}.weight"].out_channels == wide
    assert w["attn.out.weight"].in_channels == wide
    assert w["fc1.weight"].out_channels == sws_width(48, 2)
    assert s(x).shape == (2, 3)
    _forward_backward(s, (x,))


def test_transformer_block_left_unwidened_when_heads_do_not_divide():
    x = torch.randn(2, 5, 10)
    # 16 * sqrt(2) = 22.6 -> 23 does not split into 2 heads: the attention widths stay
    s = sas_compile.swsify(Encoder(dim=16, heads=2), M=2, example_inputs=x)
    w = _layers_by_target(s)
    assert w["attn.q.weight"].out_channels == 16
    assert "does not split" in w["attn.q.weight"].reason
    assert w["fc1.weight"].out_channels == sws_width(32, 2)  # the MLP still widens
    _forward_backward(s, (x,))


@pytest.mark.parametrize("M", [2, 4])
def test_torch_transformer_encoder_layer(M):
    x = torch.randn(2, 5, 6)
    s = sas_compile.swsify(TorchEncoder(dim=16), M=M, example_inputs=x)
    assert s(x).shape == (2, 3)
    _forward_backward(s, (x,))
    for w in s.sws_widths.layers.values():
        stays = w.in_channels == w.base_in_channels or w.out_channels == w.base_out_channels
        assert not stays or w.reason  # every width that stays says why
    widths = {(w.base_in_channels, w.base_out_channels): w for w in s.sws_widths.layers.values()}
    in_proj = widths[(16, 48)]
    if M == 4:  # 32 = 2 heads x 16: q/k/v and out projection widen
        assert (in_proj.in_channels, in_proj.out_channels) == (32, 96)
        assert widths[(16, 16)].in_channels == 32
    else:  # 68 q/k/v outputs do not split into 3 x 2 heads: those widths stay, with the reason
        assert in_proj.out_channels == 48 and "does not split" in in_proj.reason
    assert widths[(16, 32)].out_channels == sws_width(32, M)  # feed-forward widens either way


@pytest.mark.parametrize("name", sorted(set(zoo_models()) - {"resnet18"}))  # resnet18: its own test
def test_sas_suite_models_forward_backward(name):
    factory, make_x = zoo_models()[name]
    x = make_x()
    s = sas_compile.swsify(factory(), M=2, example_inputs=x)
    _forward_backward(s, (x,))
    assert any(w.widened for w in s.sws_widths.layers.values())


def test_transformers_models_forward_backward():
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=50, hidden_size=48, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=3, max_position_embeddings=16, return_dict=False))
    ids = torch.randint(0, 50, (2, 8))
    s = sas_compile.swsify(bert, M=2, example_inputs=(ids,))
    out = _forward_backward(s, (ids,))
    assert out.shape == (2, 3)
    widths = list(s.sws_widths.layers.values())
    assert sum(w.widened for w in widths) == len(widths)  # 48 -> 68 = 2 heads x 34
    assert widths[0].in_channels == sws_width(48, 2)

    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=4, return_dict=False))
    x = torch.randn(2, 3, 32, 32)
    s = sas_compile.swsify(resnet, M=4, example_inputs=x)
    assert _forward_backward(s, (x,)).shape == (2, 4)
    s.eval()
    with torch.no_grad():
        whole, first = s(x)[0][:1], s(x[:1])[0]
    torch.testing.assert_close(whole, first)  # eval: batch norms use running stats, not the batch's
    s.train()
    with torch.no_grad():
        assert not torch.allclose(s(x)[0][:1], s(x[:1])[0])


def test_widths_without_example_inputs_match():
    from sas_compile.models import resnet18

    gm = fx.symbolic_trace(resnet18(num_classes=10, width=8))
    guessed = sws_layer_widths(gm, 2)
    gm = fx.symbolic_trace(resnet18(num_classes=10, width=8))
    exact = sws_layer_widths(gm, 2, (torch.randn(1, 3, 32, 32),))
    assert {k: (v.in_channels, v.out_channels) for k, v in guessed.items()} == \
        {k: (v.in_channels, v.out_channels) for k, v in exact.items()}


def test_filter_fn_keeps_a_layer_dense_and_unwidened():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    s = sas_compile.swsify(model, M=2, example_inputs=torch.randn(2, 6), filter_fn=lambda m, fqn: fqn != "2")
    assert s.get_submodule("2").in_features == 16 and s.get_submodule("2").out_features == 16
    assert not parametrize.is_parametrized(s.get_submodule("2"))
    assert "filter_fn" in _layers_by_target(s)["2.weight"].reason


def test_bad_M_is_rejected():
    with pytest.raises(ValueError, match="allowed"):
        sas_compile.swsify(nn.Linear(4, 4), M=3)


# --------------------------------------------------------------------------- the 1:M mask


def _reference_mask(weight: torch.Tensor, M: int) -> torch.Tensor:
    flat = weight.detach().double().reshape(-1).tolist()
    keep = [0.0] * len(flat)
    for start in range(0, len(flat), M):
        chunk = flat[start:start + M]
        best = max(range(len(chunk)), key=lambda i: (abs(chunk[i]), -i))
        keep[start + best] = 1.0
    return torch.tensor(keep).view(weight.shape).bool()


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("shape", [(5, 7), (6, 3, 3, 3), (3, 2, 1, 5), (4, 16)])
def test_one_of_m_mask_matches_reference(M, shape):
    weight = torch.randn(shape)
    mask = one_of_m_mask(weight, M)
    assert torch.equal(mask, _reference_mask(weight, M))
    assert int(mask.sum()) == math.ceil(weight.numel() / M)  # last partial chunk keeps one


@pytest.mark.parametrize("M", [2, 4])
def test_every_masked_weight_is_exactly_one_of_m(M):
    x = torch.randn(2, 3, 8, 8)
    s = sas_compile.swsify(ConcatNet(), M=M, example_inputs=x)
    n = 0
    for module in s.modules():
        if not parametrize.is_parametrized(module, "weight"):
            continue
        n += 1
        dense = module.parametrizations.weight.original
        masked = module.weight
        flat = masked.detach().reshape(-1)
        pad = (-flat.numel()) % M
        chunks = F.pad(flat, (0, pad)).view(-1, M)
        assert torch.all((chunks != 0).sum(1) == 1)  # random weights: the kept one is nonzero
        assert torch.equal(masked.detach(), dense.detach() * _reference_mask(dense, M))
    assert n == 4  # a, b, mix, fc; stem reads the raw input: dense by default (dense_input_layers=True)
    assert not parametrize.is_parametrized(s.get_submodule("stem"), "weight")


def test_mask_follows_weight_updates_and_eval_cache():
    layer = nn.Linear(8, 4)
    parametrize.register_parametrization(layer, "weight", OneOfMMask(2), unsafe=True)
    original = layer.parametrizations.weight.original
    before = one_of_m_mask(original, 2)
    with torch.no_grad():
        original.copy_(torch.where(before, original * 0.01, original * 10 + 1e-3))
    after = (layer.weight != 0)
    assert torch.equal(after, ~before)  # recomputed in training
    layer.eval()
    with torch.no_grad():
        w1 = layer.weight
        assert layer.weight is w1  # cached, no recompute per call
        original.mul_(-1).add_(torch.randn_like(original))
        w2 = layer.weight
    assert w2 is not w1 and torch.equal(w2 != 0, _reference_mask(original, 2))
    layer.train()
    assert layer.parametrizations.weight[0]._cache is None


def test_sws_mask_of_finds_the_mask_and_nothing_else():
    from sas_compile.runtime.sws_mask import sws_mask_of

    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(8, 4)
    assert sws_mask_of(layer) is None
    mask = OneOfMMask(4)
    parametrize.register_parametrization(layer, "weight", mask, unsafe=True)
    parametrize.register_parametrization(layer, "bias", Scale())
    assert sws_mask_of(layer) is mask and sws_mask_of(layer, "weight") is mask
    assert sws_mask_of(layer, "bias") is None  # parametrized, but not by the SWS mask


def test_straight_through_gradient_matches_reference():
    layer = nn.Linear(6, 3, bias=False)
    parametrize.register_parametrization(layer, "weight", OneOfMMask(2), unsafe=True)
    x = torch.randn(5, 6)
    g = torch.randn(5, 3)
    (layer(x) * g).sum().backward()
    original = layer.parametrizations.weight.original
    # d/dW of sum(g * x Wm^T) is g^T x for every weight (dense: straight-through)
    assert torch.allclose(original.grad.double(), g.double().T @ x.double(), atol=1e-5)
    masked = original.detach().double() * _reference_mask(original, 2)
    assert torch.allclose(layer(x).double(), x.double() @ masked.T, atol=1e-5)


def test_freeze_mask_keeps_the_first_mask():
    layer = nn.Linear(8, 4)
    parametrize.register_parametrization(layer, "weight", OneOfMMask(4, freeze_mask=True), unsafe=True)
    first = layer.weight != 0
    original = layer.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(torch.randn_like(original))
    assert torch.equal(layer.weight != 0, first)
    layer.weight.sum().backward()
    assert torch.equal(original.grad != 0, first)  # only kept weights train


@pytest.mark.slow
def test_training_lowers_the_loss():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    s = sas_compile.swsify(model, M=4, example_inputs=x)
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    losses = []
    masks = []
    for _ in range(30):
        loss = F.cross_entropy(s(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        masks.append((s.get_submodule("2").weight != 0).clone())
    assert losses[-1] < 0.7 * losses[0]
    assert not torch.equal(masks[0], masks[-1])  # masks follow the weights
    assert all(int(m.sum()) == m.numel() // 4 for m in masks) and masks[0].shape == (64, 64)
    sd = s.state_dict()
    assert (sd["2.parametrizations.weight.original"] != 0).float().mean() > 0.9  # plain dense weights


# --------------------------------------------------------------------------- export


@pytest.mark.parametrize("M", [2, 4])
def test_export_round_trip_is_exact(M):
    from sas_compile.runtime.packing import unpack_sws_weight

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 4))
    s = sas_compile.swsify(model, M=M, example_inputs=torch.randn(2, 8))
    packed = export_sws_weights(s, strict=False)
    assert packed
    for node, p in packed.items():
        weight = s.get_submodule(s.sws_layers[node].rsplit(".", 1)[0]).weight.detach()
        assert weight.shape[1] % M == 0
        dense = unpack_sws_weight(p)
        assert torch.equal(dense, weight)
        if M == 4:  # 1:4 stored as 2:4: one kept value and one explicit zero per group of 4
            assert int((p.values != 0).sum()) == int((weight != 0).sum())


def test_export_names_a_layer_whose_chunks_straddle_rows():
    model = nn.Sequential(nn.Linear(8, 15), nn.ReLU(), nn.Linear(15, 4))  # in = 21 at M = 2
    s = sas_compile.swsify(model, M=2, example_inputs=torch.randn(2, 8))
    with pytest.raises(ValueError, match="straddle"):
        export_sws_weights(s)


def test_export_matches_cutlass_oracle():
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

    from sas_compile.runtime.packing import pack_sws_weight

    weight = torch.randn(64, 128).half()
    weight = weight * one_of_m_mask(weight, 2)
    values, _ = sparse_semi_structured_from_dense_cutlass(weight)
    assert torch.equal(pack_sws_weight(weight, 2).values, values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_export_matches_to_sparse_semi_structured_on_cuda():
    from sas_compile.runtime.packing import unpack_sws_weight

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    s = sas_compile.swsify(model, M=2, example_inputs=torch.randn(2, 64))
    for node, p in export_sws_weights(s).items():
        dense = unpack_sws_weight(p).half().cuda()
        sparse = torch.sparse.to_sparse_semi_structured(dense)
        assert torch.equal(sparse.to_dense(), dense)
        x = torch.randn(dense.shape[1], 32, device="cuda", dtype=torch.half)
        torch.testing.assert_close(sparse @ x, dense @ x, rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------------------- accounting agreement


@pytest.mark.parametrize("name", sorted(zoo_models()) + ["concat", "convnext", "attention", "paper"])
def test_sws_costs_agree_with_report(name):
    extra = {
        "concat": (ConcatNet, lambda: torch.randn(2, 3, 8, 8)),
        "convnext": (ConvNeXtTiny, lambda: torch.randn(2, 3, 8, 8)),
        "attention": (lambda: Encoder(dim=24, heads=2), lambda: torch.randn(2, 5, 10)),
        "paper": (lambda: nn.Sequential(nn.Linear(10, 288), nn.ReLU(), nn.Linear(288, 64), nn.ReLU(),
                                        nn.Linear(64, 10)), lambda: torch.randn(3, 10)),
    }
    factory, make_x = {**zoo_models(), **extra}[name]
    model, x = factory(), make_x()
    M = 8 if name == "paper" else 2
    rep = sas_compile.report(model, (x,), M=(M,))
    built = list(measure_sws_model(sas_compile.swsify(model, M=M, example_inputs=x), (x,)).values())
    assert len(rep.layers) == len(built)
    seen = set()
    for row, got in zip(rep.layers, built):  # both in graph order; a shared layer appears per call
        want = row["sws"][M]
        assert row["name"].split("#")[0] == got["name"]
        assert (got["in_channels"], got["out_channels"]) == (want["in_features"], want["out_features"])
        assert got["mults"] == want["mults"], row["name"]
        # the report counts a shared weight's parameters once, at its first call site
        stored = 0 if got["name"] in seen else got["nonzeros"] + (got["out_features"] if _has_bias(model, row["name"]) else 0)
        seen.add(got["name"])
        assert stored == want["nonzero_params"]


def _has_bias(model, name):
    if name == "kernel":  # FunctionalConv: F.conv2d(x, kernel, kernel_bias)
        return True
    try:
        mod = model.get_submodule(name.split("#")[0])
    except AttributeError:  # a functional layer's weight is a Parameter of the model
        return False
    return isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None


def test_widths_agree_between_symbolic_and_exported_graphs():
    x = torch.randn(2, 3, 8, 8)
    model = ConvNeXtTiny(dim=12)
    traced = sws_layer_widths(fx.symbolic_trace(model), 4, (x,))
    exported = sws_layer_widths(torch.export.export(model, (x,), strict=False).module(), 4)
    pick = lambda ws: [(w.in_channels, w.out_channels, w.in_features, w.groups, w.widened) for w in ws.values()]
    assert pick(traced) == pick(exported)


def test_swsify_lists_and_keeps_layers_the_width_analysis_cannot_follow(caplog):
    """Without example inputs a Flatten hides the shapes from the width analysis: the layers it
    cannot follow stay as they are, the plan lists each with the reason (it raised KeyError) and
    a warning says that nothing carries a mask."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 2, 4)
    with caplog.at_level("WARNING", logger="sas_compile"):
        built = sas_compile.swsify(model, M=4)
    assert "none of the 3 conv/linear layers carries a 1:M mask" in caplog.text and "unknown shapes" in caplog.text
    plan = built.sparsify_plan
    assert [l.name for l in plan.layers] == ["1", "3", "5"] and not plan.eligible()
    assert all("width analysis cannot follow" in l.reason and "unknown shapes" in l.reason for l in plan.layers)
    assert [(l.in_channels, l.out_channels) for l in plan.layers] == [(8, 16), (16, 16), (16, 4)]
    with torch.no_grad():
        assert torch.equal(built(x), model(x))  # nothing widened, nothing masked
    widened = sas_compile.swsify(model, M=4, example_inputs=(x,)).sparsify_plan  # with shapes it follows them
    assert [l.name for l in widened.eligible()] == ["3", "5"]
    from sas_compile.models import mlp

    assert len(sas_compile.swsify(mlp(), M=4).sparsify_plan.layers) == 3  # the built-in MLP starts with a Flatten


def test_sws_and_swat_plans_print_as_what_they_are():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(2, 8)
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,)).sparsify_plan
    text = str(sws)
    assert text.startswith("SWS plan (M=4, captured with symbolic_trace): 2 of 3 conv/linear layers carry a 1:M "
                           "weight mask")
    assert "ReLU folded" not in text and " SWS " in text.splitlines()[1]
    as_dict = sws.to_dict()
    assert as_dict["technique"] == "SWS" and "SWS plan" in sws.to_dot()
    middle = next(l for l in as_dict["layers"] if l["name"] == "2")  # 32 -> 32, 1:4 mask, bias
    assert middle["mults_before"] == middle["mults_after"] == 32 * 32 // 4
    assert middle["params_before"] == middle["params_after"] == 32 * 32 + 32
    swat = str(sas_compile.swatify(model, sparsity=0.5).sparsify_plan)
    assert swat.startswith("SWAT plan (captured with modules): 3 of 3 conv/linear layers are SWAT layers")
    assert str(sas_compile.sasify(model, M=4).sas_plan).startswith("SAS plan (M=4, captured with symbolic_trace)")


def test_swsify_plan_says_how_the_model_was_captured():
    x = torch.randn(2, 3, 8)
    opaque = nn.Sequential(nn.Linear(8, 16), nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                           nn.Linear(16, 4))
    assert sas_compile.swsify(opaque, M=4, example_inputs=x).sparsify_plan.capture == "export"
    plain = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert sas_compile.swsify(plain, M=4).sparsify_plan.capture == "symbolic_trace"
