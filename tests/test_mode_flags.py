"""A rewritten graph follows ``.train()`` / ``.eval()`` as the user's model does.

``torch.fx.symbolic_trace`` reads ``self.training`` as the bool it is while tracing: before,
``swsify`` (always a rewritten graph) and ``sasify`` (where folding a functional ReLU rewrites the
graph) returned models that kept the traced mode's dropout in the other mode
(``F.dropout(x, p, training=self.training)`` dropped values after ``.eval()``), or took the traced
branch of ``if self.training:`` in both, and silently lost ``torch.utils.checkpoint``. Now a value
passed to a call that depends on the mode is read at run time (``passes/mode_flags.py``), and
what one graph cannot express keeps the user's forward (``sasify``) or is built as the converted
mode's, with a warning (``swsify``).
"""
from __future__ import annotations

import copy
import io
import logging
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import sas_compile
from sas_compile.passes.capture import capture
from sas_compile.passes.mode_flags import ModeValue
from sas_compile.sws import lower_sws

DT = torch.float64


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 12)

    def forward(self, x):
        return F.dropout(self.lin(x), 0.3, training=self.training)


class FlagNet(nn.Module):
    """Training flags passed to calls, at two depths and once negated; a functional ReLU folds."""

    def __init__(self):
        super().__init__()
        self.a, self.inner, self.b, self.c = nn.Linear(6, 12), Inner(), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = F.dropout(self.a(x), 0.5, self.training)
        h = self.inner(F.relu(h))
        h = F.alpha_dropout(h, 0.2, training=not self.training)  # odd, but a flag all the same
        return self.c(torch.tanh(self.b(F.relu(h))))


def _outputs(model, x, seed=0):
    torch.manual_seed(seed)
    return model(x)


def _assert_follows(converted, dense, x):
    """The same function in eval and in training mode (the same dropout masks from one seed),
    and the mode follows every switch, at the root and in a submodule alone."""
    for mode in (False, True, False):
        converted.train(mode)
        dense.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(_outputs(converted, x), _outputs(dense, x), rtol=1e-9, atol=1e-12)
    converted.train()
    dense.train()
    converted.get_submodule("inner").eval()
    dense.inner.eval()
    with torch.no_grad():
        torch.testing.assert_close(_outputs(converted, x), _outputs(dense, x), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sasify_graph_reads_the_training_flags_at_run_time(mode):
    torch.manual_seed(0)
    dense = getattr(FlagNet().to(DT), mode)()
    x = torch.randn(5, 6, dtype=DT)
    sas = sas_compile.sasify(dense, M=2)
    assert isinstance(sas, torch.fx.GraphModule)  # the functional ReLUs fold: a rewritten graph
    assert all(layer.fold_relu for layer in sas.sas_plan.eligible() if layer.name in ("b", "inner.lin"))
    assert sas.training == (mode == "train")
    flags = [m for m in sas.modules() if isinstance(m, ModeValue)]
    assert len(flags) == 3  # the root's flag, its negation, and the inner module's own
    assert sas.state_dict().keys() == sas_compile.sasify(FlagNet().to(DT), M=2).state_dict().keys()
    _assert_follows(sas, dense, x)
    # a capture of the result (report, inspect_model, another conversion) keeps the calls
    recaptured = capture(sas).gm
    assert sum(isinstance(recaptured.get_submodule(n.target), ModeValue)
               for n in recaptured.graph.nodes if n.op == "call_module") == 3
    # a copy and a whole-model pickle (FX re-traces a GraphModule's code when it is loaded) keep it
    _assert_follows(copy.deepcopy(sas), dense, x)
    buffer = io.BytesIO()
    torch.save(sas, buffer)
    buffer.seek(0)
    _assert_follows(torch.load(buffer, weights_only=False), dense, x)


class BranchNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 12), nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = self.a(x)
        if self.training:
            h = h * 0.5
        return self.c(torch.tanh(self.b(F.relu(h))))

    def predict(self, x):
        return self(x).argmax(-1)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_sasify_keeps_the_users_forward_where_it_branches_on_the_mode(mode, caplog):
    torch.manual_seed(0)
    dense = getattr(BranchNet().to(DT), mode)()
    x = torch.randn(5, 6, dtype=DT)
    with caplog.at_level("WARNING", logger="sas_compile"):
        sas = sas_compile.sasify(dense, M=2)
    assert type(sas) is BranchNet and sas.predict(x).shape == (5,)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "branch on self.training" in record.getMessage() and "b (its ReLU not folded)" in record.getMessage()
    layer = next(layer for layer in sas.sas_plan.layers if layer.name == "b")
    assert layer.eligible and not layer.fold_relu and "self.training" in layer.fold_relu_reason
    # the static analysis shows the plan sasify carries out
    for plan in (sas_compile.report(dense, (x,), M=(2,)).plan, sas_compile.inspect_model(dense, (x,), M=2)):
        analysed = next(layer for layer in plan.layers if layer.name == "b")
        assert analysed.eligible and not analysed.fold_relu, plan
        assert "not one graph: its forward takes different paths" in str(plan)
    for flag in (False, True):
        sas.train(flag)
        dense.train(flag)
        with torch.no_grad():
            torch.testing.assert_close(sas(x), dense(x), rtol=1e-9, atol=1e-12)


class Checkpointed(nn.Module):
    reentrant = False

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
        self.c = nn.Linear(16, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = checkpoint(self.block, h, use_reentrant=self.reentrant) + h
        return self.c(F.relu(h))


class ReentrantCheckpointed(Checkpointed):
    reentrant = True


def _saved_tensor_count(model, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).sum().backward()
    return len(saved)


def _sasified(cls, caplog):
    """``(dense, x, sasify(dense), the warnings it logged)`` for a float64 ``cls()`` of input width 6."""
    torch.manual_seed(0)
    dense = cls().to(DT)
    x = torch.randn(4, 6, dtype=DT)
    with caplog.at_level("WARNING", logger="sas_compile"):
        sas = sas_compile.sasify(dense, M=2)
    return dense, x, sas, [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


@pytest.mark.parametrize("cls", [Checkpointed, ReentrantCheckpointed])
def test_sasify_keeps_checkpointing(cls, caplog):
    dense, x, sas, warned = _sasified(cls, caplog)
    assert type(sas) is cls
    assert any("torch.utils.checkpoint (in block)" in message for message in warned)
    # what checkpointing frees stays freed: the blocks' activations are not saved for backward
    unchecked = copy.deepcopy(sas)
    unchecked.forward = lambda inp: unchecked.c(F.relu(unchecked.block(F.relu(unchecked.a(inp)))
                                                       + F.relu(unchecked.a(inp))))
    assert _saved_tensor_count(sas, x) < _saved_tensor_count(unchecked, x)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-9, atol=1e-12)


class ThreeLinears(nn.Module):
    """Linears of width 6 -> 16 -> 16 -> 3; each subclass writes its own forward around them."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)


class DropoutMLP(ThreeLinears):
    def forward(self, x):
        h = F.dropout(torch.relu(self.a(x)), 0.5, training=self.training)
        return self.c(torch.relu(self.b(h)))


def test_swsify_follows_the_mode_and_warns_about_checkpointing(caplog):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    sws = sas_compile.swsify(DropoutMLP(), M=4)
    # parametrized modules cannot be pickled whole (PyTorch's rule); sws lowered to packed
    # weights can, and FX re-traces its code when it is loaded
    for model in (sws, torch.load(_saved(lower_sws(sws)), weights_only=False)):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))  # no dropout in eval
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(x), model(x))  # dropout in training
    with caplog.at_level("WARNING", logger="sas_compile"):
        kept = sas_compile.swsify(Checkpointed(), M=4)
    # a module swap keeps the user's forward, checkpoint calls included: nothing to warn about
    assert isinstance(kept, Checkpointed) and kept.block[0].in_features == 32
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sas_compile"):
        graph = sas_compile.swsify(CheckpointedFixedWidth(), M=4)
    assert isinstance(graph, torch.fx.GraphModule)
    assert any("without the torch.utils.checkpoint calls" in r.getMessage() and "(in block)" in r.getMessage()
               for r in caplog.records)


class CheckpointedFixedWidth(Checkpointed):
    """A reshape naming a width makes the SWS model a graph, which inlines the checkpoint."""

    def forward(self, x):
        h = F.relu(self.a(x)).reshape(-1, 16)
        h = checkpoint(self.block, h, use_reentrant=self.reentrant) + h
        return self.c(F.relu(h))


def _saved(model) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return buffer


class ShapeBranch(nn.Module):
    """Symbolic tracing fails on the shape test; torch.export captures it (the export path)."""

    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b, self.c = nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if x.shape[0] > 1:
            h = self.drop(h)
        return self.c(torch.relu(self.b(h)))


def test_swsify_export_graph_follows_the_mode_after_a_pickle():
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    sws = sas_compile.swsify(ShapeBranch(), M=4, example_inputs=(x,))
    assert sws.sparsify_plan.capture == "export"
    for model in (sws, torch.load(_saved(lower_sws(sws)), weights_only=False)):
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(x), model(x))
        model.train()
        with torch.no_grad():
            assert not torch.equal(model(x), model(x))


class GradBranch(BranchNet):
    def forward(self, x):
        h = self.a(x)
        if torch.is_grad_enabled():
            h = h * 0.5
        return self.c(torch.tanh(self.b(F.relu(h))))


def test_a_forward_that_asks_for_the_grad_mode_keeps_the_users_forward(caplog):
    dense, x, sas, warned = _sasified(GradBranch, caplog)
    assert type(sas) is GradBranch
    assert any("torch.is_grad_enabled()" in message for message in warned)
    torch.testing.assert_close(sas(x), dense(x), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), dense(x), rtol=1e-9, atol=1e-12)
    caplog.clear()
    with caplog.at_level("WARNING", logger="sas_compile"):
        sas_compile.swsify(GradBranch(), M=4)
    assert any("swsify: GradBranch: its forward depends on torch.is_grad_enabled()" in r.getMessage()
               for r in caplog.records)


class DropBranch(ThreeLinears):
    """A branch on the mode (stochastic-depth-like) beside a dropout flag."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.training:
            h = h * 0.5
        h = F.dropout(h, 0.5, training=self.training)
        return self.c(torch.relu(self.b(h)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_swsify_of_a_branch_on_the_mode_warns_which_paths_it_takes_and_still_binds_the_rest(mode, caplog):
    """One graph cannot hold both paths: swsify builds the converted mode's, says so, and what
    both modes call alike (the dropout) still follows .train()/.eval()."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    with caplog.at_level("WARNING", logger="sas_compile"):
        sws = sas_compile.swsify(getattr(DropBranch(), mode)(), M=4)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "branch on self.training" in record.getMessage()
    assert f"takes the {'training' if mode == 'train' else 'eval'}-mode paths in both modes" in record.getMessage()
    assert {(v.train_value, v.eval_value) for v in sws.modules() if isinstance(v, ModeValue)} == {(True, False)}
    with torch.no_grad():
        sws.eval()
        assert torch.equal(sws(x), sws(x))
        sws.train()
        assert not torch.equal(sws(x), sws(x))
    assert any(node.target is operator.mul for node in sws.graph.nodes) == (mode == "train")


def test_swsify_transformers_models_follow_the_mode_whichever_mode_they_were_converted_in():
    """An exported graph bakes the mode too: BERT's attention dropout rate is 0.1 in training and
    left out in eval, its output is made contiguous in training only, a ResNet's batch norms
    count batches in training only. Converted in either mode, the SWS model drops out in
    training only and its batch norms use batch statistics in training only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert_cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       intermediate_size=64)
    resnet_cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    ids, images = torch.randint(0, 99, (3, 12)), torch.randn(3, 3, 32, 32)
    for mode in ("train", "eval"):
        bert = getattr(transformers.BertModel(bert_cfg, add_pooling_layer=False), mode)()
        sws = sas_compile.swsify(bert, M=4, example_inputs=(ids,))
        assert sws.sparsify_plan.capture == "export"
        values = {(v.train_value, v.eval_value) for v in sws.modules() if isinstance(v, ModeValue)}
        assert values == {(True, False), (0.1, 0.0)}, values  # dropout's flag, sdpa's dropout rate
        with torch.no_grad():
            sws.eval()
            assert torch.equal(sws(ids).last_hidden_state, sws(ids).last_hidden_state)
            sws.train()
            assert not torch.equal(sws(ids).last_hidden_state, sws(ids).last_hidden_state)

        resnet = getattr(transformers.ResNetModel(resnet_cfg), mode)()
        sws = sas_compile.swsify(resnet, M=4, example_inputs=(images,))
        with torch.no_grad():
            sws.eval()  # running statistics: an image's output does not depend on its batch
            torch.testing.assert_close(sws(images[:1]).last_hidden_state, sws(images).last_hidden_state[:1])
            sws.train()  # batch statistics: it does
            assert not torch.allclose(sws(images[:1]).last_hidden_state, sws(images).last_hidden_state[:1])
            before = sws.get_submodule("embedder.embedder.normalization").running_mean.clone()
            sws(images)
            assert not torch.equal(before, sws.get_submodule("embedder.embedder.normalization").running_mean)


def test_an_sws_model_exported_in_training_counts_batches_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2), ShapeGate())
    sws = sas_compile.swsify(model.train(), M=4, example_inputs=(x,))
    assert sws.sparsify_plan.capture == "export"
    counts = [b for name, b in sws.named_buffers() if name.endswith("num_batches_tracked")]
    assert counts
    with torch.no_grad():
        sws.train()
        sws(x)
        assert [int(c) for c in counts] == [1] * len(counts)
        sws.eval()
        sws(x)
        assert [int(c) for c in counts] == [1] * len(counts)


class ShapeGate(nn.Module):
    """Symbolic tracing fails on its shape test, so the model is exported."""

    def forward(self, x):
        return x * 2 if x.shape[0] > 1 else x


class Teacher(nn.Module):
    """Part of the forward runs without gradients: a traced graph drops the switch."""

    def __init__(self):
        super().__init__()
        self.a, self.teacher, self.b = nn.Linear(6, 12), nn.Linear(12, 3), nn.Linear(12, 3)

    def forward(self, x):
        h = F.relu(self.a(x))
        with torch.no_grad():
            target = self.teacher(h)
        return self.b(F.relu(h)) - target


def test_a_forward_that_switches_gradients_off_inside_keeps_its_gradients(caplog):
    dense, x, sas, warned = _sasified(Teacher, caplog)
    assert type(sas) is Teacher
    assert any("switches gradients off" in message for message in warned)
    sas(x).sum().backward()
    assert sas.teacher.weight.grad is None and sas.b.weight.grad is not None
    # swsify's module swap keeps the forward, its no_grad block included: no warning, the same gradients
    caplog.clear()
    with caplog.at_level("WARNING", logger="sas_compile"):
        sws = sas_compile.swsify(Teacher().double(), M=4, example_inputs=(x,))
    assert type(sws) is Teacher and sws.a.out_features == 24 and not caplog.records
    sws(x).sum().backward()
    assert sws.teacher.weight.grad is None
    assert sws.b.parametrizations.weight.original.grad is not None and sws.a.weight.grad is not None
    # where the SWS model must be a graph (a reshape naming a width), the warning says it drops the switch
    with caplog.at_level("WARNING", logger="sas_compile"):
        graph = sas_compile.swsify(TeacherFixedWidth().double(), M=4, example_inputs=(x,))
    assert isinstance(graph, torch.fx.GraphModule)
    assert any("swsify: TeacherFixedWidth: its forward switches gradients off" in r.getMessage()
               for r in caplog.records)


class TeacherFixedWidth(Teacher):
    def forward(self, x):
        h = F.relu(self.a(x)).reshape(-1, 12)
        with torch.no_grad():
            target = self.teacher(h)
        return self.b(F.relu(h)) - target


class DropPath(ThreeLinears):
    """Stochastic depth written with the batch size: symbolic tracing fails in training mode only."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.training:
            h = h * (torch.rand(x.shape[0], 1) > 0.2) / 0.8
        return self.c(F.dropout(torch.relu(self.b(h)), 0.5, training=self.training))


def test_swsify_binds_the_dropout_flags_where_the_other_mode_does_not_trace(caplog):
    """Converted in eval mode, the training-mode trace fails: the warning says so and the SWS
    model takes the eval paths, but its dropout still follows .train() (its flag, as FX records
    it in a torch.nn.functional call, is bound without a second trace)."""
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    with caplog.at_level("WARNING", logger="sas_compile"):
        sws = sas_compile.swsify(DropPath().eval(), M=4)
    assert sws.sparsify_plan.capture == "symbolic_trace"
    assert any("does not trace in training mode" in r.getMessage() for r in caplog.records)
    assert not any(node.target is torch.rand for node in sws.graph.nodes)  # the eval paths
    with torch.no_grad():
        sws.eval()
        assert torch.equal(sws(x), sws(x))
        sws.train()
        assert not torch.equal(sws(x), sws(x))  # the dropout


class ExportsInEvalOnly(ShapeBranch):
    """Exported (symbolic tracing fails on the shape test); in training mode a data-dependent
    check stops export too."""

    def forward(self, x):
        h = torch.relu(self.a(x))
        if self.training and bool(h.sum() > 0):
            h = h * 1.0
        if x.shape[0] > 1:
            h = self.drop(h)
        return self.c(torch.relu(self.b(h)))


def test_swsify_binds_the_exported_dropout_flag_where_the_other_mode_does_not_export(caplog):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    with caplog.at_level("WARNING", logger="sas_compile"):
        sws = sas_compile.swsify(ExportsInEvalOnly().eval(), M=4, example_inputs=(x,))
    assert sws.sparsify_plan.capture == "export"
    assert any("does not export in training mode" in r.getMessage() for r in caplog.records)
    with torch.no_grad():
        sws.eval()
        assert torch.equal(sws(x), sws(x))
        sws.train()
        assert not torch.equal(sws(x), sws(x))  # the dropout, bound by the aten op's schema
