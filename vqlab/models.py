"""The model zoo: `get_model(name, num_classes, in_channels, input_size)`.

Small models for the notebooks (LeNet-5, a VGG-style CNN, CIFAR ResNet-20/32, a tiny ViT) and
torchvision's resnet18 / resnet50 / vgg16 / vit_b_16 architectures (random init; weights only
from a file the user supplies).  All attention/MLP projections are plain nn.Linear so that
`vqlab.quantize_` can swap them.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "MODULE_TYPES", "get_model", "default_input_shape", "LeNet5", "SmallCNN", "CifarResNet",
           "TinyViT"]


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    with torch.no_grad():
        return features(torch.zeros(1, in_channels, input_size, input_size)).numel()


# ---------------------------------------------------------------- LeNet-5

class LeNet5(nn.Module):
    """LeNet-5 layout: conv5-pool-conv5-pool-fc120-fc84-fc10 (LeCun et al. 1998), ReLU + max-pool.

    The first conv has 8 maps instead of 6 so that segment lengths d in {1, 2, 4, 8} divide every
    layer's input channels.  For 8x8 inputs (scikit-learn digits) the convs are 3x3 with padding.
    x: (batch, in_channels, input_size, input_size) -> logits (batch, num_classes)
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28):
        super().__init__()
        small = input_size < 16
        k, p = (3, 1) if small else (5, 2)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, k, padding=p), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, k, padding=1 if small else 0), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, in_channels, input_size), 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- small VGG-style CNN

class SmallCNN(nn.Module):
    """VGG-style: [conv3-BN-ReLU x2, pool] x2 with 32/64 channels, then fc 64 and the classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(),
                                        nn.Linear(_flat_features(self.features, in_channels, input_size), 64),
                                        nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------- CIFAR ResNet (He et al. 2016, sec. 4.2)

class _BasicBlock(nn.Module):
    __constants__ = ("pad", "stride")      # read by forward; a file must hold them (vqlab.architecture.check_state)

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option A shortcut: subsample + zero-pad channels, no parameters
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 3 stages of n basic blocks with 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(_BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------- tiny ViT

class _Attention(nn.Module):
    __constants__ = ("heads",)             # read by forward; a file must hold it (vqlab.architecture.check_state)

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)  # each (b, h, t, c/h)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """A small vision transformer: conv patch embedding, class token, learned positions, `depth` blocks."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28, patch: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if input_size % patch:
            raise ValueError(f"input_size {input_size} is not a multiple of the patch size {patch}")
        tokens = (input_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (b, tokens, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---------------------------------------------------------------- torchvision architectures

def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm

    model = getattr(tvm, name)(weights=None, num_classes=num_classes)
    if in_channels != 3:  # swap the stem for other channel counts
        if name.startswith("resnet"):
            old = model.conv1
            model.conv1 = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
        elif name.startswith("vgg"):
            old = model.features[0]
            model.features[0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding)
        elif name.startswith("vit"):
            old = model.conv_proj
            model.conv_proj = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride)
    return model


MODELS = {
    "lenet5": lambda c, ch, s: LeNet5(c, ch, s),
    "cnn": lambda c, ch, s: SmallCNN(c, ch, s),
    "resnet20": lambda c, ch, s: CifarResNet(20, c, ch),
    "resnet32": lambda c, ch, s: CifarResNet(32, c, ch),
    "vit_tiny": lambda c, ch, s: TinyViT(c, ch, s, patch=4 if s % 4 == 0 else 2),
    "resnet18": lambda c, ch, s: _torchvision("resnet18", c, ch),
    "resnet50": lambda c, ch, s: _torchvision("resnet50", c, ch),
    "vgg16": lambda c, ch, s: _torchvision("vgg16", c, ch),
    "vit_b_16": lambda c, ch, s: _torchvision("vit_b_16", c, ch),
}
# the zoo's module classes by the names a vqlab file records for them ("model:<name>"): stable across renames
MODULE_TYPES = {"LeNet5": LeNet5, "SmallCNN": SmallCNN, "BasicBlock": _BasicBlock, "CifarResNet": CifarResNet,
                "Attention": _Attention, "TransformerBlock": _TransformerBlock, "TinyViT": TinyViT}
_DEFAULT_SIZE = {"lenet5": 28, "cnn": 28, "resnet20": 32, "resnet32": 32, "vit_tiny": 28,
                 "resnet18": 224, "resnet50": 224, "vgg16": 224, "vit_b_16": 224}


def default_input_shape(name: str, in_channels: int = 1) -> tuple[int, int, int]:
    """(C, H, W) a model is built for by default (vit_b_16 needs 224; the CIFAR ResNets take any size)."""
    return (in_channels, _DEFAULT_SIZE[name], _DEFAULT_SIZE[name])


def get_model(name: str, num_classes: int = 10, in_channels: int = 1, input_size: int | None = None,
              weights: str | os.PathLike | None = None) -> nn.Module:
    """Build a model by name, randomly initialised (seed torch first for a reproducible init).

    name: one of MODELS: lenet5, cnn, resnet20, resnet32, vit_tiny, resnet18, resnet50, vgg16, vit_b_16.
    input_size: image side the model is built for (LeNet-5, cnn and vit_tiny size their layers to it);
        default from `default_input_shape`.  vit_b_16 only takes 224.
    weights: optional path of a state_dict the user supplies (nothing is ever downloaded).
    """
    key = name.lower().replace("-", "")
    key = {"lenet": "lenet5", "vgg_small": "cnn", "vit": "vit_tiny", "vitb16": "vit_b_16"}.get(key, key)
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    model = MODELS[key](num_classes, in_channels, input_size or _DEFAULT_SIZE[key])
    if weights is not None:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model
