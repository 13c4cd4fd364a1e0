"""Modules and ops that run their projections inside one call (RNNs, bilinear layers, attention,
the encoder layer's inference fast path): every entry point lists them dense with a reason that
says what each entry point does, and the layers around them convert exactly.

Dynamo keeps ``F.multi_head_attention_forward``, ``torch.bilinear``, the RNN ops and
``torch._transformer_encoder_layer_fwd`` whole, so the backend's graphs hold them as single
calls: before, those calls were missing from its plan (the explain output said "3 of 3 layers
converted" for a model with two attention blocks), and the plans of the other entry points said
the backend converted their projections, which it never did.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sas_compile
from sas_compile import backend


class Mixed(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.rnn = nn.LSTM(8, 8, batch_first=batch_first)
        self.bil = nn.Bilinear(8, 8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=batch_first)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.rnn(self.inp(x))[0]
        h = self.bil(h, h)
        h = self.attn(h, h, h)[0]
        return self.out(self.enc(h).relu())


def _backend_plan(model, x, monkeypatch, grad: bool):
    plans = []
    explain = backend._explain
    monkeypatch.setattr(backend, "_explain", lambda plan, *a: plans.append(plan) or explain(plan, *a))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    with torch._dynamo.config.patch(allow_rnn=True), torch.set_grad_enabled(grad):
        got, want = compiled(x), model(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (plan,) = plans
    return {layer.name: layer for layer in plan.layers}


def test_the_plan_says_what_each_entry_point_does_with_them():
    torch.manual_seed(0)
    model = Mixed(batch_first=False).eval()
    x = torch.randn(5, 2, 8)
    layers = {layer.name: layer for layer in sas_compile.sasify(model, M=2).sparsify_plan.layers}
    assert not any(layers[name].eligible for name in ("rnn", "bil", "attn", "enc")) and layers["out"].eligible
    reasons = {name: layers[name].reason for name in ("rnn", "bil", "attn", "enc")}
    assert "allow_rnn" in reasons["rnn"] and "sasify converts the layers around it" in reasons["rnn"]
    assert "bilinear layer" in reasons["bil"]
    assert "F.multi_head_attention_forward" in reasons["attn"] and "keeps whole" in reasons["attn"]
    assert "feed-forward linears" in reasons["enc"] and "fast path" in reasons["enc"]
    # no plan claims that the backend converts an RNN's, a bilinear layer's or attention's projections
    assert not any("converts its projections" in reason for reason in reasons.values())
    rep = sas_compile.report(model, (x,), M=(2,))
    # the report counts attention's and the encoder layer's projections (torch.export shows them),
    # each kept dense as sasify keeps it; an RNN and a bilinear layer are parameters-only rows
    rows = {row["name"]: row for row in rep.layers}
    assert {"attn.in_proj_weight", "attn.out_proj", "enc.linear1", "enc.linear2"} <= set(rows)
    assert all(rows[name]["base"]["mults"] > 0 and "inside attn" in rows[name]["reason"]
               for name in ("attn.in_proj_weight", "attn.out_proj"))
    assert {"rnn", "bil"} <= {row["name"] for row in rep.parameters}
    assert rep.totals["base"]["params"] == sum(p.numel() for p in model.parameters())


def test_report_counts_what_swsify_builds_through_attention():
    """The SWS columns count the model swsify builds: it widens through nn.MultiheadAttention (export
    shows its projections), where the report's traced graph kept the attention's widths (the report
    said 6.9K SWS mults and 3.4K params for a model swsify built with 23.3K and 8.8K)."""
    from sas_compile.sws import measure_sws_model

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.attn = nn.Linear(8, 16), nn.MultiheadAttention(16, 2, batch_first=True)
            self.up, self.down, self.out = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.attn(h, h, h)[0]
            return self.out(h + self.down(torch.relu(self.up(h))))

    torch.manual_seed(0)
    model, x = Encoder().eval(), torch.randn(2, 5, 8)
    rep = sas_compile.report(model, (x,), M=(4,))
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    measured = measure_sws_model(sws, (x,))
    assert rep.totals["sws"][4]["mults"] == sum(layer["mults"] for layer in measured.values())
    assert rep.totals["sws"][4]["params"] == sum(p.numel() for p in sws.parameters())
    assert rep.totals["base"]["mults"] == 2 * 5 * (8 * 16 + 16 * 48 + 16 * 16 + 16 * 32 + 32 * 16 + 16 * 3)
    sas = sas_compile.sasify(model, M=4, example_inputs=(x,))
    assert rep.totals["sas"][4]["params"] == sum(p.numel() for p in sas.parameters())


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_backend_lists_ops_that_hold_projections(monkeypatch, grad):
    torch.manual_seed(0)
    model = Mixed(batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    layers = _backend_plan(model, x, monkeypatch, grad)
    assert layers["rnn"].op == "lstm" and not layers["rnn"].eligible and "allow_rnn" in layers["rnn"].reason
    assert layers["bil"].op == "bilinear" and "bilinear layer" in layers["bil"].reason
    assert layers["attn"].op == "multiheadattention" and "keeps whole" in layers["attn"].reason
    assert layers["out"].eligible
    if grad:  # the encoder layer runs its Python code: its feed-forward linears convert
        assert layers["enc.linear1"].eligible and layers["enc.linear2"].eligible
        assert not layers["enc.self_attn"].eligible and "keeps whole" in layers["enc.self_attn"].reason
    else:  # PyTorch's inference fast path: one fused op for the whole encoder layer
        assert "enc.linear1" not in layers
        assert layers["enc"].op == "transformerencoderlayer"
        assert "_transformer_encoder_layer_fwd" in layers["enc"].reason
    assert {name for name, layer in layers.items() if layer.eligible} == (
        {"out", "enc.linear1", "enc.linear2"} if grad else {"out"})


def test_a_bare_opaque_op_is_named_after_its_function(monkeypatch):
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 4)
            self.w = nn.Parameter(torch.randn(6, 6, 6) * 0.1)

        def forward(self, x):
            h = self.a(x).relu()
            return self.b(torch.bilinear(h, h, self.w).relu())

    torch.manual_seed(0)
    layers = _backend_plan(Functional().eval(), torch.randn(3, 6), monkeypatch, grad=False)
    (bilinear,) = [layer for layer in layers.values() if layer.op == "bilinear"]
    assert not bilinear.eligible and bilinear.module_target is None and bilinear.reason.startswith("bilinear:")
    assert layers["b"].eligible
