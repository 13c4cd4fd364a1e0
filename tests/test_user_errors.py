"""What a user meets with wrong arguments, unusual models and compile options: one clear line,
nothing on stderr, never a crash deep inside, never a silently different count."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sas_compile
from sas_compile.passes.capture import ExampleInputsError


def mlp():
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 4)).eval()


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # data-dependent: neither symbolic tracing nor export captures it
            h = torch.relu(self.b(h))
        return self.c(h)


class FusedQKV(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))


@pytest.mark.parametrize("call", ["sasify", "report", "inspect_model", "swsify"])
def test_wrong_shaped_example_inputs_one_line_and_quiet(call, capfd):
    fn = getattr(sas_compile, call)
    with pytest.raises(ExampleInputsError) as info:
        if call in ("sasify", "swsify"):
            fn(mlp(), M=2, example_inputs=(torch.randn(2, 7),))
        else:
            fn(mlp(), (torch.randn(2, 7),))
    message = str(info.value)
    assert "\n" not in message and "example_inputs do not fit Sequential" in message and "[2, 7]" in message
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("bad", [2.0, None, "2", (2, 3)])
def test_report_validates_M_up_front(bad):
    with pytest.raises(ValueError, match="M="):
        sas_compile.report(mlp(), M=bad)


@pytest.mark.parametrize("call", ["sasify", "report", "inspect_model", "swsify", "swatify"])
def test_filter_fn_must_be_callable(call):
    with pytest.raises((ValueError, TypeError), match="filter_fn"):
        getattr(sas_compile, call)(mlp(), filter_fn=42)


def test_cli_rejects_a_negative_max_depth():
    proc = subprocess.run([sys.executable, "-m", "sas_compile", "report", "mlp", "--max-depth", "-1"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "negative" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_report_and_inspect_fall_back_to_dynamo_with_graph_breaks(capfd):
    torch.manual_seed(0)
    model, x = DataDependent().eval(), torch.randn(3, 8)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))  # module swaps, from dynamo's graphs
    assert sas.sas_plan.capture == "dynamo" and [layer.name for layer in sas.sas_plan.eligible()] == ["b", "c"]
    rep = sas_compile.report(model, (x,), M=(2,))
    assert [r["name"] for r in rep.layers] == ["a", "b", "c"]
    assert rep.plan.capture == "dynamo" and rep.plan.graph_breaks
    assert "graph breaks" in str(rep) and "Data-dependent branching" in str(rep) and "h.sum() > 0" in str(rep)
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert rep.totals["base"]["mults"] == counter.get_total_flops() // 2
    plan = sas_compile.inspect_model(model, (x,))
    assert "graph breaks" in str(plan) and [layer.name for layer in plan.eligible()] == ["b", "c"]
    # SWAT columns from the same analysis: the raw-input layer dense, the others sparse
    swat = {r["name"]: r["swat"][0.9]["forward_mults"] for r in sas_compile.report(model, (x,), M=(2,), swat=0.9).layers}
    dense = {r["name"]: r["base"]["mults"] for r in rep.layers}
    assert swat["a"] == dense["a"] and swat["b"] < dense["b"] and swat["c"] < dense["c"]
    assert capfd.readouterr().err == ""


def test_report_counts_a_module_called_twice_once_and_every_parameter():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.attn, self.lstm = nn.Linear(6, 6), nn.MultiheadAttention(6, 2), nn.LSTM(6, 5)

        def forward(self, x):
            h = self.fc(self.fc(x))
            y, _ = self.attn(h[None], h[None], h[None])
            return self.lstm(y)[0]

    model = Twice().eval()
    rep = sas_compile.report(model, (torch.randn(3, 6),), M=(2,))
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())
    assert [r["base"]["params"] for r in rep.layers if r["op"] == "linear"] == [42, 0]
    others = {r["name"]: r for r in rep.parameters}
    assert set(others) == {"attn", "lstm"} and "projections run inside" in others["attn"]["reason"]
    plan = sas_compile.sasify(model, M=2).sas_plan
    assert {layer.name: layer.eligible for layer in plan.layers if layer.op == "multiheadattention"} == {"attn": False}


def test_inspect_and_report_stay_quiet_when_symbolic_shapes_fail():
    """An LSTM's symbolic shapes fail inside torch with a C++ stack trace: one line in the notes
    (report) or the log, nothing on stderr (a fresh process, as a user runs it: pytest would
    capture the logging)."""
    script = """
import torch, torch.nn as nn, sas_compile
class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.lstm, self.head = nn.Linear(4, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 2)
    def forward(self, x):
        return self.head(self.lstm(torch.relu(self.fc(x)))[0])
model, x = Recurrent().eval(), torch.randn(2, 3, 4)
assert "lstm" in str(sas_compile.inspect_model(model, (x,)))
rep = sas_compile.report(model, (x,), M=(2,))
str(rep)  # reads the formulas
assert any(n.startswith("symbolic formulas unavailable") and chr(10) not in n for n in rep.notes), rep.notes
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


def test_report_and_swsify_stay_quiet_when_the_guessed_input_does_not_fit():
    """Without example inputs the analysis guesses an input shape; for an ImageNet ViT (197
    positions) the guess fails inside fake tensors, which log their traceback: nothing on stderr
    (a fresh process: pytest would capture the logging); the report's title and swsify's warning
    say that there were no example inputs."""
    script = """
import logging, torch, sas_compile
from sas_compile.models import load_model
model = load_model("vit_tiny-imagenet")[0].eval()
rep = sas_compile.report(model, M=(2,))
assert "(no example inputs)" in str(rep).splitlines()[0], str(rep)[:300]
seen = []
logging.getLogger("sas_compile").addHandler(logging.Handler())
logging.getLogger("sas_compile").handlers[-1].emit = seen.append
built = sas_compile.swsify(model, M=4)
assert not built.sparsify_plan.eligible() and any("without example_inputs" in r.getMessage() for r in seen)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]


def test_conv1d_counts_agree_with_the_flop_counter():
    model = nn.Sequential(nn.Conv1d(16, 16, 3), nn.ReLU(), nn.Conv1d(16, 8, 5, stride=2, padding=2)).eval()
    x = torch.randn(2, 16, 100)
    rep = sas_compile.report(model, (x,), M=(4,))
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert rep.totals["base"]["mults"] == counter.get_total_flops() // 2
    first = rep.layers[0]
    assert first["base"]["mults"] == 2 * 98 * 16 * 16 * 3  # 98 output positions per sequence
    # SWS at M=4: the input stays (raw network input), the output doubles, fan-in 16*3 per output
    assert first["sws"][4]["mults"] == 2 * 98 * 32 * 16 * 3 and first["sws"][4]["out_features"] == 32


def test_sws_of_attention_with_a_fused_qkv_projection():
    x = torch.randn(2, 5, 16)
    sws = sas_compile.swsify(FusedQKV(), M=4, example_inputs=x)
    assert sws(x).shape == (2, 5, 16)
    assert sas_compile.report(FusedQKV(), (x,), M=(4,)).totals["sws"][4]["mults"] > 0
    assert "qkv" in str(sas_compile.inspect_model(FusedQKV(), (x,)))


@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead", "default"])
def test_compile_accepts_torch_compile_modes(mode, monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module
    from torch._inductor import list_mode_options

    real, patches = compile_fx_module.compile_fx, []

    def recording(gm, example_inputs, config_patches=None, **kwargs):
        patches.append(config_patches or {})
        return real(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", recording)
    torch._dynamo.reset()
    model = mlp()
    compiled = torch.compile(model, backend="sas", mode=mode)
    x = torch.randn(3, 16)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    # the mode reaches inductor, the backend's inner compiler, as the options it stands for
    assert patches and patches[0] == ({} if mode == "default" else list_mode_options(mode))


def test_eval_inference_without_no_grad_is_not_refused():
    torch._dynamo.reset()
    model = mlp()
    out = torch.compile(model, backend="sas", options={"inner": "eager"})(torch.randn(2, 16))
    assert out.shape == (2, 4)


def test_readme_submodules_are_attributes_after_import():
    proc = subprocess.run([sys.executable, "-c", "import sas_compile; "
                           "print(sas_compile.accounting.linear_costs(288, 64, 8)['sws'][8]['mults'])"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "18440", proc.stderr


def test_every_name_readme_writes_resolves_after_import_sas_compile():
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    names = sorted(set(re.findall(r"sas_compile(?:\.[A-Za-z_]\w*)+", readme)))
    assert "sas_compile.runtime.autotune.explain" in names
    script = ("import functools, sas_compile\n"
              f"for name in {names!r}:\n"
              "    functools.reduce(getattr, name.split('.')[1:], sas_compile)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_compiled_backward_into_dense_weights_is_refused_when_it_runs():
    from sas_compile.backend import SASTrainingError

    torch._dynamo.reset()
    model = mlp().train()
    compiled = torch.compile(model, backend="sas", options={"inner": "aot_eager"})
    out = compiled(torch.randn(4, 16))  # the joint graph is traced: nothing raises yet
    with pytest.raises(SASTrainingError, match="sasify"):
        out.square().sum().backward()


def test_a_registered_index_rule_reaches_sasify_and_the_backend():
    from sas_compile.runtime import projection

    class FlippedRule(projection.SignPatternRule):
        """The sign rule with its slots swapped: slot 0 = max(-x, 0)."""

        name = "flipped"

        def slot(self, x, dim):
            return 1 - super().slot(x, dim)

        def encodes_positive(self, channels):
            return ~super().encodes_positive(channels)

    projection.register_rule("flipped", FlippedRule)
    try:
        model = mlp()
        x = torch.randn(5, 16)
        sas = sas_compile.sasify(model, M=2, rule="flipped", dense_input_layers=False)
        assert {m.rule for m in sas.modules() if hasattr(m, "rule")} == {"flipped"}
        torch.testing.assert_close(sas(x), model(x), rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        with torch.no_grad():
            out = torch.compile(model, backend="sas", options={"rule": "flipped", "inner": "eager",
                                                               "dense_input_layers": False})(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    finally:
        projection._RULES.pop("flipped", None)


def test_a_sasified_training_step_keeps_only_narrow_activations():
    """Autograd holds what the dense model holds: the projection is recomputed in the backward."""
    def saved_activation_bytes(model, x):
        params = {p.data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.data_ptr() not in params:
                seen[t.data_ptr()] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).square().mean().backward()
        return sum(seen.values())

    from sas_compile.models import resnet18

    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                               nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    # residual blocks: a ReLU folded into the next block's conv is still read by the identity path
    residual = resnet18(width=8)
    x = torch.randn(4, 3, 8, 8)
    for dense in (sequential, residual):
        for M in (2, 4):
            sas = sas_compile.sasify(dense, M=M)
            assert saved_activation_bytes(sas, x) <= saved_activation_bytes(dense, x)


def _entry_points():
    x = torch.randn(2, 4)
    return {
        "sasify": lambda m: sas_compile.sasify(m, M=2),
        "swsify": lambda m: sas_compile.swsify(m, M=4, example_inputs=(x,)),
        "swatify": lambda m: sas_compile.swatify(m, sparsity=0.5),
        "report": lambda m: sas_compile.report(m, (x,)),
        "inspect_model": lambda m: sas_compile.inspect_model(m, (x,)),
    }


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.script's own
@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("wrap, error, match", [
    (torch.jit.script, TypeError, "TorchScript module .* convert the nn.Module before torch.jit.script"),
    (nn.DataParallel, TypeError, r"DataParallel wrapper: pass the model it wraps \(model.module\)"),
    (torch.compile, TypeError, r"torch.compile wrapper \(OptimizedModule\): pass the model it compiles "
                               r"\(model._orig_mod\)"),
    (None, ValueError, r"lazy layers without shapes yet \(0\): run the model once"),
])
def test_models_no_entry_point_can_take_say_what_to_do(entry, wrap, error, match):
    if wrap is None:
        model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    else:
        model = wrap(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    with pytest.raises(error, match=match):
        _entry_points()[entry](model)


def test_hooks_and_buffers_of_the_model_itself_stay_as_they_were_on_a_rewritten_graph():
    """A GraphModule built from a capture left out the hooks of the model's root: a forward hook
    that scales the output, or a pre-hook that shifts the input, is part of its function. The
    result gets copies (a handle from the original removes the hook there only). And it made
    every buffer persistent: a checkpoint without the non-persistent ones did not load. swsify's
    module swap (the user's class) keeps both as well."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 12), nn.Linear(12, 3)
            self.register_buffer("offset", torch.full((6,), 0.5, dtype=torch.float64), persistent=False)

        def forward(self, x):
            return self.b(F.relu(self.a(x + self.offset)))  # the functional ReLU folds: a rewritten graph

    class NamedWidth(Net):
        def forward(self, x):  # a reshape naming a width: swsify rewrites the graph too
            return self.b(F.relu(self.a(x + self.offset)).reshape(-1, 12))

    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=torch.float64)
    for cls in (Net, NamedWidth):
        model = cls().double()
        scale = model.register_forward_hook(lambda mod, inp, out: out * 10)
        model.register_forward_pre_hook(lambda mod, inp: (inp[0] + 1,))
        sas = sas_compile.sasify(model, M=2)
        sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
        assert sws.a.out_features == 24  # widened
        assert isinstance(sas, torch.fx.GraphModule) == (cls is Net)  # sasify folds Net's ReLU into b
        assert isinstance(sws, torch.fx.GraphModule) == (cls is NamedWidth)
        for converted in (sas, sws):
            assert "offset" in dict(converted.named_buffers()) and "offset" not in converted.state_dict()
        assert set(sas.state_dict()) == set(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(sas(x), model(x), rtol=1e-10, atol=1e-12)
            hooked_sws = sws(x)
        scale.remove()
        with torch.no_grad():
            torch.testing.assert_close(sas(x), model(x) * 10, rtol=1e-10, atol=1e-12)  # still hooked
            sws._forward_hooks.clear()
            sws._forward_pre_hooks.clear()
            torch.testing.assert_close(hooked_sws, sws(x + 1) * 10, rtol=1e-10, atol=1e-12)


def test_hooks_on_a_converted_layer_keep_running():
    """A module swap gives the SAS (or SWAT) layer the hooks of the layer it replaces."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    seen = []
    model[2].register_forward_pre_hook(lambda mod, args: seen.append(("pre", tuple(args[0].shape))))
    model[2].register_forward_hook(lambda mod, args, out: seen.append(("post", tuple(out.shape))))
    model[2].register_full_backward_hook(lambda mod, gin, gout: seen.append(("backward", tuple(gout[0].shape))))
    x = torch.randn(5, 4, requires_grad=True)
    for convert in (lambda m: sas_compile.sasify(m, M=2), lambda m: sas_compile.swatify(m, sparsity=0.5)):
        seen.clear()
        new = convert(model).train()
        assert type(new[2]) is not nn.Linear
        new(x).sum().backward()
        assert seen == [("pre", (5, 8)), ("post", (5, 3)), ("backward", (5, 3))]


def test_a_layer_whose_forward_is_replaced_on_the_instance_stays_dense():
    """accelerate and other tools replace ``module.forward`` on the instance: a swap would drop it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    stock = model[2].forward
    model[2].forward = lambda x: stock(x) * 2  # the wrapper a tool installs
    x = torch.randn(5, 4)
    sas = sas_compile.sasify(model, M=2)
    assert type(sas[2]) is nn.Linear and "replaced on the instance" in sas.sas_plan.layers[1].reason
    torch.testing.assert_close(sas(x), model(x))
    swat = sas_compile.swatify(model, sparsity=0.5)
    assert type(swat[2]) is nn.Linear


def test_a_dense_checkpoint_into_a_sas_model_says_what_works():
    dense = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Conv1d(5, 3, 1))
    sas = sas_compile.sasify(dense, M=4, example_inputs=(torch.randn(2, 4, 5).transpose(1, 2),))
    with pytest.raises(RuntimeError) as info:
        sas.load_state_dict(dense.state_dict())
    text = str(info.value)
    assert "2.weight has the dense layer's shape (5, 6), not this M=4 SAS layer's (5, 24)" in text
    assert "4.weight has the dense layer's shape (3, 5, 1)" in text and "sasify that" in text
    assert "size mismatch" not in text and "Missing key" not in text
    sas.load_state_dict(sas_compile.sasify(dense, M=4, example_inputs=(torch.randn(2, 4, 5).transpose(1, 2),))
                        .state_dict())  # a SAS checkpoint loads


def test_sasify_says_when_the_result_is_a_graph_module_and_not_the_users_class(caplog):
    class Net(nn.Module):
        def __init__(self, functional: bool):
            super().__init__()
            self.functional = functional
            self.a, self.act, self.b, self.c = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            relu = F.relu if self.functional else self.act
            return self.c(torch.tanh(self.b(relu(self.a(x)))))

        def predict(self, x):
            return self(x).argmax(-1)

    x = torch.randn(4, 8)
    with caplog.at_level("WARNING", logger="sas_compile"):
        kept = sas_compile.sasify(Net(False), M=2)
    assert isinstance(kept, Net) and kept.predict(x).shape == (4,) and not caplog.records
    with caplog.at_level("WARNING", logger="sas_compile"):
        graph = sas_compile.sasify(Net(True), M=2)
    assert isinstance(graph, torch.fx.GraphModule)
    (record,) = caplog.records
    assert "not Net: b (its ReLU, folded into it, is a function call" in record.getMessage()
    assert "its own methods, predict, are not on the result" in record.getMessage()
    assert "sasify(..., fold_relu=False)" in record.getMessage()  # the remedy it names works:
    caplog.clear()
    dense = Net(True)
    with caplog.at_level("WARNING", logger="sas_compile"):
        unfolded = sas_compile.sasify(dense, M=2, fold_relu=False)
    assert isinstance(unfolded, Net) and unfolded.predict(x).shape == (4,) and not caplog.records
    with torch.no_grad():
        torch.testing.assert_close(unfolded(x), dense(x))
