"""The sas-compile command line, end to end: formats, exit codes, one-line errors."""
import csv
import io
import json
import os
import contextlib
import subprocess
import sys

import pytest
import torch
from torch import nn

from sas_compile import models
from sas_compile.cli import main, parse_shape
from sas_compile import report


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_cnn():
    """A factory for the package.module:factory form (a ragged 5-channel input)."""
    return nn.Sequential(nn.Conv2d(5, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 4, (1, 3), padding=(0, 1)),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def tiny_cnn_with_shape():
    return tiny_cnn(), (2, 5, 11, 9)


NOT_A_MODEL = 42


def test_default_model_and_default_subcommand(capsys):
    # no subcommand means report, no MODEL means resnet18 at 1,3,32,32
    code, out, err = run(capsys, "--M", "2")
    assert code == 0 and err == ""
    assert "layer4.1.conv2" in out and "ratio to base" in out and "SWS M=2" in out
    assert "21 conv/linear layers" in out and "mults for input 1x3x32x32" in out


def test_json_matches_the_api(capsys):
    code, out, _ = run(capsys, "report", "vgg_small", "--input-shape", "2,3,12,10", "--M", "2", "8",
                       "--format", "json")
    assert code == 0
    torch.manual_seed(0)
    model, _ = models.load_model("vgg_small")
    expected = report(model, torch.randn(2, 3, 12, 10), M=(2, 8)).to_dict()
    data = json.loads(out)
    assert data["totals"]["base"] == expected["totals"]["base"]
    assert data["totals"]["sws"]["8"] == expected["totals"]["sws"][8]
    assert [r["name"] for r in data["layers"]] == [r["name"] for r in expected["layers"]]


def test_csv_and_markdown(capsys, tmp_path):
    code, out, _ = run(capsys, "report", "mlp", "--M", "4", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["name"] for r in rows][-1] == "total" and len(rows) == 4
    assert int(rows[0]["base_mults"]) == 784 * 256  # one image, first linear
    assert int(rows[1]["sas_M4_params"]) == 4 * 256 * 256 + 256
    target = tmp_path / "r.md"
    code, out, _ = run(capsys, "report", "mlp", "--M", "4", "--format", "markdown", "-o", str(target))
    assert code == 0 and out == ""
    md = target.read_text()
    assert "| total" in md and "200,704" in md  # exact counts in markdown


def test_factory_spec_and_no_inputs(capsys):
    spec = f"{__name__}:tiny_cnn"
    code, out, err = run(capsys, "report", spec, "--M", "2", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    # no default shape and none given: counts per output position = weight sizes
    assert [r["base"]["mults"] for r in data["layers"]] == [6 * 5 * 9, 4 * 6 * 3, 3 * 4]
    code, out, err = run(capsys, "report", f"{__name__}:tiny_cnn_with_shape", "--M", "2", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["layers"][0]["base"]["mults"] == 2 * 5 * 4 * 6 * 5 * 9  # 11x9 -> 5x4 at stride 2
    code, out, err = run(capsys, "report", "vgg_small", "--no-inputs", "--M", "2", "--format", "csv")
    assert code == 0 and "height" not in out


@pytest.mark.parametrize("argv,needle", [
    (["report", "no_such_model"], "unknown model 'no_such_model'"),
    (["report", "no_such_pkg.mod:f"], "cannot import 'no_such_pkg.mod'"),
    (["report", f"{__name__}:missing"], "has no attribute 'missing'"),
    (["report", f"{__name__}:NOT_A_MODEL"], "neither an nn.Module"),
    (["report", "--input-shape", "1,3,x,4"], "bad --input-shape '1,3,x,4'"),
    (["report", "--input-shape", "1,0,4"], "bad --input-shape"),
    (["report", "--input-shape", "1,3"], "does not accept input shape 1,3"),
    (["report", "--M", "3"], "M=3 is not supported"),
    (["report", "--M", "two"], "invalid int value"),
    (["report", "--format", "xml"], "invalid choice: 'xml'"),
    (["report", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["inspect", "--M", "2", "4"], "unknown model '4'"),  # inspect takes one M
    (["report", "--no-inputs", "--input-shape", "1,3,8,8"], "contradict"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("sas-compile: error: ")
    assert needle in err


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "report" in out and "inspect" in out
    code, out, _ = run(capsys, "report", "--help")
    assert code == 0 and "--input-shape" in out


def test_parse_shape():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("2x5") == (2, 5)
    for bad in ("", "1,,3", "a", "1,-2", "3.5"):
        with pytest.raises(Exception, match="bad --input-shape"):
            parse_shape(bad)


def test_inspect_text_json_and_dot(capsys, tmp_path):
    dot = tmp_path / "plan.dot"
    code, out, err = run(capsys, "inspect", "vgg_small", "--input-shape", "1,3,16,16", "--dot", str(dot), "--graph")
    assert code == 0, err
    assert "SAS plan (M=2" in out and "# graph after" in out and "[1] input layer" in out
    text = dot.read_text()
    assert text.startswith("digraph") and text.count("palegreen") == 7 and "orange" in text
    code, out, _ = run(capsys, "inspect", "vgg_small", "--M", "4", "--format", "json", "--input-shape", "2,3,8,8")
    data = json.loads(out)
    assert data["M"] == 4 and data["converted"] == 7
    first = data["layers"][0]
    assert first["eligible"] is False and first["mults_before"] == first["mults_after"] == 2 * 64 * 8 * 8 * 27


@pytest.mark.slow
def test_python_dash_m_subprocess():
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    ok = subprocess.run([sys.executable, "-m", "sas_compile", "report", "mlp", "--M", "2", "--format", "json"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["totals"]["base"]["mults"] == 784 * 256 + 256 * 256 + 256 * 10


def test_the_default_report_does_not_import_dynamo_for_its_shapes():
    """`sas-compile report` is a 2.5 s command (issue 14): its shapes come from the real run the
    CLI makes anyway, not from torch's Python meta kernels, whose first call imports
    torch._dynamo (0.6-0.9 s)."""
    code = ("import sys, io, contextlib\n"
            "from sas_compile.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    assert main(['report']) == 0\n"
            "assert 'layer1.0.conv1' in out.getvalue()\n"
            "print('torch._dynamo' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_shapes_from_real_runs_leave_the_model_as_it_was_and_catch_misfits():
    import torch
    from torch import nn

    from sas_compile.passes.capture import ExampleInputsError, capture, shapes_from_real_runs

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1)).train()
    stats = model[1].running_mean.clone()
    with shapes_from_real_runs():
        captured = capture(model, (torch.randn(2, 3, 8, 8),))
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    assert tuple(nodes["_3"].meta["tensor_meta"].shape) == (2, 5, 6, 6)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model[1].running_mean, stats)
    for real in (False, True):  # a BatchNorm of the wrong width is caught with or without a real run
        bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(6))
        with pytest.raises(ExampleInputsError, match="1"), (shapes_from_real_runs() if real else contextlib.nullcontext()):
            capture(bad, (torch.randn(2, 3, 8, 8),))


def test_the_console_script_finds_a_model_module_in_the_current_directory(tmp_path):
    """``sas-compile report mymodel:make`` beside ``mymodel.py``: a console script's sys.path starts
    at its bin folder, not the current directory, so this said "No module named 'mymodel'"."""
    (tmp_path / "mymodel.py").write_text(
        "from torch import nn\n"
        "def make():\n"
        "    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))\n")
    script = os.path.join(os.path.dirname(sys.executable), "sas-compile")
    assert os.path.isfile(script), "the sas-compile script is installed by pip install -e ."
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([script, "report", "mymodel:make", "--input-shape", "4,20", "--M", "2", "--format", "json"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["totals"]["base"]["mults"] == 4 * (20 * 32 + 32 * 3)
    missing = subprocess.run([script, "report", "nomodule:make"], capture_output=True, text=True, cwd=tmp_path,
                             env=env, timeout=300)
    assert missing.returncode == 2 and "from the current directory or sys.path" in missing.stderr, missing.stderr
