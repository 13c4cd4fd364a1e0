"""The per-op formulas of sas_compile.accounting against hand counts, torch and sympy."""
import math

import pytest
import sympy
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sas_compile import accounting
from sas_compile.accounting import (
    conv2d_costs,
    conv2d_output_hw,
    conv_output_size,
    layer_costs,
    linear_costs,
    round_half_up,
    sws_costs,
    sws_width,
)
from sas_compile.plan import LayerPlan


def _torch_mults(fn, *args):
    """Multiplications torch's own flop counter sees (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


# --- the paper's worked example (BRIEF section 2) ------------------------------------------
def test_paper_example_linear_costs():
    row = linear_costs(288, 64, 8)
    assert row["base"] == {"mults": 18432, "params": 18432}
    assert row["sas"][8] == {"mults": 18432, "params": 147456}
    sws = row["sws"][8]
    assert (sws["in_features"], sws["out_features"]) == (815, 181)
    assert sws["mults"] == 18440  # 815*181/8 = 18439.375 -> last partial chunk counts
    assert sws["nonzero_params"] == 18440
    assert sws["params"] == 815 * 181


def test_linear_costs_row_schema_and_bias():
    row = linear_costs(288, 64, (2, 4, 8), bias=True)
    assert set(row) == {"name", "op", "eligible", "reason", "base", "sas", "sws", "symbolic"}
    assert list(row["sas"]) == [2, 4, 8] and all(isinstance(m, int) for m in row["sws"])
    assert row["base"]["params"] == 288 * 64 + 64
    for m in (2, 4, 8):
        assert row["sas"][m]["params"] == m * 288 * 64 + 64
        s = row["sws"][m]
        assert s["params"] == s["in_features"] * s["out_features"] + s["out_features"]
        assert s["nonzero_params"] == math.ceil(s["in_features"] * s["out_features"] / m) + s["out_features"]


# --- rounding and the SWS width rule -------------------------------------------------------
def test_round_half_up_is_not_bankers_rounding():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 3.49, -0.5)] == [1, 2, 3, 3, 0]
    assert round(2.5) == 2  # why the helper exists


@pytest.mark.parametrize("C,M", [(64, 2), (64, 8), (3, 2), (288, 8), (37, 4), (1000, 16)])
def test_sws_width_is_nearest_to_sqrt_M_times_C(C, M):
    w = sws_width(C, M)
    assert abs(w - math.sqrt(M) * C) <= 0.5
    assert abs(w - math.sqrt(M) * C) <= min(abs(w + 1 - math.sqrt(M) * C), abs(w - 1 - math.sqrt(M) * C))


@pytest.mark.parametrize("fin,fout,M", [(815, 181, 8), (7, 3, 4), (5, 5, 2), (9, 11, 16), (1, 1, 8)])
def test_sws_mults_equal_nonzeros_of_a_built_1_to_M_weight(fin, fout, M):
    # build the weight the SWS baseline stores: one kept value per chunk of M, last chunk partial
    torch.manual_seed(0)
    dense = torch.randn(fout * fin, dtype=torch.float64)
    mask = torch.zeros_like(dense, dtype=torch.bool)
    for start in range(0, dense.numel(), M):
        chunk = dense[start:start + M].abs()
        mask[start + int(chunk.argmax())] = True
    nnz = int(mask.sum())
    costs = sws_costs(fin, fout, False, M)
    assert costs["mults"] == nnz == costs["nonzero_params"]
    assert costs["params"] == fin * fout
    assert sws_costs(fin, fout, False, M, sparse=False)["mults"] == fin * fout


# --- conv output sizes ---------------------------------------------------------------------
CONV_CASES = [
    # (Cin, Cout, kernel, stride, padding, dilation, groups, H, W)
    (5, 7, 3, 2, 0, 1, 1, 11, 13),  # stride 2, padding 0
    (4, 6, 3, 1, 2, 2, 1, 10, 9),  # dilation 2
    (8, 12, 3, 1, 1, 1, 4, 9, 9),  # groups
    (6, 6, 3, 1, 1, 1, 6, 7, 8),  # depthwise
    (3, 5, (3, 5), (1, 2), (1, 2), 1, 1, 9, 17),  # non-square kernel, stride, padding
    (3, 4, (2, 3), (3, 1), 0, (2, 1), 1, 13, 6),  # everything non-square
    (3, 4, 3, 1, "same", 1, 1, 7, 10),
    (3, 4, (3, 2), 1, "valid", 1, 1, 7, 10),
    (3, 4, 3, 1, "same", 2, 1, 8, 5),
]


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_output_size_matches_torch(case):
    cin, cout, k, s, p, d, g, H, W = case
    x = torch.randn(2, cin, H, W)
    w = torch.randn(cout, cin // g, *((k, k) if isinstance(k, int) else k))
    y = F.conv2d(x, w, None, s, p, d, g)
    assert conv2d_output_hw(H, W, k, s, p, d) == tuple(y.shape[2:])


def test_conv_output_size_hand_counts():
    assert conv_output_size(11, 3, 2, 0) == 5  # (11 - 3) // 2 + 1
    assert conv_output_size(10, 3, 1, 2, 2) == 10  # 10 + 4 - 4 - 1 + 1
    assert conv_output_size(13, 2, 3, 0, 2) == 4  # (13 - 2 - 1) // 3 + 1
    assert conv_output_size(7, 5, 1, "same") == 7
    with pytest.raises(ValueError, match="too small"):
        conv_output_size(2, 5, 1, 0)
    with pytest.raises(ValueError, match="stride=1"):
        conv_output_size(8, 3, 2, "same")


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_costs_match_flop_counter_and_hand_formula(case):
    cin, cout, k, s, p, d, g, H, W = case
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(3, cin, H, W)
    w = torch.randn(cout, cin // g, kh, kw)
    b = torch.randn(cout)
    y = F.conv2d(x, w, b, s, p, d, g)
    row = conv2d_costs(cin, cout, k, (2, 4), stride=s, padding=p, dilation=d, groups=g, bias=True,
                       input_hw=(H, W), batch=3)
    # hand formula: batch * Hout * Wout * Cout * Cin/groups * kh * kw
    hand = 3 * y.shape[2] * y.shape[3] * cout * (cin // g) * kh * kw
    assert row["base"]["mults"] == hand == _torch_mults(F.conv2d, x, w, b, s, p, d, g)
    assert row["base"]["params"] == w.numel() + cout
    for m in (2, 4):
        assert row["sas"][m]["mults"] == hand
        assert row["sas"][m]["params"] == m * w.numel() + cout
    per_pixel = conv2d_costs(cin, cout, k, 2, stride=s, padding=p, dilation=d, groups=g)
    assert per_pixel["base"]["mults"] == cout * (cin // g) * kh * kw


def test_conv2d_sws_widens_channels_not_fan_in():
    row = conv2d_costs(32, 64, 3, 8)
    s = row["sws"][8]
    assert (s["in_features"], s["out_features"]) == (91, 181)  # round(sqrt(8)*32), round(sqrt(8)*64)
    assert s["mults"] == math.ceil(91 * 9 * 181 / 8)
    fixed_in = conv2d_costs(3, 64, 3, 2, widen_in=False)["sws"][2]
    assert (fixed_in["in_features"], fixed_in["out_features"]) == (3, 91)
    depthwise = conv2d_costs(16, 16, 3, 4, groups=16)["sws"][4]
    assert depthwise["in_features"] == depthwise["out_features"] == 32
    assert depthwise["mults"] == math.ceil(1 * 9 * 32 / 4)


# --- linear with leading dims ------------------------------------------------------------
@pytest.mark.parametrize("shape", [(5,), (4, 7), (2, 3, 7), (2, 3, 4, 7)])
def test_linear_positions_any_leading_dims(shape):
    x = torch.randn(*shape[:-1], 7) if len(shape) > 1 else torch.randn(5)
    fin = x.shape[-1]
    w, b = torch.randn(6, fin), torch.randn(6)
    positions = accounting.linear_positions(x.shape)
    row = linear_costs(fin, 6, 2, bias=True, positions=positions)
    assert row["base"]["mults"] == math.prod(x.shape[:-1]) * fin * 6 == _torch_mults(F.linear, x, w, b)


def test_output_positions_per_op():
    assert accounting.output_positions("linear", (2, 3, 10)) == 6
    assert accounting.output_positions("conv2d", (2, 8, 5, 7), spatial_dims=2) == 70
    assert accounting.output_positions("conv2d", (8, 5, 7), spatial_dims=2) == 35  # unbatched
    assert accounting.output_positions("conv1d", (2, 8, 9), spatial_dims=1) == 18
    assert accounting.output_positions("conv_transpose2d", (2, 4, 9, 9), (2, 8, 4, 4), 2) == 32
    assert accounting.output_positions("linear", None) is None


# --- symbolic formulas ---------------------------------------------------------------------
def test_symbolic_conv_costs_agree_with_numbers_at_two_sizes():
    B, H, W = sympy.symbols("batch height width", integer=True, positive=True)
    for k, s, p, d in [(3, 2, 0, 1), (3, 1, 2, 2), ((3, 5), (1, 2), (1, 2), 1), (3, 1, "same", 1)]:
        formula = conv2d_costs(4, 6, k, 2, stride=s, padding=p, dilation=d, input_hw=(H, W), batch=B)
        expr = sympy.sympify(formula["symbolic"]["base_mults"], locals={"batch": B, "height": H, "width": W})
        for b, h, w in [(2, 17, 23), (1, 32, 11)]:
            numeric = conv2d_costs(4, 6, k, 2, stride=s, padding=p, dilation=d, input_hw=(h, w), batch=b)
            assert int(expr.subs({B: b, H: h, W: w})) == numeric["base"]["mults"]


def test_symbolic_conv_output_size_is_the_torch_formula():
    H = sympy.Symbol("height", integer=True, positive=True)
    expr = conv_output_size(H, 3, 2, 1, 2)
    for h in range(6, 40, 3):
        y = F.conv2d(torch.randn(1, 1, h, 4), torch.randn(1, 1, 3, 1), stride=(2, 1), padding=(1, 0), dilation=(2, 1))
        assert int(expr.subs(H, h)) == y.shape[2]


# --- costs of a plan's layer -----------------------------------------------------------------
def _conv_layer(**kw):
    defaults = dict(name="block.conv", node="block_conv", op="conv2d", eligible=True, reason=None, in_channels=8,
                    out_channels=12, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 1), groups=4,
                    has_bias=True, input_shape=(2, 8, 9, 5), output_shape=(2, 12, 5, 5))
    defaults.update(kw)
    return LayerPlan(**defaults)


def test_layer_costs_from_plan_layer():
    layer = _conv_layer()
    positions = accounting.output_positions(layer.op, layer.output_shape, layer.input_shape, 2)
    row = layer_costs(layer, (2, 8), positions=positions)
    weight = 12 * 2 * 3 * 1
    assert row["base"] == {"mults": 2 * 5 * 5 * weight, "params": weight + 12}
    assert row["sas"][8] == {"mults": 2 * 5 * 5 * weight, "params": 8 * weight + 12}
    assert row["name"] == "block.conv" and row["eligible"]


def test_layer_costs_dense_layer_counts_as_base_in_sas_column():
    layer = _conv_layer(eligible=False, reason="excluded by filter_fn")
    row = layer_costs(layer, (2, 4))
    assert row["sas"][4] == row["base"] and row["reason"] == "excluded by filter_fn"
    row = layer_costs(_conv_layer(), (2, 4), eligible_at={2: True, 4: False})
    assert row["sas"][4] == row["base"] and row["sas"][2]["params"] == 2 * 72 + 12


def test_layer_costs_already_sas_layer_reports_its_wide_weight():
    layer = _conv_layer(eligible=False, reason="already a SAS layer (M=4)", sas_M=4)
    row = layer_costs(layer, (2, 8))
    assert row["sas"][2]["params"] == row["sas"][8]["params"] == 4 * 72 + 12


def test_layer_costs_uses_whole_graph_sws_widths():
    class W:  # the fields of SWSLayerWidths the accounting reads
        in_channels, out_channels, in_features, out_features, groups, widened = 11, 17, 33, 17, 1, True

    row = layer_costs(_conv_layer(groups=1), (2,), sws_widths={2: W})
    assert row["sws"][2]["mults"] == math.ceil(33 * 17 / 2)
    assert (row["sws"][2]["in_features"], row["sws"][2]["out_features"]) == (11, 17)
    W.widened = False
    assert layer_costs(_conv_layer(groups=1), (2,), sws_widths={2: W})["sws"][2]["mults"] == 33 * 17


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="M=3"):
        linear_costs(4, 4, 3)
    with pytest.raises(ValueError, match="in_features"):
        linear_costs(0, 4, 2)
    with pytest.raises(ValueError, match="groups=3"):
        conv2d_costs(4, 6, 3, 2, groups=3)
    with pytest.raises(ValueError, match="M is empty"):
        linear_costs(4, 4, ())
