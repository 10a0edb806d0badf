"""The model zoo: architectures registered by name and built from a config's ``arch`` and ``kwargs``.

CIFAR-style ResNets, torchvision's classifiers (``tv_*``, never with downloaded weights) and torchvision's mobile
students adapted to 32x32 inputs. Registering here is what makes a name valid in ``model: {arch: ...}``; loading
weights, factories and programs lives in ``edgepipe.models.loading``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from edgepipe.errors import EdgepipeError

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = fn
        return fn
    return deco


# --- CIFAR-style ResNets (He et al. 2016, section 4.2), 1x1 projection shortcuts -------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for small images: widths w, 2w, 4w (or ``widths``, one per stage: the shape a pruned student
    has, e.g. [16, 32, 48]); parameter names match the shipped teacher."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 widths: list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise EdgepipeError(f"cifar_resnet: depth must be 6n+2 and >= 8 (20, 32, 44, 56, 110), got {depth}")
        if widths is not None and (len(widths) != 3 or not all(isinstance(w, int) and w >= 1 for w in widths)):
            raise EdgepipeError(f"cifar_resnet: widths must be three channel counts >= 1 (one per stage), got {widths}")
        stages = tuple(widths) if widths is not None else (width, 2 * width, 4 * width)
        for name, value in (("width", width), ("num_classes", num_classes), ("in_channels", in_channels)):
            if isinstance(value, int) and value < 1:
                raise EdgepipeError(f"cifar_resnet: {name} must be >= 1, got {value}")
        n = (depth - 2) // 6
        width = stages[0]
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers, cin = [], width
        for i, w in enumerate(stages):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if (i > 0 and j == 0) else 1) for j in range(n)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(stages[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@register("cifar_resnet")
def cifar_resnet(depth: int = 20, num_classes: int = 10, width: int = 16, in_channels: int = 3,
                 widths: list[int] | None = None) -> nn.Module:
    """CIFAR-style ResNet; depth 20-110 (6n+2); ``widths`` sets each stage's channels (default w, 2w, 4w)."""
    return CifarResNet(depth, num_classes, width, in_channels, widths)


for _d in (8, 14, 20, 32, 44, 56, 110):
    register(f"resnet{_d}_cifar")(lambda _d=_d, **kw: CifarResNet(depth=_d, **kw))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        if in_channels != 3:
            raise EdgepipeError(f"{name}: torchvision models take 3 input channels, got in_channels={in_channels}")
        return model
    build.__doc__ = f"torchvision.models.{name} (weights come from a state-dict file, never downloaded)."
    return build


_TORCHVISION = ("resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf", "shufflenet_v2_x1_0", "convnext_tiny")
for _n in _TORCHVISION:
    register(f"tv_{_n}")(_torchvision(_n))


# --- torchvision's mobile students adapted to 32x32 inputs ---------------------------------------------
# torchvision's MobileNetV2/V3 and ShuffleNetV2 downsample 32x in total (a stride-2 stem, then stride-2
# stages), which leaves a 1x1 map at 32x32: the last stages' 3x3 depthwise convolutions then see mostly
# padding. The common CIFAR variants (kuangliu/pytorch-cifar) keep the blocks and widths and remove the
# first 4x of downsampling: stem stride 1 and the first strided stage (or ShuffleNet's max-pool) at stride
# 1, so the last stage runs at 4x4. Only those strides change here; everything else is torchvision's own
# code, so the blocks trace with torch.fx, prune with Torch-Pruning and export like the ImageNet models.
def _stem(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The stem convolution at stride 1, taking ``in_channels`` channels."""
    conv.stride = (1, 1)
    if in_channels != conv.in_channels:
        conv = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, 1, conv.padding, bias=conv.bias is not None)
    return conv


@register("mobilenet_v2_cifar")
def mobilenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                       dropout: float = 0.2) -> nn.Module:
    """torchvision's MobileNetV2 for 32x32 inputs: stem stride 1 and the first 24-channel stage at stride 1
    (ImageNet: 2 and 2), so the map is 32x32 through the first stages and 4x4 at the end."""
    from torchvision.models import MobileNetV2

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    model = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting,
                        dropout=dropout)
    model.features[0][0] = _stem(model.features[0][0], in_channels)
    return model


@register("mobilenet_v3_small_cifar")
def mobilenet_v3_small_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3,
                             dropout: float = 0.2, bn_momentum: float = 0.1) -> nn.Module:
    """torchvision's MobileNetV3-Small for 32x32 inputs: stem stride 1 and the first block (a squeeze-excite
    depthwise block) at stride 1 (ImageNet: 2 and 2), so the last stage runs at 4x4.

    BatchNorm momentum 0.1 (PyTorch's default), not torchvision's 0.01 for ImageNet-length training: at 0.01
    the running statistics keep ~10% of their initial 0/1 after 230 steps, so a student trained for a few
    hundred steps is evaluated with statistics it never had (near chance on a small CIFAR subset)."""
    from functools import partial

    from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

    setting, last_channel = _mobilenet_v3_conf("mobilenet_v3_small", width_mult=width_mult)
    setting[0].stride = 1
    model = MobileNetV3(setting, last_channel, num_classes=num_classes, dropout=dropout,
                        norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=bn_momentum))
    model.features[0][0] = _stem(model.features[0][0], in_channels)
    return model


_SHUFFLENET_WIDTHS = {0.5: [24, 48, 96, 192, 1024], 1.0: [24, 116, 232, 464, 1024],
                      1.5: [24, 176, 352, 704, 1024], 2.0: [24, 244, 488, 976, 2048]}


@register("shufflenet_v2_cifar")
def shufflenet_v2_cifar(num_classes: int = 10, width_mult: float = 1.0, in_channels: int = 3) -> nn.Module:
    """torchvision's ShuffleNetV2 for 32x32 inputs: stem stride 1 and no max-pool (ImageNet: stride 2 and a
    stride-2 max-pool), so stages 2-4 run at 16, 8 and 4 pixels. ``width_mult`` is one of torchvision's
    widths (0.5, 1.0, 1.5, 2.0: the x0_5 ... x2_0 channel tables)."""
    from torchvision.models import ShuffleNetV2

    if width_mult not in _SHUFFLENET_WIDTHS:
        raise EdgepipeError(f"shufflenet_v2_cifar: width_mult must be one of {sorted(_SHUFFLENET_WIDTHS)} "
                            f"(torchvision's channel tables), got {width_mult}")
    model = ShuffleNetV2([4, 8, 4], _SHUFFLENET_WIDTHS[width_mult], num_classes=num_classes)
    model.conv1[0] = _stem(model.conv1[0], in_channels)
    model.maxpool = nn.Identity()
    return model


# --- detectors (edgepipe.models.detectors: torchvision's detection families behind fixed outputs) ----------------
def _register_detectors() -> None:
    from edgepipe.models.detectors import DETECTORS

    ARCHITECTURES.update(DETECTORS)


_register_detectors()


# --- building by name -------------------------------------------------------------------------------
def build_arch(arch: str, kwargs: dict[str, Any]) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise EdgepipeError(f"unknown architecture '{arch}' (known: {', '.join(sorted(ARCHITECTURES))})")
    try:
        return ARCHITECTURES[arch](**kwargs)
    except TypeError as e:
        raise EdgepipeError(f"architecture '{arch}': bad kwargs {kwargs} ({e})") from None
    except (RuntimeError, ValueError, ZeroDivisionError) as e:  # torch's layers reject e.g. a negative channel count
        first = (str(e).splitlines() or [""])[0][:200]
        raise EdgepipeError(f"architecture '{arch}': kwargs {kwargs} rejected ({type(e).__name__}: {first})") from None
