"""Distribution matching: the set is learned so that its embeddings are distributed as the real data's, under an
encoder drawn anew each iteration (mmdd.methods.distribution.encoders). Single-level: no trajectories are unrolled, so an
iteration costs two forward passes and one backward.

dm   DM for image-text (after Zhao & Bilen, WACV 2023): squared distance of the mean embeddings of a real and a
     synthetic batch, per modality and of the joint views u = norm(z_v + z_t), g = norm(z_v - z_t), under randomly
     initialised encoders. The simplest member of the family: MDM's parts are ablated against it.
mdm  MDM-style (Multimodal Distribution Matching, CVPR 2026; code andyj1/mdm, distill_mdm.py):
         L = lambda_nce InfoNCE(synthetic pairs) + lambda_agr GKE(u_syn, u_real) + lambda_dis GKE(g_syn, g_real)
     with GKE the geodesic-kernel MMD (mmdd.methods.distribution.mmd), a mixed teacher as the encoder, and a k-means
     initialisation in the teacher's joint image-text space. "-style" because MDM's release cannot run as published
     (no data package; its teacher merge and default k-means path are broken; the loop saves nothing): its data
     order, transforms and evaluation cannot be read. What could be read is followed; differences are named in
     conf/method/mdm.yaml.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F

from mmdd.config_schema import build_settings, check_fields
from mmdd.errors import MmddError
from mmdd.evaluate.encode import BackboneFeatures, encode_split
from mmdd.methods.selection.clustering import METRICS, SEEDINGS, kmeans, nearest_members
from mmdd.methods.distribution.dsa import DSASettings, SiameseAugment
from mmdd.methods.distribution.encoders import EncoderSampler, EncoderSettings
from mmdd.methods.context import MethodContext
from mmdd.methods.engine.learned import LearnedMethod
from mmdd.methods.distribution.mmd import ESTIMATORS, agreement_and_disparity, gke, mean_distance
from mmdd.methods.engine.outer_loop import Backward, ObjectiveStep, OuterSettings
from mmdd.models.losses import symmetric_infonce
from mmdd.synthetic.synthetic_set import SyntheticSet

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DistributionSettings(OuterSettings):
    """What every distribution-matching method sets (conf/method/dm.yaml, mdm.yaml)."""

    real_batch: int  # real (image, caption) pairs per iteration, drawn uniformly without replacement
    syn_batch: int | None  # synthetic pairs per iteration (MDM: at most 64); None = all
    encoder: dict  # mmdd.methods.distribution.encoders.EncoderSettings
    # differentiable Siamese augmentation of the real and the synthetic images (mmdd.methods.distribution.dsa:
    # DM's DSA); None = off
    dsa: dict | None
    # what is matched: embeddings (the towers' L2-normalised outputs and their joint views) | features (DM's: the
    # image backbone's features and the text embeddings, unnormalised; no joint views)
    space: Literal["embeddings", "features"]

    def __post_init__(self):
        super().__post_init__()
        self.encoder_settings = build_settings(EncoderSettings, self.encoder, "method.encoder",
                                               "conf/method/ or the command line")
        self.dsa_settings = (build_settings(DSASettings, self.dsa, "method.dsa", "conf/method/ or the command line")
                             if self.dsa is not None else None)
        if self.real_batch < 2 or (self.syn_batch is not None and self.syn_batch < 2):
            raise MmddError("method.real_batch and method.syn_batch must be >= 2 (a distribution needs samples)")

    def syn_batch_size(self, pairs: int) -> int:
        """Synthetic pairs embedded per iteration, for a set of `pairs`."""
        return pairs if self.syn_batch is None else min(self.syn_batch, pairs)


class RealPairs:
    """Uniform batches of real (image, caption) pairs, one row per caption as the papers' loaders, embedded by the
    iteration's encoder: images read from the split's decoded images (never re-decoded), or, under a frozen backbone,
    its features of every train image computed once (`features`, the evaluation's cache), so only the heads run."""

    def __init__(self, train, features: BackboneFeatures | None = None):
        self.train, self.features = train, features
        self.txt2img = train.txt2img

    @torch.no_grad()
    def embed(self, model, n: int, generator: torch.Generator, device, augment=None, space: str = "embeddings"
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` pairs in `space` (DistributionSettings.space), the images through `augment` first (DSA; never with
        cached features)."""
        caps = torch.randperm(self.txt2img.shape[0], generator=generator)[:n]
        rows = self.txt2img[caps]
        if self.features is not None:
            feats = self.features.split(model, self.train)[rows].to(device)
            images = feats if space == "features" else F.normalize(model.image_head(feats), dim=-1)
        else:
            # uint8 to the device, normalised there: a quarter of the bytes to move every iteration
            pixels = self.train.normalise(self.train.image_batch(rows.tolist()).to(device))
            if augment is not None:
                pixels = augment(pixels)
            images = model.features(pixels) if space == "features" else model.encode_image(pixels)
        texts = self.train.text_emb[caps].to(device)
        return images, texts if space == "features" else model.encode_text(texts)


class DistributionLoss:
    """A method's loss on embedded synthetic and real batches: weighted `terms` (each logged)."""

    def __init__(self, settings: DistributionSettings):
        self.settings = settings
        weights = self.weights()
        if min(weights.values()) < 0 or not any(weights.values()):
            named = ", ".join(f"lambda_{k}={w}" for k, w in weights.items())
            raise MmddError(f"method: the loss weights ({named}) must be >= 0 with at least one above 0")

    def weights(self) -> dict[str, float]:
        raise NotImplementedError

    def terms(self, syn_img, syn_txt, real_img, real_txt) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, syn_img, syn_txt, real_img, real_txt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms = self.terms(syn_img, syn_txt, real_img, real_txt)
        return sum(w * terms[k] for k, w in self.weights().items() if w), terms


class DistributionObjective:
    """One iteration: draw an encoder, embed a real batch (no grad) and a synthetic batch, and back-propagate the
    method's loss to the synthetic images and texts."""

    def __init__(self, model, encoders: EncoderSampler, real: RealPairs, settings: DistributionSettings,
                 loss: DistributionLoss):
        self.model = model
        self.encoders = encoders
        self.real = real
        self.settings = settings
        self.loss = loss
        self.augment = SiameseAugment(settings.dsa_settings) if settings.dsa_settings is not None else None
        self.teacher_experts = list(encoders.trajectories.experts) if encoders.trajectories is not None else []

    def __call__(self, syn: SyntheticSet, generator: torch.Generator, backward: Backward) -> ObjectiveStep:
        s, device = self.settings, syn.images.device
        stats = self.encoders.draw(generator)
        augment = None
        if self.augment is not None:  # one transformation for the real and the synthetic batch (DSA)
            augment = partial(self.augment.apply, drawn=self.augment.draw(generator, *syn.images.shape[-2:]))

        real_img, real_txt = self.real.embed(self.model, s.real_batch, generator, device, augment, s.space)
        idx = torch.randperm(len(syn), generator=generator)[: s.syn_batch_size(len(syn))].to(device)
        images = syn.images[idx] if augment is None else augment(syn.images[idx])
        if s.space == "features":
            syn_img, syn_txt = self.model.features(images), syn.texts[idx]
        else:
            syn_img, syn_txt = self.model.encode_image(images), self.model.encode_text(syn.texts[idx])
        loss, terms = self.loss(syn_img, syn_txt, real_img, real_txt)
        backward(loss, [syn.images, syn.texts])
        return ObjectiveStep(loss.detach(), {k: v.detach() for k, v in terms.items()}, stats)


# ---------------------------------------------------------------------------------------------------- DM
@dataclass(kw_only=True)
class DMSettings(DistributionSettings):
    lambda_image: float  # |mean z_v(syn) - mean z_v(real)|^2
    lambda_text: float  # the same for z_t
    lambda_agr: float  # for u = norm(z_v + z_t)
    lambda_dis: float  # for g = norm(z_v - z_t)

    def __post_init__(self):
        super().__post_init__()
        if self.space == "features" and (self.lambda_agr or self.lambda_dis):
            raise MmddError("method.space=features matches the image features and the text embeddings, which live in "
                            "different spaces: the joint views u, g need embeddings. Set method.lambda_agr=0 and "
                            "method.lambda_dis=0, or method.space=embeddings")


class DMLoss(DistributionLoss):
    def weights(self):
        s = self.settings
        if s.space == "features":
            return {"image": s.lambda_image, "text": s.lambda_text}
        return {"image": s.lambda_image, "text": s.lambda_text, "agr": s.lambda_agr, "dis": s.lambda_dis}

    def terms(self, syn_img, syn_txt, real_img, real_txt):
        if self.settings.space == "features":
            return {"image": mean_distance(syn_img, real_img), "text": mean_distance(syn_txt, real_txt)}
        su, sg = agreement_and_disparity(syn_img, syn_txt)
        ru, rg = agreement_and_disparity(real_img, real_txt)
        return {"image": mean_distance(syn_img, real_img), "text": mean_distance(syn_txt, real_txt),
                "agr": mean_distance(su, ru), "dis": mean_distance(sg, rg)}


# ---------------------------------------------------------------------------------------------------- MDM
@dataclass(kw_only=True)
class MDMSettings(DistributionSettings):
    lambda_nce: float  # InfoNCE of the synthetic pairs under the teacher (MDM's w_nce; its script 1.0)
    lambda_agr: float  # GKE of u (MDM's w_sph_u_mmd; its script 0.8)
    lambda_dis: float  # GKE of g (w_sph_g_mmd; 0.8)
    sigma_agr: float  # kernel bandwidths (radians)
    sigma_dis: float
    estimator: Literal[ESTIMATORS]  # unbiased (MDM's code) | biased (MDM's page)
    sqrt: bool  # GKE = sqrt(MMD^2) (MDM's --sqrtmmd True)
    diversity_weight: float  # weight of the synthetic within-set kernel term
    temperature: float  # InfoNCE logits = cos / temperature
    kmeans: dict  # init=kmeans: KMeansInit

    INITS = ("real", "noise", "kmeans")

    def __post_init__(self):
        super().__post_init__()
        if min(self.sigma_agr, self.sigma_dis, self.temperature) <= 0:
            raise MmddError("method.sigma_agr, sigma_dis and temperature must be > 0")
        if self.space != "embeddings":
            raise MmddError("method.space: MDM's loss (InfoNCE, kernels on the sphere) is defined on embeddings; "
                            "method.space=features is DM's (method=dm)")
        self.kmeans_settings = build_settings(KMeansInit, self.kmeans, "method.kmeans", "conf/method/ or the command line")


@dataclass(kw_only=True)
class KMeansInit:
    """method.kmeans: MDM's initialisation, one real pair per cluster of the (image, caption) rows."""

    space: Literal["image_text", "image", "text"]  # image_text: norm([z_v ; z_t]) | image | text
    metric: Literal[METRICS]  # MDM: fast_pytorch_kmeans mode=cosine
    iterations: int
    tol: float
    restarts: int
    seeding: Literal[SEEDINGS]  # plus_plus (k-means++) | random (k distinct rows: fast_pytorch_kmeans, MDM's)

    def __post_init__(self):
        check_fields(self, "method.kmeans", "fix it in conf/method/ or on the command line")


class MDMLoss(DistributionLoss):
    def weights(self):
        s = self.settings
        return {"nce": s.lambda_nce, "agr": s.lambda_agr, "dis": s.lambda_dis}

    def terms(self, syn_img, syn_txt, real_img, real_txt):
        s = self.settings
        su, sg = agreement_and_disparity(syn_img, syn_txt)
        ru, rg = agreement_and_disparity(real_img, real_txt)
        return {
            "nce": symmetric_infonce(syn_img @ syn_txt.t() / s.temperature),
            "agr": gke(su, ru, s.sigma_agr, s.estimator, s.diversity_weight, s.sqrt),
            "dis": gke(sg, rg, s.sigma_dis, s.estimator, s.diversity_weight, s.sqrt),
        }


# ---------------------------------------------------------------------------------------------------- methods
def joint_rows(image_features: torch.Tensor, text_features: torch.Tensor, txt2img: torch.Tensor, space: str
               ) -> torch.Tensor:
    """One row per (image, caption) annotation in the chosen space (image_text: the normalised concatenation)."""
    if space == "image":
        return image_features[txt2img]
    if space == "text":
        return text_features
    return F.normalize(torch.cat([image_features[txt2img], text_features], dim=1), dim=1)


class DistributionMatching(LearnedMethod):
    """DM; MDM below differs in its loss, its encoder and its initialisation."""

    settings_cls = DMSettings
    loss_cls = DMLoss
    distillation_kind = "distribution"  # mmdd plan's distribution-matching estimate

    def variant(self) -> dict:
        s = self.settings
        encoder = s.encoder_settings
        return {"space": s.space, "dsa": s.dsa_settings.strategy if s.dsa_settings is not None else None,
                "encoder": encoder.kind + (f" (anchor {encoder.anchor})" if encoder.kind == "mixed" else "")}

    def make_encoders(self, context: MethodContext, model, fingerprint: str) -> EncoderSampler:
        s = self.settings.encoder_settings
        store = context.store.open(model, None, fingerprint) if s.needs_store else None
        return EncoderSampler(s, model, store, context.model.build)

    def make_objective(self, context: MethodContext, model, fingerprint: str) -> DistributionObjective:
        self.encoders = self.make_encoders(context, model, fingerprint)
        # A frozen backbone (no encoder kind redraws it): its features of the train images, once for every iteration
        # (not under DSA: every iteration augments the pixels anew).
        cacheable = model.backbone_is_cacheable() and self.settings.dsa_settings is None
        self.features = BackboneFeatures(context.hardware.inference_batch, cache_dir=context.cache_dir,
                                         data_key=context.data_key) if cacheable else None
        real = RealPairs(context.train, self.features)
        return DistributionObjective(model, self.encoders, real, self.settings, self.loss_cls(self.settings))


class MultimodalDistributionMatching(DistributionMatching):
    settings_cls = MDMSettings
    loss_cls = MDMLoss

    def initial_set(self, context: MethodContext, pairs: int, resuming: bool = False) -> SyntheticSet:
        if self.settings.init != "kmeans" or resuming:  # a resumed run's set comes from its checkpoint: no k-means
            return super().initial_set(context, pairs)
        train, budget = context.train, pairs
        k = self.settings.kmeans_settings
        # The encoder of a first draw from the run's seed (MDM: its mixed teacher, built once for the init).
        self.encoders.draw(torch.Generator().manual_seed(context.seed))
        model = self.encoders.model
        img, txt = encode_split(model.to(context.device), train, context.hardware.inference_batch,
                                features=self.features)
        model.to("cpu")  # the trainer moves it where it runs
        rows = joint_rows(img, txt, train.txt2img.to(img.device), k.space)
        result = kmeans(rows, budget, torch.Generator().manual_seed(context.seed), k.metric, k.iterations, k.tol,
                        k.restarts, k.seeding)
        captions = torch.tensor(nearest_members(rows, result, k.metric))
        log.info("k-means init: %d clusters of %d (image, caption) rows in %s space after %d iterations; %d distinct "
                 "images", budget, rows.shape[0], k.space, result.iterations,
                 len(set(train.txt2img[captions].tolist())))
        images = train.normalised(train.txt2img[captions].tolist())
        lr = self.settings.lr_init
        return SyntheticSet(images, train.text_emb[captions].clone(), {"image": lr, "text": lr}, None)
