"""Models and checks shared by the SWS test files: the MNIST-1D style CNN, the exact 1:M rule, report vs swsify.

``assert_report_agrees`` is the contract between ``report``'s SWS columns and ``swsify``: every
column counts exactly what the built model costs, layer by layer and in total.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sas_compile
from sas_compile.sws import measure_sws_model


class CNN1d(nn.Module):
    """The MNIST-1D style CNN: three strided Conv1d + ReLU, flatten into a linear."""

    def __init__(self, channels=32, length=40, classes=10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2), nn.ReLU(),
            nn.Flatten(),
        )
        self.positions = self.net(torch.zeros(1, 1, length)).shape[1] // channels
        self.fc = nn.Linear(channels * self.positions, classes)

    def forward(self, x):
        return self.fc(self.net(x))


def forward_backward(model, x):
    model.train()
    out = model(x)
    out.square().mean().backward()
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for _, g in grads), \
        [n for n, g in grads if g is None or not g.abs().sum() > 0]
    return out


def reference_mask(weight: torch.Tensor, M: int) -> torch.Tensor:
    """Float64 reference of the 1:M rule: largest magnitude of every M consecutive weights."""
    flat = weight.detach().double().reshape(-1).tolist()
    keep = [False] * len(flat)
    for start in range(0, len(flat), M):
        chunk = flat[start:start + M]
        keep[start + max(range(len(chunk)), key=lambda i: (abs(chunk[i]), -i))] = True
    return torch.tensor(keep).view(weight.shape)


def by_target(s):
    return {s.sws_layers[n]: w for n, w in s.sws_widths.layers.items()}


def check_one_of_m(module, M):
    dense = module.parametrizations.weight.original
    masked = module.weight.detach()
    assert torch.equal(masked, dense.detach() * reference_mask(dense, M))
    flat = masked.reshape(-1)
    chunks = F.pad(flat, (0, (-flat.numel()) % M)).view(-1, M)
    assert torch.all((chunks != 0).sum(1) == 1)  # random weights: exactly the kept one is nonzero
    assert int((masked != 0).sum()) == math.ceil(masked.numel() / M)


def bias_numel(s, node):
    bias_target = s.sws_widths.layer_params[node][1]
    if bias_target is None:
        return 0
    owner = s.get_submodule(bias_target.rpartition(".")[0]) if "." in bias_target else s
    b = getattr(owner, bias_target.rpartition(".")[2])
    return 0 if b is None else b.numel()


def built_param_counts(s: nn.Module):
    """(params, nonzero params) of the built SWS model ``s``, counted from its tensors alone
    (no mask object, no ``measure_sws_model``): every parameter once (a shared one once), all
    its entries; a 1:M-masked (parametrized) weight's nonzero params are the nonzero entries of
    its masked value (random weights: exactly the kept ones). Other parameters count all their
    entries as nonzero, as the report does (a norm's zero-initialized bias is still stored)."""
    masked = {}
    for module in s.modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                masked[id(plist.original)] = int(torch.count_nonzero(getattr(module, attr).detach()))
    params = list(s.parameters())
    return sum(p.numel() for p in params), sum(masked.get(id(p), p.numel()) for p in params)


def assert_report_agrees(model, x, M, dense_input_layers):
    """Every SWS column of report == what the built model costs, layer by layer and in total."""
    rep = sas_compile.report(model, (x,), M=(M,), dense_input_layers=dense_input_layers, symbolic=False)
    s = sas_compile.swsify(model, M=M, example_inputs=x, dense_input_layers=dense_input_layers)
    built = measure_sws_model(s, (x,))
    assert len(rep.layers) == len(built)
    total_mults = total_nnz = 0
    seen = set()
    for row, (node, got) in zip(rep.layers, built.items()):  # both in graph order
        want = row["sws"][M]
        bias = bias_numel(s, node)
        assert row["name"].split("#")[0] == got["name"]
        assert (got["in_channels"], got["out_channels"]) == (want["in_features"], want["out_features"]), row["name"]
        assert got["mults"] == want["mults"], row["name"]
        # the report counts a shared weight's parameters once, at its first call site
        first = got["name"] not in seen
        seen.add(got["name"])
        assert (got["nonzeros"] + bias if first else 0) == want["nonzero_params"], row["name"]
        assert (got["weight_numel"] + bias if first else 0) == want["params"], row["name"]
        # the analysis, the built mask and the count agree on which weights are 1:M sparse
        assert got["sparse"] == s.sws_widths.layers[node].sparse
        total_mults += got["mults"]
        total_nnz += got["nonzeros"] + bias if first else 0
    assert rep.totals["sws"][M]["mults"] == total_mults
    # the report's totals (conv/linear rows plus parameters-only rows: norms, embeddings, ...)
    # against the built model's own parameters
    params, nonzero_params = built_param_counts(s)
    assert rep.totals["sws"][M]["nonzero_params"] == nonzero_params
    assert rep.totals["sws"][M]["params"] == params
    if not rep.parameters:  # every parameter is a conv/linear row's: the rows' sum is the total
        assert total_nnz == nonzero_params
    return rep, s, built
