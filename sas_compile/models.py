"""Built-in models for the CLI, the examples and the tests (defined here: no download).

``BUILTIN_MODELS`` maps a name to ``(factory, default_input_shape)``; :func:`load_model`
also accepts ``package.module:factory`` specs so the CLI can report on any user model.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "VisionTransformer",
    "vit_tiny",
    "mlp",
    "vgg_small",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "ModelSpecError",
    "load_model",
]


class BasicBlock(nn.Module):
    """torchvision-style ResNet basic block: two 3x3 convs, a residual add, a 1x1 downsample."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision-style ResNet bottleneck: 1x1 reduce, 3x3 (strided), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet of BasicBlock or Bottleneck stages. ``cifar=True`` uses a 3x3 stem without
    max-pool (32x32 inputs)."""

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        cifar: bool = True,
        width: int = 64,
        in_channels: int = 3,
        block: type = BasicBlock,
    ):
        super().__init__()
        if cifar:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes = width
        in_planes = width
        stages = []
        for i, blocks in enumerate(layers):
            stride = 1 if i == 0 else 2
            stage = [block(in_planes, planes, stride)]
            stage += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes * block.expansion
            planes *= 2
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 10, cifar: bool = True, width: int = 64) -> ResNet:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]); ``cifar=False`` gives the ImageNet stem."""
    return ResNet((2, 2, 2, 2), num_classes=num_classes, cifar=cifar, width=width)


def resnet50(num_classes: int = 1000, cifar: bool = False, width: int = 64) -> ResNet:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]); the ImageNet stem by default."""
    return ResNet((3, 4, 6, 3), num_classes=num_classes, cifar=cifar, width=width, block=Bottleneck)


class _Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v/proj linears (each one SAS candidate)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class VisionTransformer(nn.Module):
    """A small ViT: patch-embedding conv, class token, pre-norm encoder blocks, linear head."""

    def __init__(
        self,
        image_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_classes: int = 10,
        dim: int = 192,
        depth: int = 4,
        heads: int = 3,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        num_patches = (image_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit_tiny(image_size: int = 32, patch_size: int = 4, num_classes: int = 10, dim: int = 192,
             depth: int = 4, heads: int = 3) -> VisionTransformer:
    """ViT-Tiny width (192, 3 heads) with 4 blocks, for 32x32 images by default."""
    return VisionTransformer(image_size, patch_size, 3, num_classes, dim, depth, heads)


def mlp(in_features: int = 784, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> nn.Sequential:
    """Flatten + Linear/ReLU stack + linear head."""
    layers: list = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def vgg_small(num_classes: int = 10, widths: Sequence[int] = (64, 128, 256), in_channels: int = 3) -> nn.Sequential:
    """A VGG-style CIFAR net: two 3x3 conv-BN-ReLU per stage, max-pool, then two linears."""
    layers: list = []
    c = in_channels
    for w in widths:
        for _ in range(2):
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    return nn.Sequential(*layers)


def _resnet18_imagenet() -> ResNet:
    return resnet18(num_classes=1000, cifar=False)


def _vit_tiny_imagenet() -> VisionTransformer:
    return VisionTransformer(224, 16, 3, 1000, 192, 12, 3)


BUILTIN_MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...]]] = {
    "resnet18": (resnet18, (1, 3, 32, 32)),
    "resnet18-imagenet": (_resnet18_imagenet, (1, 3, 224, 224)),
    "resnet50": (resnet50, (1, 3, 224, 224)),
    "vit_tiny": (vit_tiny, (1, 3, 32, 32)),
    "vit_tiny-imagenet": (_vit_tiny_imagenet, (1, 3, 224, 224)),
    "mlp": (mlp, (1, 1, 28, 28)),
    "vgg_small": (vgg_small, (1, 3, 32, 32)),
}

DEFAULT_MODEL = "resnet18"


class ModelSpecError(ValueError):
    """A model name or ``package.module:factory`` spec that cannot be loaded."""


def _import_from_here(module_name: str):
    """Import ``module_name`` as ``python -m`` would: the current directory is searched first. The
    ``sas-compile`` script's ``sys.path`` starts at its own bin folder, so ``sas-compile report
    mymodel:make`` next to ``mymodel.py`` found no module ``mymodel``."""
    here = os.getcwd()
    if not any(os.path.abspath(p or os.curdir) == here for p in sys.path if isinstance(p, str)):
        sys.path.insert(0, here)  # kept: the model's module may import its neighbours later
        importlib.invalidate_caches()
    return importlib.import_module(module_name)


def load_model(spec: Optional[str] = None) -> Tuple[nn.Module, Optional[Tuple[int, ...]]]:
    """Build a model from a built-in name or ``package.module:factory``.

    Returns ``(model in eval mode, default input shape or None)``. A factory may return a
    module, or ``(module, input_shape)``. Raises :class:`ModelSpecError` with a one-line
    message naming the spec and what would work.
    """
    spec = DEFAULT_MODEL if spec is None else spec.strip()
    if spec in BUILTIN_MODELS:
        factory, shape = BUILTIN_MODELS[spec]
        return factory().eval(), shape
    if ":" not in spec:
        raise ModelSpecError(
            f"unknown model {spec!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) "
            "or 'package.module:factory'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"model spec {spec!r} must look like 'package.module:factory'")
    try:
        module = _import_from_here(module_name)
    except Exception as exc:  # import errors of any kind become one clear line
        raise ModelSpecError(f"cannot import {module_name!r} for model {spec!r} (from the current directory "
                             f"or sys.path): {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"module {module_name!r} has no attribute {attr!r} (model {spec!r})")
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        return obj.eval(), None
    if not callable(obj):
        raise ModelSpecError(f"{spec!r} is neither an nn.Module nor a callable factory")
    try:
        built = obj()
    except Exception as exc:
        raise ModelSpecError(f"factory {spec!r} failed when called with no arguments: {exc}") from exc
    shape = None
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        built, shape = built[0], tuple(int(s) for s in built[1])
    if not isinstance(built, nn.Module):
        raise ModelSpecError(f"factory {spec!r} returned {type(built).__name__}, not an nn.Module")
    return built.eval(), shape
