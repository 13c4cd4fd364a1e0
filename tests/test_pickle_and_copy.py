"""Converted models pickle whole and deep-copy, as any model does (``torch.save(model)``).

An SWS model's masks are torch parametrizations, and torch refuses to pickle a parametrized
module ("only supported through state_dict()"): ``torch.save`` of every ``swsify`` result, and
of what ``lower_sws`` made of it for deployment, raised. ``runtime.sws_mask.register_mask`` pickles the
plain layer with its stored weight and registers the masks again on load. A GraphModule whose
own weight is masked also failed ``copy.deepcopy`` and, after ``gm.recompile()``, every call. And
any GraphModule result (sasify's or swsify's) of a forward annotated under ``from __future__
import annotations`` failed ``torch.save``.
"""
from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import sas_compile
from sas_compile.runtime.sws_mask import OneOfMMask, sws_mask_of, sws_masks
from sas_compile.sws import lower_sws


class TiedNet(nn.Module):
    """Convolutions, a module called twice and two linears sharing one weight."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv2(torch.relu(self.conv1(x))))))
        h = self.pool(h).flatten(1)
        return self.head(torch.relu(self.a(h)) + torch.relu(self.b(h)))


class FixedReshape(nn.Module):  # a reshape naming a width: the result is a GraphModule
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).reshape(x.shape[0], 8 * 4 * 4))


class RootFunctional(nn.Module):
    """A weight the root reads in a function call: masked on the GraphModule itself, which fx
    pickles by its code (torch.save succeeded, and torch.load failed on the missing attribute)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.b = nn.Parameter(torch.randn(16))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        return self.out(torch.relu(nn.functional.linear(x, self.w, self.b)))


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return buffer.getvalue()


def _round_trip(model):
    return torch.load(io.BytesIO(_saved(model)), weights_only=False)


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("freeze_mask", [False, True])
@pytest.mark.parametrize("factory, x", [
    (TiedNet, torch.randn(2, 3, 6, 7)),
    (FixedReshape, torch.randn(2, 3, 6, 6)),
    (RootFunctional, torch.randn(4, 8)),
], ids=["kept-class", "graph-module", "root-masked-graph-module"])
def test_a_trained_sws_model_pickles_whole_and_trains_on(factory, x, freeze_mask):
    torch.manual_seed(0)
    sws = sas_compile.swsify(factory(), M=4, example_inputs=(x,), freeze_mask=freeze_mask,
                             dense_input_layers=factory is not RootFunctional)
    assert isinstance(sws, fx.GraphModule) == (factory is not TiedNet)
    if factory is RootFunctional:
        assert "w" in sws_masks(sws)
    opt = torch.optim.SGD(sws.parameters(), lr=0.1)
    sws.train()
    for _ in range(2):  # trained: the current masks differ from the first ones
        opt.zero_grad()
        sws(x).square().mean().backward()
        opt.step()
    size = len(_saved(sws))
    _outputs(sws, x)  # eval without autograd: each mask caches its masked weight ...
    assert len(_saved(sws)) == size  # ... which is not saved (a second copy of the masked weights)
    loaded = _round_trip(sws)
    assert isinstance(loaded, TiedNet if factory is TiedNet else fx.GraphModule)
    assert sws_masks(loaded) == sws_masks(sws) and sws_masks(sws)
    state, loaded_state = sws.state_dict(), loaded.state_dict()
    assert list(loaded_state) == list(state)
    assert all(torch.equal(loaded_state[k], state[k]) for k in state)
    for path in sws_masks(sws):
        owner, _, name = path.rpartition(".")
        mask = sws_mask_of(loaded.get_submodule(owner) if owner else loaded, name)
        assert isinstance(mask, OneOfMMask) and mask.freeze_mask == freeze_mask
    torch.testing.assert_close(_outputs(loaded, x), _outputs(sws, x), rtol=0, atol=0)
    if factory is TiedNet:  # tied weights stay one tensor; the twice-called conv stays one module
        assert loaded.b.parametrizations.weight.original is loaded.a.parametrizations.weight.original
    # both go on training alike: the loaded masks are live parametrizations, not baked weights
    for model in (sws, loaded):
        model.train()
        torch.manual_seed(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    torch.testing.assert_close(_outputs(loaded, x), _outputs(sws, x), rtol=0, atol=0)
    # and it pickles again
    torch.testing.assert_close(_outputs(_round_trip(loaded), x), _outputs(sws, x), rtol=0, atol=0)


def test_a_lowered_sws_model_pickles_and_loads_in_a_fresh_process(tmp_path):
    """The deployment artifact: packed linears, masked convolutions, loaded by a process that has
    not imported sas_compile yet."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7)
    low = lower_sws(sas_compile.swsify(TiedNet(), M=4, example_inputs=(x,)).eval(), target="cpu")
    expected = _outputs(low, x)
    torch.save({"model": low, "x": x, "expected": expected}, tmp_path / "low.pt")
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n"  # TiedNet's module
        "import torch\n"
        f"saved = torch.load({str(tmp_path / 'low.pt')!r}, weights_only=False)\n"
        "with torch.no_grad():\n"
        "    out = saved['model'](saved['x'])\n"
        "torch.testing.assert_close(out, saved['expected'], rtol=0, atol=0)\n"
        "print(type(saved['model']).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("TiedNet")


@pytest.mark.parametrize("factory, x", [
    (TiedNet, torch.randn(2, 3, 6, 7)),
    (FixedReshape, torch.randn(2, 3, 6, 6)),
    (RootFunctional, torch.randn(4, 8)),
], ids=["kept-class", "graph-module", "root-masked-graph-module"])
def test_a_deep_copy_is_an_independent_sws_model(factory, x):
    torch.manual_seed(0)
    sws = sas_compile.swsify(factory(), M=4, example_inputs=(x,), dense_input_layers=factory is not RootFunctional)
    copied = copy.deepcopy(sws)
    assert sws_masks(copied) == sws_masks(sws)
    expected = _outputs(sws, x)
    torch.testing.assert_close(_outputs(copied, x), expected, rtol=0, atol=0)
    copied.train()
    opt = torch.optim.SGD(copied.parameters(), lr=0.5)
    opt.zero_grad()
    copied(x).square().mean().backward()
    opt.step()
    assert not torch.equal(_outputs(copied, x), expected)
    torch.testing.assert_close(_outputs(sws, x), expected, rtol=0, atol=0)  # the original is untouched
    if factory is TiedNet:
        assert copied.b.parametrizations.weight.original is copied.a.parametrizations.weight.original


def test_a_root_masked_graph_module_still_runs_after_recompile():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    sws = sas_compile.swsify(RootFunctional(), M=4, example_inputs=(x,), dense_input_layers=False)
    expected = _outputs(sws, x)
    sws.recompile()  # what an fx pass does after editing the graph
    torch.testing.assert_close(_outputs(sws, x), expected, rtol=0, atol=0)


class AnnotatedResidual(nn.Module):
    """A forward annotated in a module with ``from __future__ import annotations`` (as this one is):
    fx gave the traced graph string types, which torch.save could not pickle; the ReLU read twice
    makes sasify's result a GraphModule, the fixed reshape swsify's."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        h = self.conv2(h) + h
        return self.fc(h.reshape(x.shape[0], 4 * 4 * 4))


@pytest.mark.parametrize("convert", ["sasify", "swsify"])
def test_graph_results_of_an_annotated_forward_pickle(convert):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    model = AnnotatedResidual().eval()
    built = (sas_compile.sasify(model, M=4) if convert == "sasify"
             else sas_compile.swsify(model, M=4, example_inputs=(x,)))
    assert isinstance(built, fx.GraphModule)
    torch.testing.assert_close(_outputs(_round_trip(built), x), _outputs(built, x), rtol=0, atol=0)


def test_a_masked_layer_compiled_in_place_pickles():
    """``layer.compile()`` keeps a compiled callable on the layer, which nn.Module leaves out of its
    pickle; a masked layer's own reduce leaves it out too."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 7)
    sws = sas_compile.swsify(TiedNet(), M=4, example_inputs=(x,)).eval()
    sws.head.compile()
    assert "_compiled_call_impl" in vars(sws.head)
    loaded = _round_trip(sws)
    assert "_compiled_call_impl" not in vars(loaded.head)
    torch.testing.assert_close(_outputs(loaded, x), _outputs(sws, x))
