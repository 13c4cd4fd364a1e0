"""sasify, a training step and ``backend="sas"`` on tiny configs of many ``transformers`` architectures.

Each capture path shows up here: symbolic tracing fails on all of them, torch.export takes the
encoders and vision models, and dynamo's graphs the decoder language models (a cache object in
the output) and Mamba. Every converted model must compute what the dense one computes, train,
and compile.
"""
from __future__ import annotations

import pytest
import torch

import sas_compile
from sas_compile.runtime.layers import SAS_LAYERS

transformers = pytest.importorskip("transformers")

TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)


def _ids():
    return (torch.randint(0, 64, (2, 9)),)


def _pixels(size=32):
    return (torch.randn(2, 3, size, size),)


CASES = {
    "llama": lambda: (transformers.LlamaModel(transformers.LlamaConfig(**TEXT, num_key_value_heads=2)), _ids()),
    "qwen2": lambda: (transformers.Qwen2Model(transformers.Qwen2Config(**TEXT, num_key_value_heads=2)), _ids()),
    "gpt_neox": lambda: (transformers.GPTNeoXModel(transformers.GPTNeoXConfig(**TEXT)), _ids()),
    "mamba": lambda: (transformers.MambaModel(transformers.MambaConfig(vocab_size=64, hidden_size=32,
                                                                       num_hidden_layers=1, state_size=4)), _ids()),
    "distilbert": lambda: (transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=64, dim=32, n_layers=1, n_heads=4, hidden_dim=48)), _ids()),
    "t5_encoder": lambda: (transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)), _ids()),
    "convnext": lambda: (transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), _pixels()),
    "mobilenet_v2": lambda: (transformers.MobileNetV2Model(transformers.MobileNetV2Config(
        image_size=32, depth_multiplier=0.25)), _pixels()),
    "swin": lambda: (transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4)), _pixels()),
    "dinov2": lambda: (transformers.Dinov2Model(transformers.Dinov2Config(image_size=32, patch_size=8, **VISION)),
                       _pixels()),
}


def _hidden(output):
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")  # Mamba, under compile
@pytest.mark.parametrize("name", list(CASES))
def test_sasify_trains_and_compiles(name):
    torch.manual_seed(0)
    model, x = CASES[name]()
    model.eval()
    with torch.no_grad():
        want = _hidden(model(*x))
    sas = sas_compile.sasify(model, M=2, example_inputs=x)
    assert type(sas) is type(model)  # a module swap: the user's class
    converted = sum(isinstance(m, SAS_LAYERS) for m in sas.modules())
    assert converted == len(sas.sas_plan.eligible()) > 0
    with torch.no_grad():
        torch.testing.assert_close(_hidden(sas(*x)), want, rtol=1e-4, atol=1e-5)
    sas.train()
    _hidden(sas(*x)).pow(2).mean().backward()
    wide = [m.weight.grad for m in sas.modules() if isinstance(m, SAS_LAYERS)]
    assert all(g is not None and torch.isfinite(g).all() for g in wide)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sas", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(_hidden(compiled(*x)), want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
