"""SAS conversion end to end: function preservation through sasify and torch.compile(backend="sas")."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile
from sas_compile.layers import SAS_LAYERS, SASConv2d, SASLinear
from zoo import DataDependent, models, randomize_batchnorm

MODELS = models()


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


def _build(name):
    torch.manual_seed(0)
    factory, inputs = MODELS[name]
    model = randomize_batchnorm(factory()).eval()
    return model, inputs()


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_sasify_preserves_function(name, M):
    model, x = _build(name)
    before = copy.deepcopy(model.state_dict())
    sas = sas_compile.sasify(model, M=M)
    with torch.no_grad():
        ref, out = model(x), sas(x)
    assert _rel(out, ref) < 1e-5
    # the original is untouched, and shares no tensor with the SAS model (no meta stand-in left either)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    originals = {t.data_ptr() for t in [*model.parameters(), *model.buffers()] if t.numel()}
    for t in [*sas.parameters(), *sas.buffers()]:
        assert t.device.type == "cpu" and (t.numel() == 0 or t.data_ptr() not in originals)
    # something was converted, and every converted layer owns an M-times wider weight
    plan = sas.sas_plan
    assert plan.eligible(), [(l.name, l.reason) for l in plan.layers]
    sas_modules = [m for m in sas.modules() if isinstance(m, SAS_LAYERS)]
    for m in sas_modules:
        assert m.M == M
    assert sum(p.numel() for p in sas.parameters()) > sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("M", [2, 4, 8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compile_backend_preserves_function(name, M):
    model, x = _build(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"M": M, "inner": "eager"})
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("M", [2, 4, 8])
def test_compile_data_dependent_branch(M, capsys):
    torch.manual_seed(0)
    model = DataDependent().eval()
    x = torch.randn(3, 8)
    # sasify captures it with dynamo too, and swaps its layer modules
    sas = sas_compile.sasify(model, M=M, example_inputs=(x,))
    assert sas.sas_plan.capture == "dynamo" and type(sas) is DataDependent
    assert [layer.name for layer in sas.sas_plan.eligible()] == ["b", "c"]
    with torch.no_grad():
        for sign in (1, -1):
            assert _rel(sas(sign * x.abs()), model(sign * x.abs())) < 1e-5
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"M": M, "inner": "eager", "explain": True})
    with torch.no_grad():
        for sign in (1, -1):  # both sides of the branch
            xs = sign * x.abs()
            assert _rel(compiled(xs), model(xs)) < 1e-5
    printed = capsys.readouterr().out
    # graphs after the break see activations, not the network input: b and c convert there
    assert "converted  b (linear)" in printed and "converted  c (linear)" in printed
    assert "dense      a (linear): input layer" in printed


def test_compile_with_inductor_matches():
    model, x = _build("vgg")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"M": 4})
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-5


def test_compile_refuses_training_a_dense_model():
    """Inference without no_grad runs; only a backward into the dense weights is refused."""
    from sas_compile.backend import SASTrainingError

    model, x = _build("mlp")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    out = compiled(x)
    assert _rel(out.detach(), model(x).detach()) < 1e-5
    with pytest.raises(SASTrainingError, match="sasify"):
        out.square().mean().backward()
    torch._dynamo.reset()
    trained = torch.compile(model, backend="sas", options={"inner": "eager", "train_dense": True})
    trained(x).square().mean().backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).square().mean().backward()
    for got, want in zip(reference, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compile_keeps_sas_layers_of_sasified_model_and_trains():
    model, x = _build("vgg")
    sas = sas_compile.sasify(model, M=2).train()
    torch._dynamo.reset()
    compiled = torch.compile(sas, backend="sas", options={"inner": "aot_eager"})
    out = compiled(x)
    ref = sas(x)
    assert _rel(out, ref) < 1e-5
    out.square().mean().backward()
    for m in sas.modules():
        if isinstance(m, SAS_LAYERS):
            assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_relu_folded_and_other_consumers_still_see_relu():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.b(h) + h  # h (the ReLU output) is also read by the add

    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(5, 6)
    sas = sas_compile.sasify(model, M=2)
    layer = {l.name: l for l in sas.sas_plan.layers}["b"]
    assert layer.fold_relu
    assert "threshold(a, 0.0, 0.0)" in sas.code  # relu(z), still there for the add
    assert _rel(sas(x), model(x)) < 1e-6
    # b reads the pre-ReLU tensor: its negative slots start at exactly zero
    assert torch.all(sas.b.weight[:, 1::2] == 0)
    # the kept ReLU's backward reads z, which the SAS layer saves anyway: autograd keeps one
    # tensor of that size where a ReLU would add its output
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sas(x.requires_grad_())
    storages = {t.untyped_storage().data_ptr() for t in saved if t.shape == (5, 8)}
    assert len(storages) == 1
    xd = x.detach().clone().requires_grad_()
    xs = x.detach().clone().requires_grad_()
    (model(xd) * torch.arange(8.0)).sum().backward()
    (sas(xs) * torch.arange(8.0)).sum().backward()
    assert _rel(xs.grad, xd.grad) < 1e-6  # the same gradient through the kept ReLU and the fold


def test_input_layer_policy_and_filter_fn():
    model, x = _build("vgg")
    sas = sas_compile.sasify(model, M=2)
    first = sas.sas_plan.layers[0]
    assert not first.eligible and "input layer" in first.reason
    sas_all = sas_compile.sasify(model, M=2, dense_input_layers=False)
    assert sas_all.sas_plan.layers[0].eligible
    assert _rel(sas_all(x), model(x)) < 1e-5
    only_head = sas_compile.sasify(model, M=2, filter_fn=lambda mod, fqn: fqn == "head")
    converted = [l.name for l in only_head.sas_plan.eligible()]
    assert converted == ["head"]
    assert all(l.reason for l in only_head.sas_plan.layers if not l.eligible)


class _OwnedLayers(nn.Module):
    """Layers reached four ways: module calls, a submodule's weight read functionally, a bare
    parameter of a submodule and one of the root."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.inner = nn.Module()
        self.inner.lin = nn.Linear(16, 16)
        self.inner.w = nn.Parameter(torch.randn(16, 16) / 4)
        self.fc = nn.Linear(16, 16)
        self.head_w = nn.Parameter(torch.randn(4, 16) / 4)

    def forward(self, x):
        h = F.relu(self.stem(x))
        h = F.relu(F.linear(F.relu(self.inner.lin(h)), self.inner.w))
        h = F.relu(F.linear(h, self.fc.weight, self.fc.bias))
        return F.linear(h, self.head_w)


def test_filter_fn_sees_the_users_own_modules_in_sasify_and_swsify():
    model = _OwnedLayers()
    expected = {"inner.lin": model.inner.lin, "inner.w": model.inner, "fc": model.fc, "head_w": model}
    builds = {"sasify": lambda f: sas_compile.sasify(model, M=2, filter_fn=f),
              "swsify": lambda f: sas_compile.swsify(model, M=4, filter_fn=f, example_inputs=torch.randn(2, 8))}
    for name, build in builds.items():
        seen = {}

        def keep_all_but_fc(owner, fqn, seen=seen):
            seen[fqn] = owner
            return not isinstance(owner, nn.Linear) or owner is not model.fc

        built = build(keep_all_but_fc)
        seen.pop("stem", None)  # swsify asks about the input layer too: its output width still widens
        assert seen.keys() == expected.keys(), name
        assert all(seen[fqn] is owner for fqn, owner in expected.items()), (name, seen)  # not graph stand-ins
        if name == "sasify":
            assert [l.name for l in built.sas_plan.eligible()] == ["inner.lin", "inner.w", "head_w"]


def test_shared_weight_converts_once():
    model, x = _build("shared_linear")
    sas = sas_compile.sasify(model, M=4)
    sites = [l for l in sas.sas_plan.layers if l.weight_target == "shared.weight"]
    assert len(sites) == 2 and all(l.eligible for l in sites)
    assert not any(l.fold_relu for l in sites)  # one site reads tanh: no fold for the shared weight
    assert isinstance(sas.shared, SASLinear) and sas.shared.weight.shape == (10, 40)


class _AliasedWeight(nn.Module):
    """A converted layer whose weight is also kept in a plain list attribute that no call reads."""

    def __init__(self):
        super().__init__()
        self.stem, self.act, self.fc = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)
        self.kept = [self.fc.weight]

    def forward(self, x):
        return self.fc(self.act(self.stem(x)))


def test_sasify_copies_no_weight_it_replaces():
    """The copy behind sasify leaves out the dense weights that the rewrite replaces (a meta
    stand-in naming the original is expanded instead), on the module-swap and the graph path; a
    replaced weight still held elsewhere makes it copy every weight, as a plain deepcopy would."""
    from sas_compile.passes.pipeline import analyze_model
    from sas_compile.passes.rewrite_layers_to_sas import copy_for_rewrite, holds_stand_ins
    from sas_compile.sas import SASConfig

    for name, capture_root in (("mlp", "model"), ("functional_conv", "gm")):
        model, x = _build(name)
        plan = analyze_model(model, None, SASConfig(M=2))
        root = getattr(plan, capture_root)
        replaced = {l.weight_target for l in plan.eligible()}
        copied = copy_for_rewrite(root, plan)
        for target, t in [*copied.named_parameters(), *copied.named_buffers()]:
            assert (t.device.type == "meta") == (target in replaced), (name, target)
        assert holds_stand_ins(copied)
        sas = sas_compile.sasify(model, M=2)
        assert not holds_stand_ins(sas)
        assert type(sas).__name__ == ("GraphModule" if capture_root == "gm" else type(model).__name__)
        with torch.no_grad():
            assert _rel(sas(x), model(x)) < 1e-5

    torch.manual_seed(0)
    model, x = _AliasedWeight().eval(), torch.randn(3, 6)
    sas = sas_compile.sasify(model, M=2)
    assert isinstance(sas.fc, SASLinear) and sas.kept[0].device.type == "cpu"  # a copy, as deepcopy makes
    assert torch.equal(sas.kept[0], model.fc.weight) and sas.kept[0] is not model.fc.weight
    with torch.no_grad():
        assert _rel(sas(x), model(x)) < 1e-6


def test_invalid_M():
    model, _ = _build("mlp")
    for bad in (0, 1, 3, 6, 2.0, "2"):
        with pytest.raises(ValueError, match="power of two"):
            sas_compile.sasify(model, M=bad)


def test_state_dict_round_trip_and_to_dtype(tmp_path):
    model, x = _build("resnet18")
    sas = sas_compile.sasify(model, M=2)
    torch.save(sas.state_dict(), tmp_path / "sas.pt")
    again = sas_compile.sasify(model, M=2)
    for p in again.parameters():
        p.data.add_(1.0)
    again.load_state_dict(torch.load(tmp_path / "sas.pt"))
    with torch.no_grad():
        assert torch.equal(again(x), sas(x))
        ref = model.double()(x.double())
        out = sas.double()(x.double())
    assert out.dtype == torch.float64 and _rel(out, ref) < 1e-12


def test_train_eval_switch_batchnorm():
    model, x = _build("vgg")
    sas = sas_compile.sasify(model, M=2)
    assert not sas.training
    sas.train()
    assert all(m.training for m in sas.modules())
    y1 = sas(x)
    sas.eval()
    y2 = sas(x)
    assert not torch.allclose(y1, y2)  # batch statistics in train, running statistics in eval


@pytest.mark.slow
def test_gradients_reach_every_wide_weight_and_sgd_lowers_loss():
    model, x = _build("resnet18")
    sas = sas_compile.sasify(model, M=4).train()
    target = torch.randint(0, 10, (x.shape[0],))
    opt = torch.optim.SGD(sas.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(sas(x), target)
        loss.backward()
        if step == 0:
            wide = [m for m in sas.modules() if isinstance(m, SASConv2d)]
            assert wide and all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in wide)
            # the negative slots (zero after folding) receive gradient too: capacity to train
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5


def test_channels_last_and_half_precision_layers():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        conv = nn.Conv2d(6, 8, 3, padding="same", dilation=2).to(dtype)
        sas = SASConv2d.from_dense(conv, 4)
        x = torch.randn(2, 6, 9, 7, dtype=dtype).to(memory_format=torch.channels_last)
        out = sas(x)
        assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
        assert _rel(out.float(), conv(x).float()) < tol


def test_transformers_models_through_export_capture():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=5)
    resnet = transformers.ResNetForImageClassification(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(sas_compile.api.CaptureError, match="example_inputs"):
        sas_compile.sasify(resnet, M=2)  # symbolic tracing fails; export needs inputs
    sas = sas_compile.sasify(resnet, M=2, example_inputs=(x,))
    assert sas.sas_plan.capture == "export" and type(sas) is type(resnet)
    assert sum(l.eligible for l in sas.sas_plan.layers) == 6
    with torch.no_grad():
        assert _rel(sas(x).logits, resnet(x).logits) < 1e-5
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32)
    bert = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 7))
    sas = sas_compile.sasify(bert, M=4, example_inputs=(ids,))
    assert isinstance(sas.encoder.layer[0].attention.self.query, SASLinear)
    with torch.no_grad():
        assert _rel(sas(ids).last_hidden_state, bert(ids).last_hidden_state) < 1e-5


def test_analysis_with_example_inputs_never_runs_the_users_model():
    """Shapes come from fake tensors: a model in train mode keeps its BatchNorm statistics."""
    model, x = _build("resnet18")
    model.train()
    before = copy.deepcopy(model.state_dict())
    plan = sas_compile.inspect_model(model, (x,), M=2)
    sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert plan.layers[1].output_shape is not None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
