"""TorchScript: ``torch.jit.trace`` and ``torch.jit.script`` of converted models.

A SAS model scripts and traces into graphs that call the ``sas::`` ops, saves with
``torch.jit.save`` and loads (in a process that imported sas_compile, which registers the ops)
into a module computing what the eager model computes, forward and backward. Before:
``torch.jit.script`` of any SAS layer failed inside TorchScript ("Unknown type annotation:
'int'"), ``torch.jit.trace`` of a ``padding='same'`` convolution failed with an internal assert
(the padding was computed from the weight's shape, which a trace records as tensors), an SWS
model in eval mode traced a cached product as a constant (the trace's sanity check failed) and
``torch.export`` of it failed on the cache's data pointer. Models TorchScript cannot compile
(SWS masks are ``parametrize`` parametrizations; SWAT's training step) refuse ``torch.jit.script``
with one error saying what works.

Every check is in float64 on random inputs against the eager model, which the other tests
check against the reference formulation.
"""
from __future__ import annotations

import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.sws import lower_sws

DT = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # TorchScript's own


def _roundtrip(module):
    """``torch.jit.save`` then ``torch.jit.load``."""
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer)


def _trace(model, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(model, x)


def _layers():
    """(name, dense model, input): one SAS layer of each kind after a dense input layer, ragged sizes."""
    conv = lambda *a, **k: nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, *a, **k))  # noqa: E731
    conv1 = lambda *a, **k: nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU(), nn.Conv1d(6, *a, **k))  # noqa: E731
    image, seq = (2, 3, 11, 9), (2, 3, 13)
    return [
        ("linear on [B, T, C]", nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 7)), (2, 3, 5)),
        ("conv2d stride 2", conv(5, 3, stride=2, padding=1), image),
        ("conv2d same, even kernel, dilation", conv(5, 4, padding="same", dilation=2), image),
        ("conv2d valid, groups", conv(4, (3, 2), padding="valid", groups=2), image),
        ("conv2d 1x1 stride 2", conv(5, 1, stride=2), image),
        ("conv2d reflect", conv(5, 3, padding=1, padding_mode="reflect"), image),
        ("conv2d circular same", conv(5, (2, 3), padding="same", padding_mode="circular"), image),
        ("conv2d replicate", conv(5, 3, padding=(2, 1), padding_mode="replicate"), image),
        ("conv1d same, even kernel", conv1(5, 4, padding="same"), seq),
        ("conv1d stride, dilation", conv1(5, 3, stride=2, dilation=2, padding=2), seq),
        ("conv1d reflect", conv1(5, 3, padding=1, padding_mode="reflect"), seq),
    ]


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("name,dense,shape", _layers(), ids=[case[0] for case in _layers()])
def test_sas_layers_script_and_trace(name, dense, shape, how, M):
    torch.manual_seed(0)
    dense = dense.to(DT).eval()
    sas = sas_compile.sasify(dense, M=M)
    assert sum(layer.eligible for layer in sas.sas_plan.layers) == 1  # the second layer; the input layer stays dense
    x = torch.randn(shape, dtype=DT)
    compiled = torch.jit.script(sas) if how == "script" else _trace(sas, x)
    loaded = _roundtrip(compiled)
    x2 = torch.randn(shape, dtype=DT)
    with torch.no_grad():
        want = sas(x2)
        torch.testing.assert_close(want, dense(x2), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(compiled(x2), want, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x2), want, rtol=0, atol=0)
    op = "sas::linear" if name.startswith("linear") else "sas::conv2d"
    assert op in str(loaded.inlined_graph)  # the SAS op itself, not a dense formulation
    # the loaded module trains: its gradients are the eager model's
    grads = []
    for model in (sas, loaded):
        model.zero_grad(set_to_none=True)
        x3 = x2.clone().requires_grad_(True)
        (model(x3) * torch.linspace(-1, 2, want.numel(), dtype=DT).view_as(want)).sum().backward()
        grads.append([x3.grad] + [p.grad for p in model.parameters()])
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


class _Functional(nn.Module):
    """Functional ReLUs folded into the next layer and a dropout that reads ``self.training``:
    sasify's result is a rewritten GraphModule with a mode-following value."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(6, 5, 4, padding="same")
        self.w = nn.Parameter(torch.randn(4, 5))

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))
        h = F.dropout(h, 0.5, training=self.training)
        return F.linear(F.relu(h.mean((2, 3))), self.w)


def test_rewritten_graph_scripts_and_follows_the_mode():
    torch.manual_seed(0)
    dense = _Functional().to(DT).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the GraphModule warning
        sas = sas_compile.sasify(dense, M=2)
    assert isinstance(sas, torch.fx.GraphModule)
    loaded = _roundtrip(torch.jit.script(sas))
    x = torch.randn(2, 3, 9, 10, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), dense(x), rtol=1e-10, atol=1e-10)
        loaded.train()
        torch.manual_seed(3)
        trained = loaded(x)
        sas.train()
        torch.manual_seed(3)
        torch.testing.assert_close(trained, sas(x), rtol=1e-12, atol=1e-12)  # the same dropout draw
        assert not torch.allclose(trained, dense(x))  # dropout is on in training mode
    # the eager model still works after scripting (TorchScript put typed mode values in its place)
    sas.eval()
    with torch.no_grad():
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-10, atol=1e-10)


def _mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).to(DT).eval()


@pytest.mark.parametrize("freeze_mask", [False, True])
def test_sws_traces_and_exports_in_eval_mode(freeze_mask):
    torch.manual_seed(0)
    x = torch.randn(5, 6, dtype=DT)
    sws = sas_compile.sparsify(_mlp(), sas_compile.SWSConfig(M=4, freeze_mask=freeze_mask),
                               example_inputs=(x,)).eval()
    x2 = torch.randn(5, 6, dtype=DT)
    with torch.no_grad():
        want = sws(x2)  # fills the eval-mode cache: neither capture below may read it
        traced = _roundtrip(_trace(sws, x))
        torch.testing.assert_close(traced(x2), want, rtol=0, atol=0)
        exported = torch.export.export(sws, (x,)).module()
        torch.testing.assert_close(exported(x2), want, rtol=1e-12, atol=1e-12)
    # the trace computes the mask from the weight it is given, as the eager model does
    with torch.no_grad():
        for name, parameter in traced.named_parameters():
            if name.endswith("original"):
                parameter.mul_(-1.5)
        for name, parameter in sws.named_parameters():
            if name.endswith("original"):
                parameter.mul_(-1.5)
        torch.testing.assert_close(traced(x2), sws(x2), rtol=0, atol=0)


def test_swat_traces_in_eval_mode():
    torch.manual_seed(0)
    swat = sas_compile.swatify(_mlp(), sparsity=0.5).eval()
    x = torch.randn(5, 6, dtype=DT)
    traced = _roundtrip(_trace(swat, x))  # with gradients on: the plain relu in both of the trace's runs
    with torch.no_grad():
        torch.testing.assert_close(traced(x), swat(x), rtol=0, atol=0)


def test_unscriptable_models_say_what_works():
    x = torch.randn(5, 6, dtype=DT)
    sws = sas_compile.swsify(_mlp(), M=4, example_inputs=(x,))
    with pytest.raises(TypeError, match=r"cannot compile an SWS model.*torch\.jit\.trace.*remove_parametrizations"):
        torch.jit.script(sws)
    with pytest.raises(TypeError, match=r"cannot compile a SWAT model.*torch\.jit\.trace"):
        torch.jit.script(sas_compile.swatify(_mlp(), sparsity=0.5))
    lowered = lower_sws(sas_compile.swsify(_mlp(), M=4, example_inputs=(x,)).eval())
    with pytest.raises(TypeError, match=r"cannot compile a packed SWS layer.*torch\.jit\.trace"):
        torch.jit.script(lowered)
    with torch.no_grad():
        torch.testing.assert_close(_trace(lowered, x)(x), lowered(x), rtol=0, atol=0)


def test_a_fresh_process_loads_saved_sas_models(tmp_path):
    """What a deployment does: save a scripted, a traced and an exported SAS model, then load and run
    them in a new process that imports ``sas_compile.layers`` (which registers the ``sas::`` ops)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 3, padding="same"), nn.ReLU(),
                          nn.ConvTranspose2d(4, 3, 2, stride=2), nn.Flatten(), nn.ReLU(), nn.Linear(3 * 14 * 14, 5))
    sas = sas_compile.sasify(dense.to(DT).eval(), M=2)
    x = torch.randn(2, 3, 9, 9, dtype=DT)
    torch.jit.save(torch.jit.script(sas), tmp_path / "scripted.pt")
    torch.jit.save(_trace(sas, x), tmp_path / "traced.pt")
    torch.export.save(torch.export.export(sas, (x,)), tmp_path / "exported.pt2")
    torch.save({"x": x, "want": sas(x).detach()}, tmp_path / "io.pt")
    code = f"""
import torch, sas_compile.layers
io = torch.load({str(tmp_path / "io.pt")!r})
for name in ("scripted.pt", "traced.pt"):
    got = torch.jit.load({str(tmp_path)!r} + "/" + name)(io["x"])
    torch.testing.assert_close(got, io["want"], rtol=0, atol=0)
got = torch.export.load({str(tmp_path / "exported.pt2")!r}).module()(io["x"])
torch.testing.assert_close(got, io["want"], rtol=1e-12, atol=1e-12)
print("loaded")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-3000:]
