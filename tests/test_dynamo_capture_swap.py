"""sasify on models that neither symbolic tracing nor torch.export captures whole.

Decoder language models return a cache object torch.export cannot flatten, and models with
data-dependent code stop both: ``sasify(model, example_inputs=...)`` captures them with dynamo,
graph by graph, and converts by swapping stock ``nn.Linear``/``nn.Conv`` modules in a copy.
A swap changes every call of a module and every read of its weight, so whatever another graph
does with a module or its weight must keep it dense: these tests build each such case.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sas_compile
from sas_compile.runtime.layers import SAS_LAYERS


class Cache:
    """An output object torch.export cannot flatten (as transformers' DynamicCache)."""

    def __init__(self, value):
        self.value = value


class Branchy(nn.Module):
    """Data-dependent branch, a cache object in the output, and each trap for a module swap."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.a = nn.Linear(16, 16)
        self.b = nn.Linear(16, 16)
        self.only_neg = nn.Linear(16, 16)  # called only on the branch the example input does not take
        self.reused = nn.Linear(16, 16)  # its weight is also read by another op, after a graph break
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        h = self.a(h)
        if h.sum() > -1e9:  # data-dependent: dynamo breaks the graph here
            h = self.b(torch.tanh(h))
        else:
            h = self.only_neg(h)
        h = self.reused(h) + 0.1 * self.reused.weight.mean()
        return self.out(h), Cache(h)


class LoraLinear(nn.Linear):
    """An nn.Linear subclass with its own forward: a swap for SASLinear would drop the extra term."""

    def __init__(self, n):
        super().__init__(n, n)
        self.extra = nn.Parameter(torch.randn(n, n) * 0.1)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.extra


def _dense_and_sas(model, x, M=2, **kwargs):
    model.eval()
    sas = sas_compile.sasify(model, M=M, example_inputs=(x,), **kwargs)
    return sas, {layer.name: layer for layer in sas.sas_plan.layers}


def test_branchy_model_is_captured_by_dynamo_and_swapped():
    torch.manual_seed(0)
    model = Branchy()
    x = torch.randn(3, 8)
    sas, layers = _dense_and_sas(model, x)
    assert sas.sas_plan.capture == "dynamo"
    assert type(sas) is Branchy  # the user's class, modules swapped
    assert isinstance(sas.a, SAS_LAYERS) and isinstance(sas.b, SAS_LAYERS) and isinstance(sas.out, SAS_LAYERS)
    assert not isinstance(sas.inp, SAS_LAYERS)  # reads the raw input
    assert "input layer" in layers["inp"].reason
    # a weight read outside the layer keeps the layer dense
    assert not isinstance(sas.reused, SAS_LAYERS)
    assert "also read outside the layer" in layers["reused"].reason
    # the branch the capture did not see: listed, dense
    assert not isinstance(sas.only_neg, SAS_LAYERS)
    assert any(line.startswith("only_neg: not called") for line in sas.sas_plan.not_in_graphs)
    assert "only_neg" in str(sas.sas_plan)
    with torch.no_grad():
        for inputs in (x, torch.randn(5, 8)):
            want, got = model(inputs)[0], sas(inputs)[0]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_branchy_model_trains_after_the_swap():
    torch.manual_seed(1)
    model = Branchy()
    x = torch.randn(3, 8)
    sas, _ = _dense_and_sas(model, x, M=4)
    sas.train()
    sas(x)[0].pow(2).mean().backward()
    assert sas.a.weight.grad is not None and sas.a.weight.grad.shape == (16, 64)
    assert torch.isfinite(sas.a.weight.grad).all() and sas.a.weight.grad.abs().sum() > 0


def test_module_with_its_own_forward_is_not_swapped():
    """Under dynamo and under torch.export alike: only stock forwards are known to be the call seen."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 6)
            self.lora = LoraLinear(6)
            self.last = nn.Linear(6, 3)

        def forward(self, x):
            h = self.lora(torch.relu(self.first(x)))
            if h.sum() > -1e9:  # stops symbolic tracing; torch.export takes it (one branch)
                h = h * 2
            return self.last(h), Cache(h)

    torch.manual_seed(2)
    model = Model()
    x = torch.randn(4, 6)
    sas, layers = _dense_and_sas(model, x)
    assert type(sas.lora) is LoraLinear
    # its F.linear (a module with its own forward) and its x @ extra (a linear on a parameter): both dense
    lora = [layer for layer in sas.sas_plan.layers if layer.name.startswith("lora")]
    assert len(lora) == 2 and not any(layer.eligible for layer in lora)
    assert any("own forward" in layer.reason for layer in lora)
    assert isinstance(sas.last, SAS_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def test_a_module_dense_at_one_call_stays_dense_at_all():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(5, 5)
            self.mid = nn.Linear(5, 5)

        def forward(self, x):
            h = self.shared(x)  # reads the raw input: an input layer, dense
            torch._dynamo.graph_break()
            h = self.mid(torch.relu(h))
            return self.shared(h), Cache(h)  # the same module, in another graph

    torch.manual_seed(3)
    model = Model()
    x = torch.randn(2, 5)
    sas, _ = _dense_and_sas(model, x)
    assert sas.sas_plan.capture == "dynamo"
    assert not isinstance(sas.shared, SAS_LAYERS)
    shared_calls = [layer for layer in sas.sas_plan.layers if layer.name == "shared"]
    assert len(shared_calls) == 2 and not any(layer.eligible for layer in shared_calls)
    assert isinstance(sas.mid, SAS_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def test_tied_modules_in_two_graphs_share_one_wide_weight():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 6)
            self.one = nn.Linear(6, 6)
            self.two = nn.Linear(6, 6)
            self.two.weight = self.one.weight

        def forward(self, x):
            h = self.one(torch.tanh(self.first(x)))
            torch._dynamo.graph_break()
            return self.two(torch.tanh(h)), Cache(h)

    torch.manual_seed(4)
    model = Model()
    x = torch.randn(3, 4)
    sas, _ = _dense_and_sas(model, x)
    assert isinstance(sas.one, SAS_LAYERS) and isinstance(sas.two, SAS_LAYERS)
    assert sas.one.weight is sas.two.weight  # the tie holds, at the wide width
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def test_filter_fn_sees_the_users_own_modules():
    torch.manual_seed(5)
    model = Branchy()
    seen = []

    def keep(module, fqn):
        seen.append((fqn, module))
        return fqn != "a"

    sas, layers = _dense_and_sas(model, torch.randn(3, 8), filter_fn=keep)
    assert ("b", model.b) in [(fqn, mod) for fqn, mod in seen if mod is model.b]
    assert all(mod is model.get_submodule(fqn) for fqn, mod in seen)
    assert not isinstance(sas.a, SAS_LAYERS) and layers["a"].reason == "excluded by filter_fn"


def test_report_and_inspect_agree_with_sasify():
    torch.manual_seed(6)
    model = Branchy().eval()
    x = torch.randn(3, 8)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    converted = {layer.name for layer in sas.sas_plan.eligible()}
    assert converted == {"a", "b", "out"}
    plan = sas_compile.inspect_model(model, (x,), M=2)
    assert {layer.name for layer in plan.eligible()} == converted
    assert "modules swapped" in plan.graph_after
    text = str(sas_compile.report(model, (x,)))
    assert "only_neg: not called" in text


def test_llama_causal_lm_converts_and_generates_the_same():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(7)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 10))
    sas = sas_compile.sasify(model, M=2, example_inputs=(ids,))
    plan = sas.sas_plan
    assert plan.capture == "dynamo"
    names = {layer.name for layer in plan.eligible()}
    assert len(names) == 14 and all(name.startswith("model.layers.") for name in names)
    lm_head = [layer for layer in plan.layers if layer.name == "lm_head"]
    assert lm_head and not lm_head[0].eligible and "tied" in lm_head[0].reason
    assert sas.lm_head.weight is sas.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(sas(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        want = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        got = sas.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert got.tolist() == want.tolist()
    # and the report names the layers by their module paths (a decorated forward took self as args[0])
    report = sas_compile.report(model, (ids,), M=2)
    assert "model.layers.0.mlp.up_proj" in str(report) and "0.model.layers" not in str(report)


def test_the_capture_run_leaves_the_model_and_the_random_state_alone():
    """The dynamo capture runs the model once: on a copy sharing its parameters, with its own
    buffers, and with the random number generator restored (a dropout in training mode draws)."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 8)
            self.norm = nn.BatchNorm1d(8)
            self.drop = nn.Dropout(0.5)
            self.last = nn.Linear(8, 3)

        def forward(self, x):
            h = self.drop(self.norm(torch.relu(self.first(x))))
            if h.sum() > -1e9:
                h = h + 1
            return self.last(h), Cache(h)

    torch.manual_seed(8)
    model = Model().train()
    stats = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    x = torch.randn(4, 6)
    rng = torch.get_rng_state()
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert sas.sas_plan.capture == "dynamo"
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.norm.running_mean, stats[0]) and torch.equal(model.norm.running_var, stats[1])
    assert model.norm.num_batches_tracked.item() == 0
    assert isinstance(sas.last, SAS_LAYERS) and sas.training

    from sas_compile.passes.capture import capture_with_dynamo

    graphs, _ = capture_with_dynamo(model, (x,))
    own = {id(p) for p in model.parameters()}
    assert graphs and all(id(p) in own for graph in graphs for p in graph.parameters.values())


def test_swsify_says_why_it_needs_one_graph_and_what_works():
    """SWS rebuilds the network wider: dynamo's graphs are not enough, and the error says what is."""
    model = Branchy().eval()
    with pytest.raises(sas_compile.api.CaptureError) as raised:
        sas_compile.swsify(model, M=4, example_inputs=(torch.randn(3, 8),))
    message = str(raised.value)
    assert message.startswith("swsify needs Branchy as one graph")
    assert "symbolic tracing failed" in message and "torch.export failed" in message
    assert "sasify and report handle such a model" in message and "backend='sas'" not in message


def test_swatify_finds_the_input_layer_of_a_model_only_dynamo_captures():
    torch.manual_seed(9)
    model = Branchy().eval()
    swat = sas_compile.swatify(model, sparsity=0.5, example_inputs=(torch.randn(3, 8),))
    assert swat.a.weight_density == 0.5 and swat.out.weight_density == 0.5
    assert swat.inp.weight_density == 1.0  # reads the raw input: dense under the uniform distribution
    swat.train()
    swat(torch.randn(3, 8))[0].sum().backward()
    assert swat.a.weight.grad is not None


def test_a_linear_written_as_addmm_is_counted_and_converted():
    """transformers' Conv1D (GPT-2) computes ``addmm(b, x, W)`` with ``W`` stored ``[in, out]``: the
    report counts its mults, a module swap converts it, and an addmm of activations is no layer."""
    from torch.utils.flop_counter import FlopCounterMode

    class Conv1DLike(nn.Module):
        def __init__(self, nx, nf):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
            self.bias = nn.Parameter(torch.randn(nf) * 0.1)

        def forward(self, x):
            out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
            return out.reshape(*x.shape[:-1], -1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 10)
            self.proj = Conv1DLike(10, 7)
            self.last = nn.Linear(7, 3)

        def forward(self, x):
            h = torch.relu(self.first(x))
            scores = torch.addmm(h[:, :1], h, h.t())  # activations only: no layer
            return self.last(torch.relu(self.proj(h))) + scores.sum(1, keepdim=True)

    torch.manual_seed(10)
    model = Model().eval()
    x = torch.randn(8, 6)
    report = sas_compile.report(model, (x,), M=2)
    with FlopCounterMode(display=False) as counter:
        model(x)
    # every product but the activations' own (8 x 10 by 10 x 8), which is no layer
    assert report.totals["base"]["mults"] == counter.get_total_flops() // 2 - 8 * 10 * 8
    rows = {row["name"]: row for row in report.layers}
    assert set(rows) == {"first", "proj", "last"} and rows["proj"]["op"] == "linear"
    assert rows["proj"]["base"]["mults"] == 8 * 10 * 7
    # symbolic tracing stops at the unpacked shape: torch.export captures it, and swaps the module
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    layers = {layer.name: layer for layer in sas.sas_plan.layers}
    assert sas.sas_plan.capture == "export" and layers["proj"].eligible and layers["last"].eligible
    assert isinstance(sas.proj, SAS_LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x), rtol=1e-5, atol=1e-6)


class Conv1DLike(nn.Module):
    """transformers' Conv1D: ``addmm(b, x.view(-1, nx), W).view(*x.shape[:-1], nf)``, ``W`` ``[nx, nf]``."""

    def __init__(self, nx, nf, extra=None):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)
        self.extra = extra

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        if self.extra == "add":
            out = out + 1.0  # more than a linear: no swap may drop it
        if self.extra == "layout":
            return out.view(-1, *x.shape[:-1], out.shape[-1] // 2, 2)  # another output layout
        return out.view(*x.shape[:-1], out.shape[-1])


class Conv1DModel(nn.Module):
    def __init__(self, extra=None):
        super().__init__()
        self.first = nn.Linear(6, 8)
        self.mid = Conv1DLike(8, 10, extra)
        self.last = nn.Linear(10, 3) if extra != "layout" else nn.Linear(2, 3)

    def forward(self, x):
        h = self.mid(torch.relu(self.first(x)))
        return self.last(torch.relu(h)), Cache(h)  # the cache: only dynamo captures it


def test_a_module_whose_whole_forward_is_an_addmm_becomes_a_sas_linear():
    torch.manual_seed(12)
    model = Conv1DModel().eval()
    x = torch.randn(2, 5, 6)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert sas.sas_plan.capture == "dynamo"
    assert isinstance(sas.mid, SAS_LAYERS) and sas.mid.weight.shape == (10, 16)
    assert sas.mid.bias is not model.mid.bias and torch.equal(sas.mid.bias, model.mid.bias)
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)
    sas.train()
    sas(x)[0].sum().backward()
    assert sas.mid.weight.grad is not None and sas.mid.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("extra", ["add", "layout"])
def test_an_addmm_module_that_computes_more_stays_dense(extra):
    torch.manual_seed(13)
    model = Conv1DModel(extra).eval()
    x = torch.randn(2, 5, 6)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    layers = {layer.name: layer for layer in sas.sas_plan.layers}
    assert type(sas.mid) is Conv1DLike and not layers["mid"].eligible and "addmm" in layers["mid"].reason
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def test_gpt2_converts_and_generates_the_same():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    report = sas_compile.report(model, (ids,), M=2)
    # per block: c_attn 32 -> 96, attn c_proj 32 -> 32, c_fc 32 -> 128, mlp c_proj 128 -> 32; lm_head 32 -> 64
    rows = 2 * 8
    per_block = rows * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32)
    assert report.totals["base"]["mults"] == config.n_layer * per_block + rows * 32 * 64
    sas = sas_compile.sasify(model, M=2, example_inputs=(ids,))
    converted = {layer.name for layer in sas.sas_plan.eligible()}
    assert len(converted) == 8 and {"transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"} <= converted
    lm_head = [layer for layer in sas.sas_plan.layers if layer.name == "lm_head"][0]
    assert not lm_head.eligible and "tied" in lm_head.reason  # tied to the token embedding
    with torch.no_grad():
        torch.testing.assert_close(sas(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)
        want = model.generate(ids[:1], max_new_tokens=5, do_sample=False)
        assert sas.generate(ids[:1], max_new_tokens=5, do_sample=False).tolist() == want.tolist()


def test_an_addmm_layer_stays_dense_where_the_graph_itself_is_rewritten():
    """symbolic tracing and the backend rewrite the graph, not modules: there it stays dense, said so."""

    class Traceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 8)
            self.weight = nn.Parameter(torch.randn(8, 5))
            self.bias = nn.Parameter(torch.randn(5))

        def forward(self, x):
            return torch.addmm(self.bias, torch.relu(self.first(x)), self.weight)

    torch.manual_seed(14)
    model = Traceable().eval()
    x = torch.randn(4, 6)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert sas.sas_plan.capture == "symbolic_trace"
    layer = [layer for layer in sas.sas_plan.layers if layer.op == "linear" and layer.name != "first"][0]
    assert not layer.eligible and "addmm" in layer.reason and (layer.in_channels, layer.out_channels) == (8, 5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


class MatmulLinear(nn.Module):
    """``x @ W.T + b`` (FalconLinear's forward), ``W`` stored ``[out, in]``."""

    def __init__(self, n_in, n_out, skip_bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) * 0.2)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
        self.skip_bias = skip_bias

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.skip_bias else out + self.bias


@pytest.mark.parametrize("skip_bias", [False, True])
def test_a_module_computing_x_at_w_t_plus_b_becomes_a_sas_linear(skip_bias):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 8)
            self.mid = MatmulLinear(8, 5, skip_bias)

        def forward(self, x):
            h = self.mid(torch.relu(self.first(x)))
            return h, Cache(h)

    torch.manual_seed(15)
    model = Model().eval()
    x = torch.randn(3, 4, 6)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    layer = [layer for layer in sas.sas_plan.layers if layer.name == "mid"][0]
    assert (layer.in_channels, layer.out_channels) == (8, 5)
    # a module that holds a bias it does not add is not a linear with that bias: it stays as it is
    assert isinstance(sas.mid, SAS_LAYERS) is (not skip_bias) and layer.eligible is (not skip_bias)
    with torch.no_grad():
        torch.testing.assert_close(sas(x)[0], model(x)[0], rtol=1e-5, atol=1e-6)


def test_falcon_converts():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(16)
    model = transformers.FalconModel(transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4)).eval()
    ids = torch.randint(0, 64, (2, 8))
    sas = sas_compile.sasify(model, M=2, example_inputs=(ids,))
    assert len(sas.sas_plan.eligible()) == 8
    assert all(isinstance(block.mlp.dense_h_to_4h, SAS_LAYERS) for block in sas.h)
    with torch.no_grad():
        torch.testing.assert_close(sas(ids).last_hidden_state, model(ids).last_hidden_state, rtol=1e-4, atol=1e-5)
