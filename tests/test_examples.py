"""The examples run end to end, with tiny sizes, and what they return is checked.

They use only the public API (report, inspect, sasify, swsify, torch.compile(backend="sas")),
so an API change that breaks an example fails here.
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def load(name: str):
    """Import ``examples/<name>.py`` under a private module name (mnist1d.py shadows the package)."""
    spec = importlib.util.spec_from_file_location(f"sas_example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ quickstart
def test_quickstart_outputs_match_and_mults_stay(capsys):
    result = load("quickstart").main(["--quick"])
    scale = result["output_scale"]
    assert scale > 0
    for how, diff in result["max_abs_diff"].items():
        assert diff <= 1e-5 * max(1.0, scale), (how, diff)
    totals = result["totals"]
    base = totals["base"]
    for m in (2, 4, 8):
        assert totals["sas"][m]["mults"] == base["mults"]
        assert totals["sas"][m]["params"] > base["params"]
    assert result["converted"] and result["dense"]
    out = capsys.readouterr().out
    assert "converted" in out and "M=8: SAS" in out


# ------------------------------------------------------------------------------ mnist1d
@pytest.mark.slow
def test_mnist1d_table_has_every_configuration(tmp_path, capsys):
    ex = load("mnist1d")
    result = ex.main(["--seeds", "2", "--steps", "40", "--finetune-steps", "10", "--samples", "1000",
                      "--Ms", "2", "4", "--out", str(tmp_path), "--cache", str(tmp_path), "--no-progress"])
    rows = {r["config"]: r for r in result["rows"]}
    expected = {"dense", "dense +ft"} | {f"{k} M={m}" for k in ("SAS scratch", "SAS converted", "SWS scratch")
                                         for m in (2, 4)}
    assert set(rows) == expected
    for r in rows.values():
        assert len(r["accs"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["accs"])
        assert r["mults"] > 0 and r["params"] > 0
    assert rows["dense"]["acc_mean"] > 0.2, "dense accuracy at chance level (10 classes)"
    dense = rows["dense"]
    for m in (2, 4):
        sas = rows[f"SAS scratch M={m}"]
        # SAS keeps the mults, grows the params; the report agrees with the built model
        assert sas["mults"] == dense["mults"]
        assert sas["params"] > dense["params"]
        assert sas["params_built"] == sas["params"]
        # function-preserving conversion: the converted model starts at the dense accuracy
        assert all(abs(d) <= 2e-3 for d in result["start_of_finetune_delta"][f"M={m}"])
    assert dense["params_built"] == dense["params"]
    assert os.path.getsize(result["plot"]) > 1000
    assert "test acc % (mean ± std)" in capsys.readouterr().out


@pytest.mark.parametrize("conv", ["1d", "2d"])
def test_mnist1d_sws_model_is_the_one_the_report_counts(conv):
    """swsify must widen the CNN as the report's SWS columns say (sqrt(M) wider, 1:M masks)."""
    import sas_compile

    ex = load("mnist1d")
    model = ex.make_cnn(8, conv=conv)
    x = torch.randn(1, 1, 40) if conv == "1d" else torch.randn(1, 1, 1, 40)
    costs = ex.costs_from_report(model, x, (4,))
    sws = sas_compile.swsify(model, M=4, example_inputs=x)
    assert ex.count_params(sws) == costs["SWS M=4"]["params"]
    assert ex.count_params(sws) > ex.count_params(model)


@pytest.mark.slow
def test_mnist1d_runs_as_a_script(tmp_path):
    """Run as a file, examples/ leads sys.path and examples/mnist1d.py must not shadow the package."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "mnist1d.py"), "--seeds", "1", "--steps", "2",
                           "--samples", "200", "--Ms", "2", "--no-progress", "--out", str(tmp_path),
                           "--cache", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SAS converted M=2" in proc.stdout and (tmp_path / "mnist1d_accuracy_vs_M.png").exists()


def test_mnist1d_data_is_generated_offline_and_cached(tmp_path):
    ex = load("mnist1d")
    data = ex.make_data(1000, str(tmp_path))
    assert data["x"].shape == (800, 1, 40) and data["x_test"].shape == (200, 1, 40)
    assert set(data["y"].unique().tolist()) == set(range(10))
    again = ex.make_data(1000, str(tmp_path))
    assert torch.equal(again["x"], data["x"]) and torch.equal(again["y_test"], data["y_test"])


# ------------------------------------------------------------------------------ trajectory length
def test_trajectory_metrics_of_a_circle():
    ex = load("trajectory_length")
    z = ex.circle(4000)
    metrics = ex.trajectory_metrics(3.0 * z + 1.0)
    assert metrics["length"] == pytest.approx(3 * 2 * math.pi, rel=1e-5)
    assert metrics["shape"] == pytest.approx(2 * math.pi, rel=1e-5)


def test_trajectory_layer_outputs_match_a_manual_forward():
    ex = load("trajectory_length")
    net = ex.dense_net(7, 3).double()
    ex.randomize(net, 2.0, 0.5, torch.Generator().manual_seed(0))
    x = ex.circle(50)
    outs = ex.layer_outputs(net, x, 3)
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    z = x
    for i, layer in enumerate(linears[:3]):
        a = z if i == 0 else torch.relu(z)
        z = a @ layer.weight.T + layer.bias
        torch.testing.assert_close(outs[i], z)
    # fan-in scaled Gaussian init: the weight std is sigma_w / sqrt(fan_in)
    big = torch.nn.Linear(256, 256)
    ex.randomize(torch.nn.Sequential(big), 2.0, 0.5, torch.Generator().manual_seed(1))
    assert big.weight.std().item() == pytest.approx(2.0 / 16, rel=0.05)
    assert big.bias.std().item() == pytest.approx(0.5, rel=0.2)


def test_trajectory_length_run(tmp_path):
    ex = load("trajectory_length")
    result = ex.main(["--quick", "--Ms", "2", "4", "--sigmas", "4", "--points", "300", "--out", str(tmp_path)])
    per_config = result["results"][4.0]
    assert set(per_config) == {"dense", "SAS M=2", "SAS M=4", "SWS M=2", "SWS M=4"}
    for r in per_config.values():
        assert len(r["length"]) == result["depth"]
        assert all(v > 0 for v in r["length"])
    dense = per_config["dense"]["length"]
    # sigma_w = 4 > sqrt(2): every ReLU layer stretches the curve
    assert all(b > a for a, b in zip(dense, dense[1:])), dense
    costs = result["costs"]
    for m in (2, 4):
        assert costs[f"SAS M={m}"]["mults"] == costs["dense"]["mults"]
        assert abs(costs[f"SWS M={m}"]["mults"] / costs["dense"]["mults"] - 1) < 0.15
    assert os.path.getsize(result["plot"]) > 1000


def test_trajectory_sws_weights_have_dense_energy():
    ex = load("trajectory_length")
    args = ex.parse_args(["--quick", "--Ms", "4"])
    model = ex.build("SWS", 4, args)
    ex.randomize(model, 2.0, 0.0, torch.Generator().manual_seed(0))
    layers = ex.weight_layers(model)
    assert layers[1].in_features == round(2 * args.width)  # sqrt(4) times wider
    masked = [layer for layer in layers if hasattr(layer, "parametrizations")]
    assert len(masked) >= args.depth - 1  # every layer after the input layer
    for layer in masked:
        w = layer.weight
        assert w.pow(2).sum().item() == pytest.approx(4.0 * layer.out_features, rel=1e-6)
        # 1:4 sparse: a quarter of the weights (rounded up per chunk) are nonzero
        assert (w != 0).sum().item() == math.ceil(w.numel() / 4)


# ------------------------------------------------------------------------------ inspect_graph
def test_inspect_graph_resnet(tmp_path, capsys):
    result = load("inspect_graph").main(["--quick", "--out", str(tmp_path)])
    r = result["resnet"]
    assert r["converted"] and len(r["converted"]) == r["sas_layer_modules"]
    reasons = " ".join(r["dense"].values())
    assert "input layer" in reasons and "filter_fn" in reasons
    assert r["max_abs_diff"] < 1e-5
    with open(r["dot"]) as f:
        assert f.read().lstrip().startswith("digraph")
    assert (r["svg"] is None) == ("not installed" in r["svg_note"])
    assert "stay dense" in capsys.readouterr().out


# ------------------------------------------------------------------------------ gpu_deploy
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_deploy_without_cuda_says_so_and_exits_0():
    result = load("gpu_deploy").main([])
    assert result["ran"] is False and "no CUDA device" in result["message"]
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, "gpu_deploy.py")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout


@pytest.mark.slow
def test_gpu_deploy_pipeline_on_cpu():
    result = load("gpu_deploy").main(["--device", "cpu", "--dtype", "float32", "--inner", "eager", "--batch", "2",
                                      "--width", "8", "--tokens", "32", "--features", "48", "--iters", "1"])
    assert result["ran"]
    assert len(result["model"]) == 5 and len(result["layer"]) == 3
    for row in result["model"] + result["layer"]:
        assert row["ms"] > 0
        assert row["rel_err"] < 1e-5, row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_deploy_on_cuda():
    result = load("gpu_deploy").main(["--quick"])
    assert result["ran"]
    for row in result["model"] + result["layer"]:
        assert row["ms"] > 0
        assert row["rel_err"] < 2e-2, row  # float16
