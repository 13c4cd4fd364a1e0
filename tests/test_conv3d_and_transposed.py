"""3-D convolutions convert to SAS; transposed convolutions are counted; unbatched inputs run.

Before: ``nn.Conv3d`` and ``F.conv3d`` stayed dense ("not supported"), and the report counted
no multiplies for them or for any transposed convolution (a 3-D CNN's report said its mults were
its linear head's); swsify could not follow a conv3d; and a SAS convolution given an unbatched
input (``[C, H, W]``, which ``nn.Conv2d`` takes) raised, because the op projects along dim 1.

A SAS conv3d is the ``sas::conv2d`` op with a 5-D weight (``F.conv3d`` on the projected input,
one ``convolution_backward`` for the gradients). Every check is in float64 on random inputs of
ragged sizes against the reference formulation: the reference code's zero-filled projection
(``reference_project``) followed by ``F.conv3d`` with the wide weight.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.runtime.layers import SASConv3d
from sas_compile.runtime.projection import reference_project

DT = torch.float64

CONV3D_CASES = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(2, 3, 1), padding="same", dilation=(1, 2, 1)),
    dict(kernel_size=3, stride=(2, 1, 2), padding=(1, 0, 1)),
    dict(kernel_size=1, stride=2),
    dict(kernel_size=3, padding=1, groups=2),
    dict(kernel_size=3, padding=(1, 2, 1), padding_mode="reflect"),
    dict(kernel_size=(3, 2, 3), padding="same", padding_mode="circular"),
    dict(kernel_size=2, padding="valid", bias=False),
]
IDS = ["k3 p1", "same even dilated", "strided", "1x1x1 stride 2", "groups", "reflect", "circular same", "valid"]


def _net(**conv):
    return nn.Sequential(nn.Conv3d(3, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(), nn.Conv3d(6, 4, **conv),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 5)).to(DT).eval()


def _reference(layer: SASConv3d, x: torch.Tensor) -> torch.Tensor:
    """The SAS conv3d by the reference formulation: pad as the dense layer would, project, convolve."""
    padding = layer.padding
    if layer.padding_mode != "zeros":
        x = F.pad(x, layer._mode_pad, mode=layer.padding_mode)
        padding = 0
    return F.conv3d(reference_project(x, layer.M, 1), layer.weight, layer.bias, layer.stride, padding,
                    layer.dilation, layer.groups)


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("conv", CONV3D_CASES, ids=IDS)
def test_sasify_converts_conv3d_function_preserving(conv, M):
    torch.manual_seed(0)
    dense = _net(**conv)
    with torch.no_grad():  # running statistics other than 0 and 1
        dense[1].running_mean.uniform_(-0.5, 0.5)
        dense[1].running_var.uniform_(0.5, 2.0)
    sas = sas_compile.sasify(dense, M=M)
    assert isinstance(sas[3], SASConv3d) and isinstance(sas, nn.Sequential)
    assert sas[3].weight.shape == (4, 6 // conv.get("groups", 1) * M, *dense[3].weight.shape[2:])
    x = torch.randn(2, 3, 7, 6, 9, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("conv", CONV3D_CASES, ids=IDS)
def test_conv3d_forward_and_gradients_match_the_reference(conv, M):
    torch.manual_seed(1)
    layer = SASConv3d(6, 4, M=M, dtype=DT, **conv)
    with torch.no_grad():
        layer.weight.normal_()
    x = torch.randn(3, 6, 5, 7, 6, dtype=DT, requires_grad=True)
    out = layer(x)
    want = _reference(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    got = torch.autograd.grad(out, params, g)
    expected = torch.autograd.grad(want, params, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv3d_under_torch_func_and_export():
    torch.manual_seed(2)
    layer = SASConv3d(4, 3, 3, M=2, padding=1, dtype=DT)
    x = torch.randn(2, 4, 4, 5, 3, dtype=DT)
    tangent = torch.randn_like(x)
    _, jvp = torch.func.jvp(layer, (x,), (tangent,))
    _, want = torch.func.jvp(lambda t: _reference(layer, t), (x,), (tangent,))
    torch.testing.assert_close(jvp, want, rtol=1e-12, atol=1e-12)
    exported = torch.export.export(layer, (x,)).module()
    x2 = torch.randn(2, 4, 4, 5, 3, dtype=DT)  # export specialises the shapes
    with torch.no_grad():
        torch.testing.assert_close(exported(x2), _reference(layer, x2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_backend_converts_conv3d(inner, monkeypatch):
    from sas_compile import backend

    plans = []
    explain = backend._explain
    monkeypatch.setattr(backend, "_explain", lambda plan, *a: plans.append(plan) or explain(plan, *a))
    torch._dynamo.reset()
    torch.manual_seed(3)
    dense = _net(kernel_size=3, padding=1, stride=(1, 2, 1))
    x = torch.randn(2, 3, 5, 6, 7, dtype=DT)
    compiled = torch.compile(dense, backend="sas", options={"inner": inner, "M": 4, "explain": True})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()
    (plan,) = plans
    assert [(layer.op, layer.eligible) for layer in plan.layers] == [("conv3d", False), ("conv3d", True),
                                                                      ("linear", True)]
    ops = [n.target for n in plan.gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.sas.conv2d_from_dense.default) == 1


def test_unbatched_inputs_run_through_sas_convolutions():
    torch.manual_seed(4)
    cases = [
        (nn.Sequential(nn.Conv1d(3, 4, 3), nn.ReLU(), nn.Conv1d(4, 5, 3, padding="same")), (3, 11)),
        (nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2)), (3, 9, 8)),
        (nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU(), nn.Conv3d(4, 5, 2, padding=1, padding_mode="replicate")),
         (3, 5, 6, 7)),
    ]
    for dense, shape in cases:
        dense = dense.to(DT).eval()
        x = torch.randn(shape, dtype=DT)
        sas = sas_compile.sasify(dense, M=2)
        assert sum(layer.eligible for layer in sas.sas_plan.layers) == 1
        torch._dynamo.reset()
        compiled = torch.compile(dense, backend="sas", options={"inner": "eager"})
        with torch.no_grad():
            want = dense(x)
            torch.testing.assert_close(sas(x), want, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(compiled(x), want, rtol=1e-10, atol=1e-12)
            # the unbatched result is the batched one's only sample
            torch.testing.assert_close(sas(x.unsqueeze(0)).squeeze(0), want, rtol=1e-10, atol=1e-12)
        # and it trains: the gradient of the unbatched call is the batch-of-one call's
        sas.train()
        x1 = x.clone().requires_grad_(True)
        sas(x1).sum().backward()
        x2 = x.unsqueeze(0).requires_grad_(True)
        grad_w = sas[2].weight.grad.clone()
        sas.zero_grad()
        sas(x2).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad.squeeze(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad_w, sas[2].weight.grad, rtol=1e-12, atol=1e-12)


def test_report_counts_conv3d_and_transposed_convolutions():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Conv3d(2, 6, 3, padding=1)
            self.mid = nn.Conv3d(6, 8, 3, stride=2, padding=1)
            self.up = nn.ConvTranspose3d(8, 4, 2, stride=2)
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))  # conv_transpose2d: [in, out, kh, kw]

        def forward(self, x):
            h = self.up(F.relu(self.mid(F.relu(self.enc(x)))))
            return F.conv_transpose2d(h.mean(2), self.w, padding=1)

    model = Decoder().eval()
    x = torch.randn(2, 2, 4, 6, 8)
    report = sas_compile.report(model, (x,), M=(2,))
    rows = {r["name"]: r for r in report.layers}
    # mults: output positions (input positions for a transposed convolution) x weight values
    expected = {
        "enc": 2 * 4 * 6 * 8 * (6 * 2 * 27),
        "mid": 2 * 2 * 3 * 4 * (8 * 6 * 27),
        "up": 2 * 2 * 3 * 4 * (8 * 4 * 8),
        "w": 2 * 6 * 8 * (4 * 3 * 9),  # up gives [2, 4, 4, 6, 8]; its mean over depth is the input
    }
    for name, mults in expected.items():
        assert rows[name]["base"]["mults"] == mults, name
    assert rows["mid"]["op"] == "conv3d" and rows["mid"]["eligible"]
    assert rows["mid"]["sas"][2]["params"] == 2 * 8 * 6 * 27 + 8
    for name in ("up", "w"):  # counted, kept dense by SAS and SWS alike
        row = rows[name]
        assert not row["eligible"] and "not supported" in row["reason"]
        assert row["sas"][2] == row["base"]
        assert row["sws"][2]["mults"] == row["base"]["mults"]
        assert row["sws"][2]["params"] == row["base"]["params"]
    assert report.totals["base"]["mults"] == report.totals["sas"][2]["mults"] == sum(expected.values())
    plan = sas_compile.sasify(model, M=2).sas_plan
    up = next(layer for layer in plan.layers if layer.name == "up")
    assert (up.in_channels, up.out_channels, up.kernel_size) == (8, 4, (2, 2, 2))


def test_swsify_widens_through_conv3d():
    torch.manual_seed(5)
    dense = _net(kernel_size=3, padding=1)
    x = torch.randn(2, 3, 5, 4, 6, dtype=DT)
    sws = sas_compile.swsify(dense, M=4, example_inputs=(x,))
    masked = [layer for layer in sws.sparsify_plan.layers if layer.eligible]
    assert [layer.op for layer in masked] == ["conv3d", "linear"]
    convs = [m for m in sws.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [12, 8]  # sqrt(4) = 2x wider
    assert sws(x).shape == (2, 5)
    weight = sws.get_submodule("3").weight  # the 1:M masked weight: one of every 4 values kept
    assert int((weight != 0).sum()) == weight.numel() // 4
