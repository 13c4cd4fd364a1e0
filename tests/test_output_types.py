"""A converted model returns what the model returns: FX records any dict as a plain one, so a
symbolically traced model (sasify's rewritten graph, every swsify model) returned a ``dict``
where the model returns a ``transformers`` ``ModelOutput`` or another mapping type, and
``outputs.last_hidden_state`` / ``outputs[0]`` failed (PoolFormer's ``swsify`` raised
``KeyError: 0`` in a user's code)."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sas_compile


class Named(collections.OrderedDict):
    pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.b(F.relu(self.a(x)))  # the functional ReLU makes sasify rewrite the graph
        return Named(logits=self.c(torch.tanh(h)), hidden=h)


def test_sasify_and_swsify_keep_a_mapping_output_type():
    torch.manual_seed(0)
    model, x = Net().eval(), torch.randn(4, 6)
    want = model(x)
    sas = sas_compile.sasify(model, M=2)
    assert isinstance(sas, torch.fx.GraphModule)
    got = sas(x)
    assert type(got) is Named and list(got) == ["logits", "hidden"]
    torch.testing.assert_close(got["logits"], want["logits"])
    assert type(copy.deepcopy(sas)(x)) is Named
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert type(sws(x)) is Named and sws(x)["logits"].shape == (4, 3)


def test_a_transformers_model_output_survives_swsify():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PoolFormerConfig(num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16],
                                           patch_sizes=[7, 3], strides=[4, 2], padding=[2, 1])
    model = transformers.PoolFormerModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    sws = sas_compile.swsify(model, M=4, example_inputs=(x,))
    assert sws.sparsify_plan.capture == "symbolic_trace"
    out = sws(x)
    assert type(out) is type(model(x))
    assert out[0].shape == out.last_hidden_state.shape == model(x).last_hidden_state.shape
