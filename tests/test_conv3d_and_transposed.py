"""3-D and transposed convolutions convert to SAS; unbatched inputs run.

Before: ``nn.Conv3d``, ``F.conv3d`` and every transposed convolution stayed dense ("not
supported"), and the report counted no multiplies for them (a 3-D CNN's report said its mults
were its linear head's); swsify could not follow a conv3d; and a SAS convolution given an
unbatched input (``[C, H, W]``, which ``nn.Conv2d`` takes) raised, because the op projects along
dim 1.

A SAS conv3d is the ``sas::conv2d`` op with a 5-D weight (``F.conv3d`` on the projected input,
one ``convolution_backward`` for the gradients); a SAS transposed convolution is
``sas::conv_transpose``, whose weight ``[M * in, out/groups, *kernel]`` widens dim 0. Every
check is in float64 on random inputs of ragged sizes against the reference formulation: the
reference code's zero-filled projection (``reference_project``) followed by the dense op with
the wide weight.
"""
from __future__ import annotations

import copy

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
    assert [rows[n]["op"] for n in expected] == ["conv3d", "conv3d", "conv_transpose3d", "conv_transpose2d"]
    assert not rows["enc"]["eligible"] and all(rows[n]["eligible"] for n in ("mid", "up", "w"))
    assert rows["mid"]["sas"][2]["params"] == 2 * 8 * 6 * 27 + 8
    assert rows["up"]["sas"][2]["params"] == 2 * 8 * 4 * 8 + 4
    assert rows["w"]["sas"][2]["params"] == 2 * 4 * 3 * 9
    # SWS widens and masks transposed convolutions too: up 8 -> 4 becomes 11 -> 6 (sqrt(2) wider,
    # rounded), 1:2 sparse; w reads up's output (4 -> 6) and writes the network output (3 stays)
    sws_up, sws_w = rows["up"]["sws"][2], rows["w"]["sws"][2]
    assert (sws_up["in_features"], sws_up["out_features"]) == (11, 6)
    assert sws_up["mults"] == 2 * 2 * 3 * 4 * -(-11 * 6 * 8 // 2)
    assert sws_up["params"] == 11 * 6 * 8 + 6 and sws_up["nonzero_params"] == 11 * 6 * 8 // 2 + 6
    assert (sws_w["in_features"], sws_w["out_features"]) == (6, 3)
    assert sws_w["mults"] == 2 * 6 * 8 * (6 * 3 * 9 // 2)
    assert report.totals["base"]["mults"] == report.totals["sas"][2]["mults"] == sum(expected.values())
    plan = sas_compile.sasify(model, M=2).sas_plan
    up = next(layer for layer in plan.layers if layer.name == "up")
    assert (up.in_channels, up.out_channels, up.kernel_size) == (8, 4, (2, 2, 2))


TRANSPOSED_CASES = [
    (nn.ConvTranspose1d, dict(kernel_size=3), (9,)),
    (nn.ConvTranspose1d, dict(kernel_size=4, stride=3, padding=2, output_padding=1, dilation=2), (7,)),
    (nn.ConvTranspose2d, dict(kernel_size=3, stride=2, padding=1, output_padding=1), (5, 7)),
    (nn.ConvTranspose2d, dict(kernel_size=(2, 3), groups=2, bias=False), (4, 6)),
    (nn.ConvTranspose2d, dict(kernel_size=1, stride=2), (5, 3)),
    (nn.ConvTranspose3d, dict(kernel_size=(2, 3, 2), stride=(2, 1, 2), padding=(0, 1, 1), groups=2), (3, 4, 5)),
]
TRANSPOSED_IDS = ["1d", "1d strided dilated output_padding", "2d output_padding", "2d groups", "2d 1x1 stride 2",
                  "3d groups"]


def _transposed_net(cls, conv):
    first = {nn.ConvTranspose1d: nn.Conv1d, nn.ConvTranspose2d: nn.Conv2d, nn.ConvTranspose3d: nn.Conv3d}[cls]
    return nn.Sequential(first(3, 6, 1), nn.ReLU(), cls(6, 4, **conv)).to(DT).eval()


@pytest.mark.parametrize("M", [2, 4])
@pytest.mark.parametrize("cls,conv,spatial", TRANSPOSED_CASES, ids=TRANSPOSED_IDS)
def test_transposed_convolutions_convert_and_match_the_reference(cls, conv, spatial, M):
    torch.manual_seed(6)
    dense = _transposed_net(cls, conv)
    sas = sas_compile.sasify(dense, M=M)
    layer = sas[2]
    assert type(layer).__name__ == "SAS" + cls.__name__ and isinstance(sas, nn.Sequential)
    assert layer.weight.shape == (6 * M, *dense[2].weight.shape[1:])
    assert sas[1].__class__ is nn.Identity  # the ReLU is folded into the SAS layer
    x = torch.randn(2, 3, *spatial, dtype=DT)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(sas(x[0]), dense(x[0]), rtol=1e-10, atol=1e-12)  # unbatched
        # forward(x, output_size): the largest size the stride allows (output_padding stride - 1)
        d = dense[2]
        size = [(n - 1) * st - 2 * p + dl * (k - 1) + 1 + (st - 1)
                for n, st, p, dl, k in zip(spatial, d.stride, d.padding, d.dilation, d.kernel_size)]
        torch.testing.assert_close(sas[2](sas[1](sas[0](x)), output_size=size),
                                   d(dense[1](dense[0](x)), output_size=size), rtol=1e-10, atol=1e-12)
    # the layer alone against the reference formulation: values and every gradient
    with torch.no_grad():
        layer.weight.normal_()  # no longer the expansion of a dense weight
    h = torch.randn(3, 6, *spatial, dtype=DT, requires_grad=True)
    out = layer(h)
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(spatial)]
    want = fn(reference_project(h, M, 1), layer.weight, layer.bias, layer.stride, layer.padding, layer.output_padding,
              layer.groups, layer.dilation)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [h, layer.weight] + ([layer.bias] if layer.bias is not None else [])
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_transposed_higher_order_and_nonfinite():
    torch.manual_seed(7)
    dense = _transposed_net(nn.ConvTranspose2d, dict(kernel_size=3, stride=2, padding=1))
    sas = sas_compile.sasify(dense, M=2)  # the ReLU folded: the negative slots' weight rows are zero
    layer = sas[2]
    z = torch.randn(2, 6, 4, 5, dtype=DT)
    z[0, 1, 2, 3] = -float("inf")
    with torch.no_grad():
        want = dense[2](torch.relu(z))  # relu(-inf) = 0: no NaN
        torch.testing.assert_close(layer(z), want, rtol=1e-12, atol=1e-12)
    z = torch.randn(2, 6, 4, 5, dtype=DT, requires_grad=True)
    ref = lambda t: dense[2](torch.relu(t))  # noqa: E731
    tangent = torch.randn_like(z)
    torch.testing.assert_close(torch.func.jvp(layer, (z,), (tangent,))[1], torch.func.jvp(ref, (z,), (tangent,))[1],
                               rtol=1e-12, atol=1e-12)
    # a gradient penalty: the second derivative through the layer's weight
    (gz,) = torch.autograd.grad(layer(z).square().sum(), z, create_graph=True)
    (penalty_w,) = torch.autograd.grad(gz.square().sum(), layer.weight)
    wide = layer.weight.detach().clone().requires_grad_(True)
    fn = lambda t: F.conv_transpose2d(reference_project(t, 2, 1), wide, layer.bias, 2, 1)  # noqa: E731
    (gz_ref,) = torch.autograd.grad(fn(z).square().sum(), z, create_graph=True)
    (penalty_ref,) = torch.autograd.grad(gz_ref.square().sum(), wide)
    torch.testing.assert_close(penalty_w, penalty_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("inner", ["eager", "aot_eager"])
def test_backend_converts_transposed_convolutions_of_a_dense_model(inner):
    torch.manual_seed(8)
    w = torch.randn(4, 5, 3, 3, dtype=DT)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv2d(3, 6, 1)
            self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
            self.w = nn.Parameter(w.clone())

        def forward(self, x):
            return F.conv_transpose2d(F.relu(self.up(F.relu(self.inp(x)))), self.w, padding=1)

    dense = Net().to(DT)
    x = torch.randn(2, 3, 5, 4, dtype=DT)
    torch._dynamo.reset()
    compiled = torch.compile(dense, backend="sas", options={"inner": inner})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-10, atol=1e-12)
        # the wide weights follow the dense ones: an in-place write (the version counter sees it),
        # and a write through .data after clear_wide_weight_cache(), as for every SAS op
        dense.w.mul_(0.5)
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-10, atol=1e-12)
        dense.up.weight.data.mul_(-2.0)
        sas_compile.runtime.sas_ops.clear_wide_weight_cache()
        torch.testing.assert_close(compiled(x), dense(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(sas_compile.runtime.sas_ops.SASTrainingError):
        compiled(x).sum().backward()
    # train_dense: the dense weights' gradients through the expansion are the dense model's
    torch._dynamo.reset()
    trained = torch.compile(dense, backend="sas", options={"inner": inner, "train_dense": True})
    x1 = x.clone().requires_grad_(True)
    trained(x1).square().sum().backward()
    got = [x1.grad] + [p.grad.clone() for p in dense.parameters()]
    dense.zero_grad()
    x2 = x.clone().requires_grad_(True)
    dense(x2).square().sum().backward()
    for a, b in zip(got, [x2.grad] + [p.grad for p in dense.parameters()]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch._dynamo.reset()


def test_weight_tied_between_a_conv_and_a_transposed_conv_stays_dense():
    class TiedAutoencoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Conv2d(3, 4, 1)
            self.enc = nn.Conv2d(4, 6, 3, stride=2)

        def forward(self, x):
            h = F.relu(self.enc(F.relu(self.inp(x))))
            return F.conv_transpose2d(h, self.enc.weight, stride=2)

    model = TiedAutoencoder().to(DT).eval()
    x = torch.randn(2, 3, 9, 9, dtype=DT)
    sas = sas_compile.sasify(model, M=2)
    layers = {layer.name: layer for layer in sas.sas_plan.layers}
    tied = [layer for name, layer in layers.items() if name.startswith("enc")]
    assert len(tied) == 2 and not any(layer.eligible for layer in tied)
    assert all("different ops" in layer.reason for layer in tied)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x), rtol=1e-10, atol=1e-12)


def test_transposed_layer_scripts_and_refuses_a_dense_checkpoint():
    torch.manual_seed(9)
    dense = _transposed_net(nn.ConvTranspose2d, dict(kernel_size=3, stride=2, output_padding=1))
    sas = sas_compile.sasify(dense, M=4)
    x = torch.randn(2, 3, 4, 5, dtype=DT)
    scripted = torch.jit.script(sas)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), dense(x), rtol=1e-10, atol=1e-12)
    assert "sas::conv_transpose" in str(scripted.inlined_graph)
    with pytest.raises(RuntimeError, match=r"2\.weight has the dense layer's shape \(6, 4, 3, 3\).*sasify"):
        sas.load_state_dict(dense.state_dict())


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


@pytest.mark.parametrize("M", [2, 4])
def test_opcheck_conv3d_and_transposed_ops(M):
    """The ops' fake, autograd and schema registrations agree with their kernels (torch.library.opcheck)."""
    from sas_compile.runtime.projection import expand_transposed_weight

    torch.manual_seed(10)
    x3 = torch.randn(2, 4, 3, 5, 4, requires_grad=True)
    w3 = torch.randn(3, 4 * M, 2, 3, 2, requires_grad=True)
    torch.library.opcheck(torch.ops.sas.conv2d.default,
                          (x3, w3, torch.randn(3), [1, 2, 1], [1, 0, 1], [1, 1, 2], 1, M, "sign_pattern"))
    for spatial in ((7,), (4, 5), (3, 4, 3)):
        n = len(spatial)
        x = torch.randn(2, 4, *spatial, requires_grad=True)
        dense = torch.randn(4, 3, *(3,) * n)
        conf = ([2] * n, [1] * n, [1] * n, [1] * n, 1)
        wide = expand_transposed_weight(dense, M).requires_grad_(True)
        torch.library.opcheck(torch.ops.sas.conv_transpose.default, (x, wide, torch.randn(3), *conf, M, "sign_pattern"))
        torch.library.opcheck(torch.ops.sas.conv_transpose_from_dense.default,
                              (x, dense.requires_grad_(True), None, *conf, M, False, "sign_pattern", True))


@pytest.mark.parametrize("cls", [nn.Conv3d, nn.ConvTranspose3d])
def test_channels_last_3d_input_keeps_its_layout(cls):
    """A channels_last_3d input gives a channels_last_3d output and input gradient, as the dense
    layer's (before: the SAS layer's were contiguous), with the values of the float64 reference."""
    torch.manual_seed(11)
    dense = nn.Sequential(nn.Conv3d(3, 6, 1), nn.ReLU(), cls(6, 4, 3, stride=2, padding=1)).eval()
    sas = sas_compile.sasify(dense, M=2)
    fmt = torch.channels_last_3d
    x = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=fmt).requires_grad_(True)
    x64 = x.detach().to(DT).requires_grad_(True)
    want = copy.deepcopy(dense).to(DT)(x64)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got, ref = sas(x), dense(x)
        assert ref.is_contiguous(memory_format=fmt) and not ref.is_contiguous()  # what the dense layer gives
        assert got.is_contiguous(memory_format=fmt) and not got.is_contiguous()
        torch.testing.assert_close(got.to(DT), want.detach(), rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    gx, = torch.autograd.grad(got, x, g)
    assert gx.is_contiguous(memory_format=fmt)
    gwant, = torch.autograd.grad(want, x64, g.to(DT))
    torch.testing.assert_close(gx.to(DT), gwant, rtol=1e-5, atol=1e-5)
