"""Small models the SAS test suite converts: each exercises one structure of real networks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sas_compile.models import resnet18


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=24, d_out=5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = self.norm(F.gelu(self.fc1(x)))
        return self.fc3(F.gelu(self.fc2(x)))


class VGG(nn.Module):
    def __init__(self, widths=(8, 16, 16), classes=7):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * 2 * 2, classes)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block with hand-written multi-head attention."""

    def __init__(self, dim=16, heads=4, mlp=32):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class FunctionalConv(nn.Module):
    """Calls F.conv2d / torch.conv2d / F.linear with its own Parameters."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.kernel = nn.Parameter(torch.randn(8, 6, 3, 3) * 0.2)
        self.kernel_bias = nn.Parameter(torch.randn(8) * 0.1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.w = nn.Parameter(torch.randn(5, 8) * 0.3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = F.conv2d(x, self.kernel, self.kernel_bias, stride=2, padding="valid")
        x = torch.conv2d(torch.relu(x), self.dw, None, 1, 1, 1, 8)
        return F.linear(x.mean((2, 3)), self.w)


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 10)
        self.shared = nn.Linear(10, 10)
        self.out = nn.Linear(10, 3)

    def forward(self, x):
        h = self.inp(x)
        h = self.shared(torch.relu(h))
        h = self.shared(torch.tanh(h))
        return self.out(h)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # data-dependent: symbolic tracing and export cannot capture this
            h = h * 2
        return self.c(torch.relu(self.b(h)))


def models():
    """name -> (factory, example input factory)."""
    return {
        "mlp": (MLP, lambda: torch.randn(4, 3, 12)),
        "vgg": (VGG, lambda: torch.randn(2, 3, 16, 16)),
        "resnet18": (lambda: resnet18(num_classes=10, width=16), lambda: torch.randn(2, 3, 16, 16)),
        "encoder": (EncoderBlock, lambda: torch.randn(2, 5, 16)),
        "functional_conv": (FunctionalConv, lambda: torch.randn(2, 3, 9, 9)),
        "shared_linear": (SharedLinear, lambda: torch.randn(4, 6)),
    }


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model
