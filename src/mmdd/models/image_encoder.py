"""Image backbones: the CPU ConvNet or any timm model by name."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmdd.errors import ArtifactError, MmddError
from mmdd.models.convnet import ConvNet


def build_image_backbone(
    name: str,
    image_size: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
    width: int = 64,
    depth: int = 3,
    feature_side: int | None = 4,
) -> tuple[nn.Module, int]:
    """Return (backbone, feature_dim). `name` is `convnet` or a timm model name."""
    if name == "convnet":
        if image_size % (2**depth) != 0:
            raise MmddError(f"model.image.depth={depth}: the ConvNet halves the image {depth} times, so data.image_size "
                            f"({image_size}) must be divisible by {2**depth}; choose another depth or image size")
        net: nn.Module = ConvNet(image_size=image_size, width=width, depth=depth, feature_side=feature_side)
        dim = net.num_features
    else:
        import timm

        if name not in timm.list_models() and not pretrained:
            # list_models() hides pretrained tags; accept anything timm can build.
            try:
                timm.create_model(name, pretrained=False, num_classes=0)
            except Exception as exc:  # noqa: BLE001 - re-raised with advice
                raise MmddError(
                    f"model.image.name={name!r} is neither 'convnet' nor a timm model: {exc}"
                ) from exc
        try:
            net = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="avg")
        except Exception as exc:  # noqa: BLE001
            hint = " (pretrained weights need network access to the Hugging Face hub)" if pretrained else ""
            raise MmddError(f"could not build timm model {name!r}{hint}: {exc}") from exc
        dim = int(net.num_features)
    if checkpoint:
        load_backbone_checkpoint(net, checkpoint)
    return net, dim


def load_backbone_checkpoint(net: nn.Module, path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ArtifactError(f"model.image.checkpoint: {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(
            f"model.image.checkpoint {p} does not fit the backbone: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
