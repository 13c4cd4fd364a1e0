"""example_inputs as users write them: a call that leaves an optional argument at None, and
keyword inputs (``{"input_ids": ..., "attention_mask": ...}``) bound to the forward by name.

Before, ``example_inputs=(x,)`` for ``forward(self, x, mask=None)`` with ``if mask is not
None:`` failed with "example_inputs do not fit ... 'FakeTensor' and 'NoneType'" (symbolic
tracing turns ``mask`` into a placeholder, which is never None), and a dict was refused.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile


class OptionalMask(nn.Module):
    def __init__(self, functional: bool = False):
        super().__init__()
        self.a, self.act, self.b = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
        self.w = nn.Parameter(torch.randn(8, 8) * 0.3) if functional else None

    def forward(self, x, mask=None, *, scale: float = 1.0):
        h = self.act(self.a(x))
        if self.w is not None:
            h = torch.tanh(F.linear(h, self.w))
        if mask is not None:
            h = h * mask
        return self.b(h) * scale


class MaskAny(OptionalMask):
    def forward(self, x, mask=None, *, scale: float = 1.0):
        h = self.act(self.a(x))
        if mask is not None and bool(mask.any()):  # data-dependent only where a mask is given
            h = h * mask
        return self.b(h) * scale


@pytest.mark.parametrize("cls", [OptionalMask, MaskAny])
def test_an_argument_left_at_none_is_traced_as_none(cls):
    torch.manual_seed(0)
    model, x = cls().eval(), torch.randn(4, 8)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert isinstance(sas, cls)  # a module swap keeps the forward, mask and all
    mask = (torch.rand(4, 8) > 0.5).float()
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x))
        torch.testing.assert_close(sas(x, mask), model(x, mask))
    assert sas_compile.report(model, (x,), M=(2,)).totals["base"]["mults"] == 4 * (64 + 24)
    assert "b" in str(sas_compile.inspect_model(model, x, M=2))
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert sws(x).shape == (4, 3)


def test_a_rewritten_graph_asserts_the_none_it_was_traced_with():
    torch.manual_seed(0)
    model, x = OptionalMask(functional=True).eval(), torch.randn(4, 8)
    sas = sas_compile.sasify(model, M=2, example_inputs=(x,))
    assert isinstance(sas, torch.fx.GraphModule)  # the functional layer changes the graph
    with torch.no_grad():
        torch.testing.assert_close(sas(x), model(x))
    with pytest.raises(AssertionError):  # never a silently different model
        sas(x, torch.ones(4, 8))


def test_keyword_inputs_bind_to_the_forward_by_name():
    torch.manual_seed(0)
    model, x = OptionalMask().eval(), torch.randn(4, 8)
    mask = (torch.rand(4, 8) > 0.5).float()
    by_name = sas_compile.report(model, {"mask": mask, "x": x}, M=(2,))
    assert by_name.totals == sas_compile.report(model, (x, mask), M=(2,)).totals
    sas = sas_compile.sasify(model, M=2, example_inputs={"x": x})
    with torch.no_grad():
        torch.testing.assert_close(sas(x, mask), model(x, mask))
    with pytest.raises(TypeError, match=r"OptionalMask.forward\(x, mask\): keyword-only argument\(s\) \['scale'\]"):
        sas_compile.sasify(model, M=2, example_inputs={"x": x, "scale": 2.0})
    with pytest.raises(TypeError, match=r"no parameter\(s\) named \['masks'\]"):
        sas_compile.report(model, {"x": x, "masks": mask})
    with pytest.raises(TypeError, match="no value for its required argument 'x'"):
        sas_compile.inspect_model(model, {"mask": mask})


def test_a_language_model_called_with_keyword_inputs():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 50, (2, 7))
    attention = torch.ones(2, 7, dtype=torch.long)
    attention[1, 5:] = 0
    sas = sas_compile.sasify(model, M=2, example_inputs={"input_ids": ids, "attention_mask": attention})
    assert sum(layer.eligible for layer in sas.sparsify_plan.layers) >= 8
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=attention).last_hidden_state
        got = sas(input_ids=ids, attention_mask=attention).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
