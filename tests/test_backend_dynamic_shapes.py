"""backend="sas" keeps dynamo's dynamic shapes: a new batch or sequence length reuses the graph.

Dynamo compiles a static graph first and, when a size changes, a graph with that size
symbolic. A backend that reads a symbolic size with ``int()`` adds a guard pinning the graph to
the example's value: every new length then recompiled, and past dynamo's recompile limit the
frame ran uncompiled, a dense model without its SAS layers. The analysis reads sizes through
their hints instead; these compare the graph count with the ``eager`` backend's.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch._dynamo.utils import counters

import sas_compile


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class Pixels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.head(h.mean((2, 3)))


def _graphs(model, backend, inputs, **options):
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend, options=options or None)
    outs = []
    with torch.no_grad():
        for x in inputs:
            outs.append((compiled(x), model(x)))
    torch._dynamo.reset()
    return counters["stats"]["unique_graphs"], outs


@pytest.mark.parametrize("make, inputs", [
    (Tokens, [torch.randn(2, n, 8) for n in (3, 5, 7, 9, 11)]),
    (Pixels, [torch.randn(b, 3, s, s) for b, s in ((1, 8), (2, 8), (3, 8), (2, 10), (2, 12))]),
])
@pytest.mark.parametrize("sasified", [False, True])
def test_new_sizes_reuse_the_dynamic_graph(make, inputs, sasified):
    torch.manual_seed(0)
    model = make().eval()
    if sasified:
        model = sas_compile.sasify(model, M=2)
    want, _ = _graphs(model, "eager", inputs)
    got, outs = _graphs(model, "sas", inputs, inner="eager", M=2)
    assert got == want <= 3
    for out, ref in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
