"""sas_compile.report: schema, formats, totals, symbolic formulas and the flop_counter cross-check."""
import csv
import io
import json

import pytest
import sympy
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sas_compile
from sas_compile import models
from sas_compile import Report, report

LAYER_OPS = ("convolution", "addmm", "mm")  # conv/linear at the aten level; bmm/sdpa are attention


def flop_counter_mults(model, inputs):
    """(total, per-module) conv+linear mults as torch.utils.flop_counter sees them (FLOPs / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    counts = counter.get_flop_counts()

    def mults(ops):
        return sum(v for k, v in ops.items() if str(k).split(".")[1] in LAYER_OPS) // 2

    per_module = {k: mults(v) for k, v in counts.items() if k != "Global"}
    return mults(counts["Global"]), per_module


def check_schema(d, Ms):
    assert set(d) == {"layers", "parameters", "totals"}
    for row in d["layers"] + d["parameters"]:
        assert set(row) == {"name", "op", "eligible", "reason", "base", "sas", "sws", "symbolic"}
        assert isinstance(row["name"], str) and isinstance(row["op"], str)
        assert isinstance(row["eligible"], bool)
        assert row["reason"] is None or isinstance(row["reason"], str)
        assert set(row["base"]) == {"mults", "params"}
        assert list(row["sas"]) == list(Ms) and list(row["sws"]) == list(Ms)
        for m in Ms:
            assert set(row["sas"][m]) == {"mults", "params"}
            assert set(row["sws"][m]) == {"mults", "params", "nonzero_params", "in_features", "out_features"}
            assert all(type(v) is int for v in row["sas"][m].values())
            assert all(type(v) is int for v in row["sws"][m].values())
        assert all(type(v) is int for v in row["base"].values())
        assert set(row["symbolic"]) == {"base_mults"} and isinstance(row["symbolic"]["base_mults"], str)
    t = d["totals"]
    assert set(t) == {"base", "sas", "sws"}
    assert list(t["sas"]) == list(Ms) and list(t["sws"]) == list(Ms)


def small_resnet():
    return models.resnet18(width=8).eval()


@pytest.fixture(scope="module")
def resnet_report():
    torch.manual_seed(0)
    return report(small_resnet(), torch.randn(2, 3, 20, 28), M=(2, 4, 8))


def test_schema_and_totals(resnet_report):
    d = resnet_report.to_dict()
    check_schema(d, (2, 4, 8))
    assert len(d["layers"]) == 21  # 20 convs (3 downsample) + fc
    # every other parameter (the BatchNorms here) has a parameters-only row: totals are the model's
    assert d["totals"]["base"]["params"] == sum(p.numel() for p in small_resnet().parameters())
    assert all(r["base"]["mults"] == 0 and r["op"] == "BatchNorm2d" for r in d["parameters"])
    rows = d["layers"] + d["parameters"]
    for key in ("mults", "params"):
        assert d["totals"]["base"][key] == sum(r["base"][key] for r in rows)
        for m in (2, 4, 8):
            assert d["totals"]["sas"][m][key] == sum(r["sas"][m][key] for r in rows)
            assert d["totals"]["sws"][m][key] == sum(r["sws"][m][key] for r in rows)
    for m in (2, 4, 8):
        assert d["totals"]["sas"][m]["mults"] == d["totals"]["base"]["mults"]
        for r in d["layers"]:
            if r["eligible"]:  # the weight is exactly M times wider; only fc has a bias (10)
                bias = 10 if r["name"] == "fc" else 0
                assert r["sas"][m]["params"] - bias == m * (r["base"]["params"] - bias)
            else:
                assert r["sas"][m] == r["base"]
    d["layers"][0]["base"]["mults"] = -1  # to_dict hands out a copy
    assert resnet_report.to_dict()["layers"][0]["base"]["mults"] != -1


def test_sas_params_are_M_times_weights_plus_bias():
    torch.manual_seed(0)
    model = models.mlp(in_features=12, hidden=(9, 7), num_classes=5)
    rep = report(model, torch.randn(4, 12), M=(2, 8), dense_input_layers=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for row, lin in zip(rep.to_dict()["layers"], linears):
        assert row["eligible"]
        for m in (2, 8):
            assert row["sas"][m]["params"] == m * lin.weight.numel() + lin.bias.numel()
            assert row["sas"][m]["mults"] == 4 * lin.weight.numel()


def test_base_mults_equal_flop_counter_per_layer(resnet_report):
    total, per_module = flop_counter_mults(small_resnet(), (torch.randn(2, 3, 20, 28),))
    rows = resnet_report.to_dict()["layers"]
    assert resnet_report.totals["base"]["mults"] == total
    for row in rows:
        assert row["base"]["mults"] == per_module[f"ResNet.{row['name']}"], row["name"]


@pytest.mark.parametrize("name,shape", [
    ("resnet18", (1, 3, 32, 32)),
    ("resnet18-imagenet", (2, 3, 45, 38)),
    ("vit_tiny", (2, 3, 32, 32)),
    ("mlp", (3, 1, 28, 28)),
    ("vgg_small", (2, 3, 30, 26)),
])
def test_builtin_models_base_mults_equal_flop_counter(name, shape):
    torch.manual_seed(0)
    model, _ = models.load_model(name)
    x = torch.randn(*shape)
    rep = report(model, x, M=(2,), symbolic=False)
    total, _ = flop_counter_mults(model, (x,))
    assert rep.totals["base"]["mults"] == total > 0
    params = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert sum(r["base"]["params"] for r in rep.layers) == params
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())


def _hf_models():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    resnet = transformers.ResNetForImageClassification(transformers.ResNetConfig(
        num_channels=3, embedding_size=16, hidden_sizes=[16, 24], depths=[1, 2], layer_type="bottleneck",
        num_labels=5)).eval()
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=24, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=3)).eval()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
        max_position_embeddings=32)).eval()
    return [
        ("hf-resnet", resnet, (torch.randn(2, 3, 40, 36),)),
        ("hf-vit", vit, (torch.randn(2, 3, 24, 24),)),
        ("hf-bert", bert, (torch.randint(0, 50, (2, 9)),)),
    ]


@pytest.mark.slow
def test_transformers_models_base_mults_equal_flop_counter():
    for name, model, inputs in _hf_models():
        rep = report(model, inputs, M=(2, 4))
        check_schema(rep.to_dict(), (2, 4))
        total, _ = flop_counter_mults(model, inputs)
        assert rep.totals["base"]["mults"] == total > 0, name
        params = sum(p.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                     for p in m.parameters())
        assert sum(r["base"]["params"] for r in rep.layers) == params, name
        assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters()), name


def _substitute(formula, sizes):
    symbols = {k: sympy.Symbol(k, integer=True, positive=True) for k in sizes}
    expr = sympy.sympify(formula, locals=symbols)
    value = expr.subs({symbols[k]: v for k, v in sizes.items()})
    assert value.is_number, (formula, sizes)
    return int(value)


class OddConvs(nn.Module):
    """Stride 2 without padding, dilation 2, a non-square kernel, groups and a 3-D linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, stride=2)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.c = nn.Conv2d(8, 6, (2, 5), stride=(1, 2), padding=(0, 1))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.c(torch.relu(self.b(torch.relu(self.a(x)))))
        return self.fc(y.flatten(2).transpose(1, 2))  # [batch, positions, channels]


@pytest.mark.parametrize("factory,size_a,size_b", [
    (OddConvs, (1, 3, 21, 30), (3, 3, 16, 19)),
    (small_resnet, (2, 3, 32, 32), (1, 3, 23, 17)),
    (lambda: models.vit_tiny(dim=24, depth=1, heads=2, image_size=16), (1, 3, 16, 16), (3, 3, 16, 16)),
])
def test_symbolic_formulas_agree_with_numbers_at_two_input_sizes(factory, size_a, size_b):
    torch.manual_seed(0)
    model = factory().eval()
    rep_a = report(model, torch.randn(*size_a), M=(2,))
    rep_b = report(model, torch.randn(*size_b), M=(2,), symbolic=False)
    names = dict(zip(("batch", "channels", "height", "width"), size_a))
    names_b = dict(zip(("batch", "channels", "height", "width"), size_b))
    symbolic = [r["symbolic"]["base_mults"] for r in rep_a.to_dict()["layers"]]
    assert any(sympy.sympify(f).free_symbols for f in symbolic)  # real formulas, not numbers
    assert "batch" in rep_a.symbolic_total  # batch stays symbolic even when the example has 1
    for formula, row_a, row_b in zip(symbolic, rep_a.to_dict()["layers"], rep_b.to_dict()["layers"]):
        assert _substitute(formula, names) == row_a["base"]["mults"], (row_a["name"], formula)
        assert _substitute(formula, names_b) == row_b["base"]["mults"], (row_b["name"], formula)
    assert _substitute(rep_a.symbolic_total, names_b) == rep_b.totals["base"]["mults"]


def test_bert_formula_is_in_batch_and_seq():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32)).eval()
    rep = report(bert, torch.randint(0, 50, (2, 9)), M=(2,))
    for row in rep.to_dict()["layers"]:
        formula = row["symbolic"]["base_mults"]
        assert _substitute(formula, {"batch": 2, "seq": 9}) == row["base"]["mults"]
    other = report(bert, torch.randint(0, 50, (3, 5)), M=(2,), symbolic=False)
    assert _substitute(rep.symbolic_total, {"batch": 3, "seq": 5}) == other.totals["base"]["mults"]


def test_without_inputs_counts_per_output_position():
    model = models.vgg_small(widths=(8, 16))
    rep = report(model, M=(2, 4))
    assert rep.per_position
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [r["base"]["mults"] for r in rep.to_dict()["layers"]] == [m.weight.numel() for m in convs]
    assert "per output position" in str(rep)
    for r in rep.to_dict()["layers"]:
        assert r["symbolic"]["base_mults"] == str(r["base"]["mults"])


def test_filter_fn_and_input_layer_reasons():
    model = models.vgg_small(widths=(8, 16))
    rep = report(model, torch.randn(1, 3, 16, 16), M=(2,), filter_fn=lambda mod, fqn: fqn != "3")
    rows = {r["name"]: r for r in rep.to_dict()["layers"]}
    assert not rows["0"]["eligible"] and "input" in rows["0"]["reason"]
    assert not rows["3"]["eligible"] and rows["3"]["reason"] == "excluded by filter_fn"
    assert rows["3"]["sas"][2] == rows["3"]["base"]
    assert rows["7"]["eligible"] and rows["7"]["sas"][2]["params"] == 2 * 16 * 8 * 9
    text = str(rep)
    assert "excluded by filter_fn" in text and "no [" in text


def test_report_on_a_sasified_model_counts_its_wide_weights():
    torch.manual_seed(0)
    model = models.vgg_small(widths=(8, 16))
    x = torch.randn(2, 3, 16, 16)
    dense = report(model, x, M=(4,))
    sas_model = sas_compile.sasify(model, M=4)
    rep = report(sas_model, x, M=(2, 4))
    assert rep.totals["base"]["mults"] == dense.totals["base"]["mults"]
    assert rep.totals["sas"][4]["params"] == dense.totals["sas"][4]["params"]
    # the real parameter count of the wide layers
    wide = sum(p.numel() for name, mod in sas_model.named_modules() if hasattr(mod, "M")
               for p in mod.parameters(recurse=False))
    assert wide > 0
    sas_rows = [r for r in rep.to_dict()["layers"] if r["sas"][2] != r["base"]]
    assert sum(r["sas"][2]["params"] for r in sas_rows) == wide  # M=4 layers stay M=4 at any M


def test_formats(resnet_report):
    rep = resnet_report
    data = json.loads(rep.to_json())
    assert data["totals"]["sas"]["4"] == rep.totals["sas"][4]
    assert len(data["layers"]) == len(rep.layers)
    lines = list(csv.reader(io.StringIO(rep.to_csv())))
    assert lines[0] == rep.csv_header()
    assert len(lines) == len(rep.layers) + len(rep.parameters) + 2 and lines[-1][0] == "total"
    header = lines[0]
    for line, row in zip(lines[1:], rep.layers):
        assert int(line[header.index("base_mults")]) == row["base"]["mults"]
        assert int(line[header.index("sws_M8_nonzero_params")]) == row["sws"][8]["nonzero_params"]
    assert int(lines[-1][header.index("sas_M2_params")]) == rep.totals["sas"][2]["params"]
    md = rep.to_markdown()
    table = [l for l in md.splitlines() if l.startswith("|")]
    assert len(table) == 2 + len(rep._tree_rows(None)) + 2  # header, rule, rows, total, ratio
    assert f"{rep.totals['base']['mults']:,}" in md
    text = str(rep)
    assert "total" in text and "ratio to base" in text and "1.00x" in text
    assert "layer1.0.conv1" in text and " layer1.0" in text  # nested module paths
    assert "total base mults = " in text


def test_table_nesting_and_depth(resnet_report):
    rows = resnet_report._tree_rows(None)
    names = [name for _, name, _, _ in rows]
    assert names.index("layer1") < names.index("layer1.0") < names.index("layer1.0.conv1")
    depths = {name: depth for depth, name, _, _ in rows}
    assert depths["layer1"] == 0 and depths["layer1.0"] == 1 and depths["layer1.0.conv1"] == 2
    parent = next(r for _, n, r, leaf in rows if n == "layer2" and not leaf)
    assert sum(r["base"]["mults"] for r in parent) == sum(
        r["base"]["mults"] for r in resnet_report.layers if r["name"].startswith("layer2."))
    shallow = resnet_report.table(max_depth=1)
    assert "layer1.0.conv1" not in shallow and "layer1.0 " in shallow


def test_sas_compile_report_is_the_function_and_no_module_shadows_it():
    import sas_compile.reporting as module

    rep = sas_compile.report(models.mlp(in_features=6, hidden=(5,), num_classes=3), M=2)
    assert isinstance(rep, Report) and module.report is report is sas_compile.report


def test_bad_arguments():
    with pytest.raises(ValueError, match="M=6"):
        report(models.mlp(), M=(2, 6))
    with pytest.raises(TypeError, match="nn.Module"):
        report(lambda x: x)


# --- inspection (reads the same plan) ----------------------------------------------------------
def test_inspect_plan_text_dict_dot():
    import shutil

    from sas_compile.inspection import layer_cost_summary, render_svg

    torch.manual_seed(0)
    model = OddConvs().eval()
    x = torch.randn(2, 3, 21, 30)
    plan = sas_compile.inspect_model(model, x, M=4)
    assert [l.name for l in plan.layers] == ["a", "b", "c", "fc"]
    text = str(plan)
    assert "SAS plan (M=4" in text and "d=2x2, g=2" in text and "k=2x5, s=1x2" in text
    assert "[1] input layer" in text
    folded = {l.name: l.fold_relu for l in plan.layers}
    assert folded["b"] and folded["c"]  # each reads a ReLU
    # mults before/after agree with the report's numbers
    rows = {r["name"]: r for r in report(model, x, M=(4,), symbolic=False).to_dict()["layers"]}
    for layer in plan.layers:
        cost = layer_cost_summary(layer, 4)
        assert cost["mults_before"] == cost["mults_after"] == rows[layer.name]["base"]["mults"]
        assert cost["params_after"] == rows[layer.name]["sas"][4]["params"]
    d = plan.to_dict()
    json.dumps(d)
    assert d["M"] == 4 and d["converted"] == 3 and d["layers"][1]["fold_relu"] is True
    assert plan.graph_before and plan.graph_after and plan.graph_before != plan.graph_after
    dot = plan.to_dot()
    assert dot.startswith("digraph") and dot.rstrip().endswith("}")
    assert dot.count("palegreen") == 3 and dot.count("fillcolor=orange") == 1
    assert '"a" -> ' in dot and "mults " in dot and "dense: input layer" in dot
    if shutil.which("dot"):
        out = render_svg(dot, "/tmp/sas_compile_test_plan.svg")
        assert open(out).read().lstrip().startswith(("<?xml", "<svg"))
    else:
        with pytest.raises(RuntimeError, match="dot"):
            render_svg(dot, "/tmp/sas_compile_test_plan.svg")


def test_inspect_without_inputs_and_on_a_plan_without_graph():
    from sas_compile.plan import LayerPlan, Plan

    plan = sas_compile.inspect_model(models.mlp(in_features=6, hidden=(5,), num_classes=3))
    assert "per position" in str(plan)
    hand = Plan(M=2, capture="modules", layers=[
        LayerPlan("x.l1", "x.l1", "linear", True, None, 4, 3, has_bias=True),
        LayerPlan("x.l2", "x.l2", "linear", False, "excluded by filter_fn", 3, 2),
    ])
    dot = hand.to_dot()
    assert '"x.l1" -> "x.l2"' in dot and "excluded by filter_fn" in dot
    assert "12 -> 12" in str(hand)  # 4*3 mults per position, unchanged


def test_report_on_an_sws_model_counts_its_nonzeros():
    from sas_compile.sws import measure_sws_model

    torch.manual_seed(0)
    model = models.vgg_small(widths=(8, 16))
    x = torch.randn(2, 3, 16, 12)
    dense = report(model, x, M=(4,))
    sws_model = sas_compile.swsify(model, M=4, example_inputs=x)
    rep = report(sws_model, x, M=(4,))
    built = sum(c["mults"] for c in measure_sws_model(sws_model, (x,)).values())
    assert rep.totals["base"]["mults"] == built == dense.totals["sws"][4]["mults"]
    assert rep.totals["sws"][4] == dense.totals["sws"][4]
    assert sum(r["base"]["params"] for r in rep.layers) == sum(  # stored dense (masked) weights and biases
        p.numel() for m in sws_model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) for p in m.parameters())
    assert rep.totals["base"]["params"] == sum(p.numel() for p in sws_model.parameters())
    x2 = torch.randn(3, 3, 8, 20)
    assert _substitute(rep.symbolic_total, {"batch": 3, "height": 8, "width": 20}) == \
        report(sws_model, x2, M=(4,), symbolic=False).totals["base"]["mults"]
    assert any("SWS weight mask" in n for n in rep.notes)


class _ExportOnlyCNN(nn.Module):
    """A shape test in forward: symbolic tracing fails, torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.b, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.a(x)))
        if x.shape[0] > 1:
            h = h * 2
        return self.fc(torch.relu(self.b(h)).mean((2, 3)))


def test_report_on_an_export_built_sws_model_counts_its_masked_weights():
    """An export-built SWS model reads its masked weights as attributes, and tracing followed the
    mask into its ops: the report called those layers' weights computed ("nothing to widen", all
    weights counted) and listed their modules again as parameters-only rows (parameters counted twice)."""
    from sas_compile.runtime.sws_mask import sws_mask_of
    from sas_compile.sws import measure_sws_model

    torch.manual_seed(0)
    model, x = _ExportOnlyCNN().eval(), torch.randn(2, 3, 8, 8)
    dense = report(model, x, M=(4,))
    sws_model = sas_compile.swsify(model, M=4, example_inputs=x)
    assert sws_model.sparsify_plan.capture == "export" and isinstance(sws_model, torch.fx.GraphModule)
    with torch.no_grad():
        before = sws_model(x)
    rep = report(sws_model, x, M=(4,), symbolic=False)
    measured = measure_sws_model(sws_model, (x,))
    assert [r["name"] for r in rep.layers] == [c["name"] for c in measured.values()] == ["a", "b", "fc"]
    assert any(n.startswith("2 layers carry a 1:M SWS weight mask") and n.endswith("(b, fc)") for n in rep.notes)
    assert rep.totals["base"]["mults"] == sum(c["mults"] for c in measured.values()) == dense.totals["sws"][4]["mults"]
    assert rep.totals["sws"][4] == dense.totals["sws"][4]
    assert rep.totals["base"]["params"] == sum(p.numel() for p in sws_model.parameters())
    assert [r["name"] for r in rep.parameters] == ["bn"]  # the masked layers' modules are not rows again
    # the report worked on a view: the model keeps its masks and its function
    assert sws_mask_of(sws_model.b, "weight") is not None and sws_mask_of(sws_model.fc, "weight") is not None
    with torch.no_grad():
        assert torch.equal(sws_model(x), before)


class _ExportOnlyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 1:
            h = h * 2
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_report_on_a_lowered_sws_model_counts_what_it_packed(capture):
    """lower_sws's packed layers (an unpacked weight property, a bias) were counted as dense linears on
    a computed weight plus a parameters-only row: the lowered model reported 4x the mults of the SWS
    model it was lowered from. Both now report the same counts."""
    from sas_compile.sws import lower_sws, measure_sws_model

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    model = (nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
             if capture == "symbolic_trace" else _ExportOnlyMLP())
    sws_model = sas_compile.swsify(model, M=4, example_inputs=x).eval()
    assert sws_model.sparsify_plan.capture == capture
    lowered = lower_sws(sws_model, target="cpu")
    assert len(lowered.sws_lowering.lowered) == 2
    with torch.no_grad():
        before = lowered(x)
    want, got = (report(m, x, M=(4,), symbolic=False) for m in (sws_model, lowered))
    assert got.totals == want.totals
    assert [r["base"] for r in got.layers] == [r["base"] for r in want.layers]
    assert not got.parameters
    measured = measure_sws_model(lowered, (x,))
    assert got.totals["base"]["mults"] == sum(c["mults"] for c in measured.values())
    biases = 32 + 32 + 3  # every bias dense
    assert got.totals["sws"][4]["nonzero_params"] == sum(c["nonzeros"] for c in measured.values()) + biases
    with torch.no_grad():
        assert torch.equal(lowered(x), before)  # the report worked on a view


@pytest.mark.parametrize("branchy", [False, True])
def test_inspect_builds_the_rewrite_on_meta_weights_with_the_same_graph(monkeypatch, branchy):
    """inspect_model builds the rewrite on meta stand-ins: the same graph and modules as sasify,
    without the M-times wider weights in memory (ResNet-50 at M = 8: peak 1320 -> 444 MB)."""
    from sas_compile import inspection
    from sas_compile.sas import apply_sas_plan

    class Branchy(nn.Module):  # a graph rewrite (the ReLU also feeds the add), not a module swap
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + h

    model = Branchy() if branchy else nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(2, 3, 10, 10)
    built = []

    def recording(plan, config, **kwargs):
        out = apply_sas_plan(plan, config, **kwargs)
        built.append(out)
        return out

    monkeypatch.setattr(inspection, "apply_sas_plan", recording)
    plan = inspection.inspect_model(model, x, M=8, dense_input_layers=False)
    (meta_model,) = built
    tensors = [*meta_model.parameters(), *meta_model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    real = sas_compile.sasify(model, M=8, dense_input_layers=False)
    assert [type(m).__name__ for m in meta_model.modules()] == [type(m).__name__ for m in real.modules()]
    assert [(n, tuple(p.shape)) for n, p in meta_model.named_parameters()] == \
        [(n, tuple(p.shape)) for n, p in real.named_parameters()]
    assert all(p.device.type == "cpu" for p in model.parameters())  # the user's model untouched
    if branchy:
        assert plan.graph_after == real.code


@pytest.mark.parametrize("name", ["mlp", "vgg", "resnet18", "encoder", "functional_conv", "shared_linear"])
def test_report_on_built_and_lowered_sws_models_counts_what_they_compute(name):
    """report(swsify(model)) and report(lower_sws(...)) against measure_sws_model, which counts the
    built model itself: mults, and every parameter once. functional_conv masks a weight of the
    GraphModule's own (torch cannot deepcopy that GraphModule, so the report reads a graph view)."""
    import zoo
    from sas_compile.sws import lower_sws, measure_sws_model

    factory, make_input = zoo.models()[name]
    torch.manual_seed(0)
    x = make_input()
    built = [sas_compile.swsify(factory(), M=4, example_inputs=(x,)).eval() for _ in range(2)]
    lowered = lower_sws(built[1], target="cpu", inplace=True)
    for model, is_lowered in ((built[0], False), (lowered, True)):
        rep = report(model, (x,), M=(4,), symbolic=False)
        measured = measure_sws_model(model, (x,))
        assert rep.totals["base"]["mults"] == sum(c["mults"] for c in measured.values()) == rep.totals["sws"][4]["mults"]
        if not is_lowered:  # lowered layers keep their weights as packed buffers, counted as the dense view
            assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())
        assert [r["name"] for r in rep.parameters if "Parametrized" in r["op"] or "Packed" in r["op"]] == []


def test_report_note_on_one_masked_layer_is_singular():
    """One masked layer: "1 layer carries", not "1 layers carry"."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(4, 8)
    rep = report(sas_compile.swsify(model, M=4, example_inputs=(x,)), (x,), M=(4,), symbolic=False)
    assert any(n.startswith("1 layer carries a 1:M SWS weight mask") for n in rep.notes), rep.notes
