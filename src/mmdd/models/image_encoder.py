"""Image backbones by name: mmdd's own (BACKBONES: the CPU ConvNet) or any timm model.

mmdd's entries follow timm's convention (`entry(pretrained, **settings)`, settings declared by name), but live in
mmdd's registry rather than timm's: registering there needs `import timm.models` (2 s) in every process, which the
ConvNet runs never need."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmdd.errors import ArtifactError, MmddError
from mmdd.models.convnet import ConvNet


def convnet(pretrained: bool = False, *, image_size: int = 32, width: int = 64, depth: int = 3,
            feature_side: int | None = None, num_classes: int = 0, global_pool: str = "avg", **kwargs) -> ConvNet:
    """mmdd's ConvNet as a backbone entry. A feature extractor: timm's num_classes/global_pool are accepted and mean
    nothing here. A null in the config is not passed (as timm drops None keyword values), so each default is what
    null means: feature_side None = no pooling."""
    if pretrained:
        raise MmddError("model.image.name=convnet has no pretrained weights: set model.image.pretrained=false and load "
                        "a backbone with model.image.checkpoint (e.g. from `mmdd pretrain`)")
    if image_size % (2**depth) != 0:
        raise MmddError(f"model.image.depth={depth}: the ConvNet halves the image {depth} times, so data.image_size "
                        f"({image_size}) must be divisible by {2**depth}; choose another depth or image size")
    return ConvNet(image_size=image_size, width=width, depth=depth, feature_side=feature_side)


BACKBONES = {"convnet": convnet}  # model.image.name -> entry; any other name is a timm model


def build_image_backbone(
    name: str,
    image_size: int,
    pretrained: bool = False,
    checkpoint: str | None = None,
    options: dict | None = None,
    **shape,
) -> tuple[nn.Module, int]:
    """(backbone, feature_dim) of `name`: an entry of BACKBONES, or timm's model of that name. `shape`: settings of
    model.image an entry declares by name (the ConvNet's width, depth, feature_side, and the image size); timm models
    take theirs from their name. Null settings are not passed. `options` (model.image.options) go to the entry or
    timm.create_model as they are, e.g. {img_size: 32, patch_size: 4} for a ViT at 32 px."""
    import inspect

    if name in BACKBONES:
        entry = BACKBONES[name]
    else:
        import timm
        from timm.models import model_entrypoint

        try:
            entry = model_entrypoint(name)
        except (KeyError, RuntimeError):  # e.g. hf-hub: names, which timm.create_model resolves; it says what fails
            entry = None
    declared = inspect.signature(entry).parameters if entry is not None else {}
    settings = {k: v for k, v in {"image_size": image_size, **shape}.items() if k in declared and v is not None}
    settings.update(options or {})
    try:
        if name in BACKBONES:
            net = entry(pretrained, num_classes=0, global_pool="avg", **settings)
        else:
            net = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="avg", **settings)
    except MmddError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = " (pretrained weights need network access to the Hugging Face hub)" if pretrained else ""
        if entry is None:
            hint += f" (model.image.name is neither one of {sorted(BACKBONES)} nor a timm model name)"
        raise MmddError(f"could not build the image backbone {name!r}{hint}: {exc}") from exc
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
