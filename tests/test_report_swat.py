"""sas_compile.report(..., swat=...): SWAT training mults per layer, totals, dense reference, CLI."""
import csv
import io
import json

import pytest
import torch
from torch import nn

from sas_compile import models
from sas_compile.cli import main
from sas_compile import report
from sas_compile.swat import swat_costs, swat_layers, swatify

KEYS = ("forward_mults", "backward_input_mults", "backward_weight_mults")


class Small(nn.Module):
    """A raw-input conv, a padded conv, and two linears applied per spatial position."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc0 = nn.Linear(6, 11)
        self.fc = nn.Linear(11, 7)

    def forward(self, x):
        y = torch.relu(self.conv1(torch.relu(self.conv0(x))))
        return self.fc(torch.relu(self.fc0(y.flatten(2).transpose(1, 2))))  # [batch, positions, channels]


def small_with_shape():
    return Small(), (2, 3, 5, 7)


def output_positions(model, x):
    """Output positions of every conv/linear module, measured from the real outputs."""
    out = {}
    hooks = [mod.register_forward_hook(
        lambda m, i, o, name=name: out.__setitem__(name, o.numel() // m.weight.shape[0]))
        for name, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = Small().eval()
    x = torch.randn(2, 3, 5, 7)
    return model, x, report(model, x, M=(2,), swat=(0.8, 0.9))


def test_per_layer_costs_are_swat_costs_and_input_layer_is_dense(small):
    model, x, rep = small
    positions = output_positions(model, x)
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert list(rows) == ["conv0", "conv1", "fc0", "fc"]
    for name, row in rows.items():
        mod = model.get_submodule(name)
        assert list(row["swat"]) == [0.8, 0.9]
        for s in (0.8, 0.9):
            d = 1.0 if name == "conv0" else 1.0 - s  # uniform: the raw-input layer stays dense
            assert row["swat"][s] == swat_costs(mod, d, d, output_positions=positions[name]), (name, s)
            assert all(type(v) is int for v in row["swat"][s].values())
        assert row["swat_dense"] == swat_costs(mod, 1.0, 1.0, output_positions=positions[name])
    assert rows["conv0"]["swat"][0.8] == rows["conv0"]["swat"][0.9] == rows["conv0"]["swat_dense"]
    assert rows["conv1"]["swat"][0.9]["forward_mults"] < rows["conv1"]["swat"][0.8]["forward_mults"]


def test_hand_computed_conv_and_linear(small):
    _, _, rep = small
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    # conv1: weight 6*4*3*3 = 216, 2*5*7 = 70 output positions; K = round(density * 216)
    assert rows["conv1"]["swat"][0.8] == {
        "forward_mults": 43 * 70,  # K = round(0.2 * 216 = 43.2) = 43
        "backward_input_mults": 43 * 70,  # the same sparse weights against the output gradient
        "backward_weight_mults": 3024,  # 0.2 of the dense 216 * 70 = 15120
    }
    assert rows["conv1"]["swat"][0.9] == {
        "forward_mults": 22 * 70, "backward_input_mults": 22 * 70, "backward_weight_mults": 1512}
    # fc: weight 7*11 = 77 over 70 positions (batch 2 x 35 pixels)
    assert rows["fc"]["swat"][0.8] == {
        "forward_mults": 15 * 70,  # K = round(0.2 * 77 = 15.4) = 15
        "backward_input_mults": 15 * 70,
        "backward_weight_mults": 1078,  # 0.2 * 77 * 70 = 1078
    }
    assert rows["fc"]["swat"][0.9] == {
        "forward_mults": 8 * 70, "backward_input_mults": 8 * 70, "backward_weight_mults": 539}
    # the raw-input conv0 (3->4, 3x3) is dense: 108 weights at each of the 70 positions
    assert rows["conv0"]["swat"][0.9] == dict.fromkeys(KEYS, 108 * 70)


def test_totals_are_sums_and_dense_reference_is_base(small):
    _, _, rep = small
    d = rep.to_dict()
    for s in (0.8, 0.9):
        total = d["totals"]["swat"][s]
        for k in KEYS:
            assert total[k] == sum(r["swat"][s][k] for r in d["layers"])
        assert total["training_mults"] == sum(total[k] for k in KEYS)
    for r in d["layers"]:
        assert r["swat_dense"] == dict.fromkeys(KEYS, r["base"]["mults"])
    dense = d["totals"]["swat_dense"]
    assert dense == {**dict.fromkeys(KEYS, d["totals"]["base"]["mults"]),
                     "training_mults": 3 * d["totals"]["base"]["mults"]}
    assert d["totals"]["swat"][0.9]["training_mults"] < d["totals"]["swat"][0.8]["training_mults"] < \
        dense["training_mults"]


def test_formats_carry_swat_columns(small):
    _, _, rep = small
    data = json.loads(rep.to_json())
    assert data["layers"][1]["swat"]["0.8"] == rep.layers[1]["swat"][0.8]
    assert data["totals"]["swat"]["0.9"] == rep.totals["swat"][0.9]
    lines = list(csv.reader(io.StringIO(rep.to_csv())))
    header = lines[0]
    for line, row in zip(lines[1:], rep.layers):
        assert int(line[header.index("swat_0.9_backward_weight_mults")]) == row["swat"][0.9]["backward_weight_mults"]
        assert int(line[header.index("swat_dense_forward_mults")]) == row["swat_dense"]["forward_mults"]
    assert int(lines[-1][header.index("swat_0.8_forward_mults")]) == rep.totals["swat"][0.8]["forward_mults"]
    t = rep.totals
    ratio = t["swat"][0.8]["training_mults"] / t["swat_dense"]["training_mults"]
    text = rep.table(exact=True)
    assert "SWAT s=0.8" in text and "bwd-in" in text and "bwd-w" in text
    assert f"{t['swat'][0.9]['training_mults']:,}" in text and f"{ratio:.2f}x" in text
    md = rep.to_markdown()
    assert "SWAT s=0.9 train" in md and f"{t['swat_dense']['training_mults']:,}" in md


def test_schema_unchanged_without_swat(small):
    model, x, _ = small
    rep = report(model, x, M=(2,))
    d = rep.to_dict()
    for row in d["layers"]:
        assert set(row) == {"name", "op", "eligible", "reason", "base", "sas", "sws", "symbolic"}
    assert set(d["totals"]) == {"base", "sas", "sws"}
    assert not any("swat" in c for c in rep.csv_header())
    assert "SWAT" not in str(rep) and rep.swat == ()


def test_without_inputs_first_module_is_dense_and_counts_per_position():
    model = Small()
    rep = report(model, M=(2,), swat=0.9)
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert rows["conv0"]["swat"][0.9] == dict.fromkeys(KEYS, 108)
    assert rows["fc0"]["swat"][0.9] == swat_costs(model.fc0, 0.1, 0.1)
    assert rows["fc0"]["swat"][0.9]["forward_mults"] == 7  # round(0.1 * 66 = 6.6)


def test_filter_fn_excluded_layers_count_dense():
    model = Small()
    rep = report(model, torch.randn(1, 3, 4, 6), M=(2,), swat=0.8, filter_fn=lambda mod, fqn: fqn != "fc0")
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert rows["fc0"]["swat"][0.8] == rows["fc0"]["swat_dense"]
    assert rows["fc"]["swat"][0.8] != rows["fc"]["swat_dense"]


def test_swatified_model_reports_its_own_densities(small):
    model, x, rep = small
    converted = swatify(model, sparsity=0.8, example_inputs=x).eval()
    own = report(converted, x, M=(2,))
    assert own.swat == (0.8,)  # the sparsity swatify was given
    assert [r["swat"][0.8] for r in own.layers] == [r["swat"][0.8] for r in rep.layers]
    assert own.totals["base"] == rep.totals["base"] and own.totals["sws"] == rep.totals["sws"]
    assert any("SWAT layers" in n for n in own.notes)
    # ERK: per-layer densities differ; each layer counts its own, at every requested sparsity
    erk = swatify(model, sparsity=0.7, distribution="erk", example_inputs=x)
    positions = output_positions(model, x)
    layers = swat_layers(erk)
    assert len({m.weight_density for m in layers.values()}) > 1
    assert report(erk, x, M=(2,)).swat == (0.7,)
    rep_erk = report(erk, x, M=(2,), swat=(0.5, 0.9))
    for row in rep_erk.layers:
        expected = swat_costs(layers[row["name"]], output_positions=positions[row["name"]])
        assert row["swat"][0.5] == row["swat"][0.9] == expected


def test_swatified_model_without_inputs():
    converted = swatify(models.vgg_small(widths=(8, 16)), sparsity=0.9)
    rep = report(converted, M=(2,))
    layers = swat_layers(converted)
    assert [r["name"] for r in rep.layers] == list(layers)
    for row in rep.layers:
        assert row["swat"][0.9] == swat_costs(layers[row["name"]], output_positions=1)


@pytest.mark.parametrize("bad", [1.0, -0.1, True, "0.8", [], (0.5, 1.2), [None]])
def test_bad_swat(bad):
    with pytest.raises(ValueError, match="swat"):
        report(Small(), M=(2,), swat=bad)


def test_cli_swat_json(capsys, tmp_path):
    out_file = tmp_path / "rep.json"
    code = main(["report", f"{__name__}:small_with_shape", "--M", "2", "--swat", "0.8", "0.9",
                 "--format", "json", "-o", str(out_file)])
    assert code == 0
    data = json.loads(out_file.read_text())
    model = Small()
    positions = output_positions(model, torch.randn(2, 3, 5, 7))
    for row in data["layers"]:
        assert set(row["swat"]) == {"0.8", "0.9"}
        for s in (0.8, 0.9):
            d = 1.0 if row["name"] == "conv0" else 1.0 - s
            assert row["swat"][str(s)] == swat_costs(model.get_submodule(row["name"]), d, d,
                                                     output_positions=positions[row["name"]])
    assert data["totals"]["swat"]["0.8"]["training_mults"] == sum(
        sum(r["swat"]["0.8"].values()) for r in data["layers"])
    code = main(["report", f"{__name__}:small_with_shape", "--M", "2", "--swat", "1.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--swat" in err and len(err.strip().splitlines()) == 1
