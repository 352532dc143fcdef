"""Dual encoder over images and *cached* caption embeddings.

The text backbone is frozen and applied once, ahead of time (see mmdd.data.text_cache), so
the trainable text side is only its projection head. Logits are cosine similarities times
exp(log(1/T)); with a fixed T this is exactly 1/T (MTT-VL's code applied the log scale
without exp, which we do not repeat).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from mmdd.errors import ArtifactError, MmddError
from mmdd.models.heads import ProjectionHead
from mmdd.models.image_encoder import build_image_backbone
from mmdd.utils.profiling import scope

# Which parameters train (and are recorded/matched) per modality: everything | the heads on a frozen backbone | the
# text head only, the whole image tower frozen (PDS's students: a frozen pre-trained image encoder, a text projection).
TRAINABLE_MODES = ("backbone_and_heads", "heads", "text")


class DualEncoder(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        backbone_dim: int,
        text_dim: int,
        embed_dim: int | None = None,
        image_head: bool = False,
        dropout: float = 0.0,
        temperature: float = 0.07,
        trainable: str = "backbone_and_heads",
    ):
        super().__init__()
        if trainable not in TRAINABLE_MODES:
            raise MmddError(f"model.trainable must be one of {TRAINABLE_MODES}, got {trainable!r}")
        if trainable == "heads" and not image_head:
            raise MmddError("model.trainable=heads (or protocol.trainable=heads) needs model.image_head=true: "
                            "with a frozen backbone and no image head nothing would train on the image side")
        self.backbone = backbone
        embed_dim = embed_dim or backbone_dim
        if not image_head and embed_dim != backbone_dim:
            raise MmddError(f"without an image head, embed_dim ({embed_dim}) must equal the backbone dim ({backbone_dim})")
        self.image_head = ProjectionHead(backbone_dim, embed_dim, dropout) if image_head else nn.Identity()
        self.text_head = ProjectionHead(text_dim, embed_dim, dropout)
        self.register_buffer("logit_scale", torch.tensor(math.log(1.0 / temperature)), persistent=False)
        self.temperature = temperature
        self.trainable = trainable
        self.text_dim = text_dim
        self.embed_dim = embed_dim
        self.channels_last = False
        self._compiled_backbone = None  # a plain function, so it is neither a submodule nor in the state dict
        if self.backbone_frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        if trainable == "text":
            for p in self.image_head.parameters():
                p.requires_grad_(False)

    @property
    def backbone_frozen(self) -> bool:
        return self.trainable in ("heads", "text")

    def set_temperature(self, temperature: float) -> None:
        """The logits' temperature from now on (`method.temperature` changes the inner loop's)."""
        self.temperature = temperature
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / temperature))

    def _apply(self, fn, recurse=True):
        # A dtype change (64-true's .double()) recomputes the scale in the new dtype instead of casting a rounded one.
        super()._apply(fn, recurse)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1.0 / self.temperature))
        return self

    def backbone_is_cacheable(self) -> bool:
        """Whether the backbone's features of an image are a fixed function of that image alone: frozen
        parameters and no batch statistics. Then an iteration can compute them once for all steps."""
        if not self.backbone_frozen:
            return False
        return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.backbone.modules())

    # -- parameter groups -------------------------------------------------------------
    def modality_parameter_names(self) -> dict[str, list[str]]:
        """Names of the trainable parameters per modality ("image", "text"), in a fixed order."""
        image, text = [], []
        for name, p in self.named_parameters():
            if name.startswith("text_head."):
                text.append(name)
            elif name.startswith("image_head.") and self.trainable != "text":
                image.append(name)
            elif name.startswith("backbone.") and self.trainable == "backbone_and_heads":
                image.append(name)
        return {"image": image, "text": text}

    # -- speed switches (hardware.channels_last, hardware.compile) ----------------------
    def accelerate(self, channels_last: bool = False, compile: bool = False) -> "DualEncoder":
        """Channels-last memory format for the backbone's weights and inputs, and/or a `torch.compile`d
        backbone. Neither changes what is computed: parameters keep their values and names, and
        trajectories are flattened in logical order. The compiled backbone only supports first-order
        autograd through it (see mmdd.utils.trainer.accelerate_model)."""
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self._compiled_backbone = torch.compile(self.backbone.forward) if compile else None
        return self

    @property
    def compiled(self) -> bool:
        return self._compiled_backbone is not None

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of (normalised) images, through the speed switches."""
        with scope("backbone"):
            if self.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            return (self._compiled_backbone or self.backbone)(images)

    # -- forward ----------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(self.features(images)), dim=-1)

    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(text_emb), dim=-1)

    def similarity(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return img @ txt.t() * self.logit_scale.exp()

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor, mix: tuple | None = None,
                from_features: bool = False) -> torch.Tensor:
        """Logits [B_img, B_txt] = cos(img, txt) / T.

        `mix = (lam, perm)` blends representations before the heads (RepBlend): backbone features
        and text embeddings both become lam * x + (1 - lam) * x[perm], with one shared perm.
        `from_features=True`: `images` are already backbone features (a frozen backbone's, cached).
        """
        feats = images if from_features else self.features(images)
        with scope("heads"):
            if mix is None:
                return self.similarity(F.normalize(self.image_head(feats), dim=-1), self.encode_text(text_emb))
            lam, perm = mix
            feats = lam * feats + (1 - lam) * feats[perm]
            text_emb = lam * text_emb + (1 - lam) * text_emb[perm]
            img = F.normalize(self.image_head(feats), dim=-1)
            return self.similarity(img, self.encode_text(text_emb))


def backbone_fingerprint(model) -> str:
    """Hash of the backbone's parameters and buffers: two frozen backbones give the same features only if this is
    equal (a loaded checkpoint gives every stage the same one)."""
    h = hashlib.sha1()
    for name, t in sorted({**dict(model.backbone.named_parameters()), **dict(model.backbone.named_buffers())}.items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def frozen_backbone_fingerprint(model) -> str | None:
    """The fingerprint of a frozen backbone (recorded in stores and sets), None when the backbone trains."""
    return backbone_fingerprint(model) if model.backbone_frozen else None


def check_same_frozen_backbone(what: str, recorded: str | None, here: str | None) -> None:
    """Refuse `what` (a store, a synthetic set) made on another frozen backbone than this run's (both fingerprints
    known and different): its features would not be the ones it was made for."""
    if recorded and here and recorded != here:
        raise ArtifactError(f"{what} was made on a frozen backbone with fingerprint {recorded}, but this run's frozen "
                            f"backbone is {here}: its features are not the ones it was made for. Load the same "
                            "backbone (model.image.checkpoint / pretrained, or the same model.image.init_seed for a "
                            "random one)")


def build_dual_encoder(model_cfg, text_dim: int, image_size: int) -> DualEncoder:
    """The `model` config group (conf/model/*.yaml, a partial `_target_`) built for captions embedded in `text_dim`
    dimensions and images of `image_size` pixels."""
    from hydra.utils import instantiate

    return instantiate(model_cfg, _convert_="all")(text_dim=text_dim, image_size=image_size)


def dual_encoder(*, text_dim: int, image_size: int, image: dict, image_head: bool, embed_dim: int | None,
                 dropout: float, temperature: float, trainable: str, name: str = "", text: dict | None = None
                 ) -> DualEncoder:
    """A DualEncoder from the settings of conf/model/*.yaml (`name` and `text`, how captions are embedded once by
    mmdd.models.text_encoder, say what the model is but build nothing here).

    A frozen backbone that loads no weights (trainable=heads, image.pretrained false, no image.checkpoint) is drawn
    from `image.init_seed`, not from the stage's seed: teachers, distillation and students then stand on the same
    random backbone (each stage drawing its own would match the heads' trajectories on other features)."""
    pretrained = bool(image.get("pretrained", False))
    frozen_random = trainable in ("heads", "text") and not pretrained and not image.get("checkpoint")
    shape = {k: image.get(k) for k in ("width", "depth", "feature_side")}

    def make_backbone():
        return build_image_backbone(image["name"], image_size=image_size, pretrained=pretrained,
                                    checkpoint=image.get("checkpoint"), options=image.get("options"), **shape)

    if frozen_random:
        if image.get("init_seed") is None:
            raise MmddError(f"model.trainable={trainable} freezes a backbone that loads no weights "
                            "(model.image.pretrained false, no model.image.checkpoint): set model.image.init_seed=<int> "
                            "so every stage draws the same random backbone, or load one (mmdd pretrain, "
                            "model.image.checkpoint=...)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(image["init_seed"]))
            backbone, dim = make_backbone()
    else:
        backbone, dim = make_backbone()
    return DualEncoder(backbone, backbone_dim=dim, text_dim=text_dim, embed_dim=embed_dim, image_head=image_head,
                       dropout=dropout, temperature=temperature, trainable=trainable)
