"""Coreset baselines: real pairs selected from the training split (nothing is learned).

random     `budget` random images.
herding    greedy herding (Welling 2009) on joint image-text embeddings of a teacher trained on
           the full data: each pick brings the mean of the picked embeddings closest to the data mean.
k-center   greedy k-center (Sener & Savarese 2018) on the same embeddings: each pick is the point
           farthest from the centres so far.
forgetting the images forgotten most often (Toneva et al. 2019) while a model trains on the full
           data: an image counts as learned when its pair wins its row and column of the batch logits,
           and a forgetting event is learned -> not learned between presentations.
Each image comes with one of its captions, drawn with the run's seed; the set trains at `lr`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmdd.config_schema import build_settings, check_fields
from mmdd.data.transforms import normalize
from mmdd.methods.base import DistillResult, Method, real_pairs
from mmdd.methods.context import MethodContext
from mmdd.synthetic.synthetic_set import SyntheticSet

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- selection rules
def herding_select(features: torch.Tensor, k: int) -> list[int]:
    """Indices of k rows whose running mean tracks the mean of all rows (greedy herding)."""
    mu = features.mean(0)
    chosen: list[int] = []
    running = torch.zeros_like(mu)
    available = torch.ones(features.shape[0], dtype=torch.bool)
    for t in range(1, k + 1):
        # distance of the would-be mean to mu for every candidate
        cand = (running.unsqueeze(0) + features) / t
        dist = (cand - mu).pow(2).sum(1)
        dist[~available] = float("inf")
        i = int(dist.argmin())
        chosen.append(i)
        available[i] = False
        running += features[i]
    return chosen


def kcenter_select(features: torch.Tensor, k: int, first: int = 0) -> list[int]:
    """Greedy k-center: start at `first`, then repeatedly take the point farthest from the centres."""
    chosen = [first]
    dist = (features - features[first]).pow(2).sum(1)
    for _ in range(k - 1):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (features - features[i]).pow(2).sum(1))
    return chosen


# ----------------------------------------------------------------------------- shared helpers
def final_teacher(context: MethodContext):
    """(model, expert): the run's model with the store's first expert's last recorded parameters, in eval mode, and
    that expert's index: the teacher the learning-free selections embed with."""
    from mmdd.models.functional import ParamLayout

    model = context.model.build()
    traj = context.store.open(model, max_experts=1)
    ParamLayout.from_model(model).load_into(model, traj.snapshots(0, [traj.epochs])[0])
    return model.eval(), traj.experts[0]


@torch.no_grad()
def teacher_embeddings(context: MethodContext) -> tuple[torch.Tensor, int]:
    """Joint-space [image ; mean caption] embeddings of every train image under a teacher's final weights, and
    which expert of the store that teacher is."""
    train = context.train
    model, expert = final_teacher(context)
    device = context.device  # every train image through the teacher: a GPU's job at 224 px
    model.to(device)
    img = []
    batch = context.hardware.inference_batch
    for s in range(0, train.num_images, batch):
        idx = list(range(s, min(s + batch, train.num_images)))
        img.append(model.encode_image(train.normalised(idx).to(device)).cpu())
    img = torch.cat(img)
    txt = model.encode_text(train.text_emb.to(device)).cpu()
    txt2img = torch.as_tensor(train.split.txt2img)
    txt_mean = torch.zeros_like(img).index_add_(0, txt2img, txt)
    txt_mean = F.normalize(txt_mean, dim=-1)
    return torch.cat([img, txt_mean], dim=1), expert


@dataclass(kw_only=True)
class CoresetSettings:
    """conf/method/<coreset>.yaml, minus `_target_`/`name`."""

    lr: float  # the students' step size (the set itself is not learned)

    def __post_init__(self):
        check_fields(self, "method", "fix it in conf/method/ or on the command line")


@dataclass(kw_only=True)
class ForgettingSettings(CoresetSettings):
    epochs: int  # epochs of the model whose forgetting events are counted


class RandomCoreset(Method):
    """`budget` random training images, each with one of its captions, trained at a fixed lr."""

    settings_cls: type[CoresetSettings] = CoresetSettings

    def __init__(self, name: str, **settings):
        self.name = name
        self.settings = build_settings(self.settings_cls, settings, "method", f"conf/method/{name}.yaml (method={name})")
        self.teacher_experts: list[int] = []  # the store's experts a selection embeds with (set by `select`)

    def select(self, context: MethodContext) -> list[int]:
        """context.budget images of the train split, by this coreset's rule."""
        gen = torch.Generator().manual_seed(context.seed)
        return torch.randperm(context.train.num_images, generator=gen)[:context.budget].tolist()

    def synthesize(self, context: MethodContext) -> DistillResult:
        chosen = self.select(context)
        gen = torch.Generator().manual_seed(context.seed)
        images, texts = real_pairs(context.train, chosen, gen)
        return DistillResult(SyntheticSet(images, texts, {"image": self.settings.lr, "text": self.settings.lr}),
                             teacher_experts=list(self.teacher_experts))


class HerdingCoreset(RandomCoreset):
    def select(self, context):
        feats, expert = teacher_embeddings(context)
        self.teacher_experts = [expert]
        return herding_select(feats, context.budget)


class KCenterCoreset(RandomCoreset):
    def select(self, context):
        feats, expert = teacher_embeddings(context)
        self.teacher_experts = [expert]
        first = int(torch.randint(context.train.num_images, (1,), generator=torch.Generator().manual_seed(context.seed)))
        return kcenter_select(feats, context.budget, first)


class ForgettingTracker(L.Callback):
    """Counts forgetting events per image while a model trains on the full data."""

    def __init__(self, n: int):
        self.learned = torch.zeros(n, dtype=torch.bool)  # at its last presentation
        self.ever_learned = torch.zeros(n, dtype=torch.bool)
        self.forgotten = torch.zeros(n, dtype=torch.long)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        images, text_emb, img_idx = batch
        with torch.no_grad():
            x = normalize(images, pl_module.mean, pl_module.std)
            logits = pl_module.model(x, text_emb)
            diag = torch.arange(logits.shape[0], device=logits.device)
            correct = ((logits.argmax(1) == diag) & (logits.argmax(0) == diag)).cpu()
        idx = img_idx.cpu()
        self.forgotten[idx] += (self.learned[idx] & ~correct).long()
        self.learned[idx] = correct
        self.ever_learned[idx] |= correct

    def scores(self) -> torch.Tensor:
        """Forgetting counts; never-learned images count as forgotten infinitely often (Toneva et al.)."""
        score = self.forgotten.float()
        score[~self.ever_learned] = float("inf")
        return score


class ForgettingCoreset(RandomCoreset):
    settings_cls = ForgettingSettings

    def select(self, context):
        from mmdd.data.splits import PairDataset, check_full_batches
        from mmdd.data.transforms import per_image_augment
        from mmdd.teachers.expert_module import ExpertModule
        from mmdd.utils.trainer import accelerate_model

        train, teacher = context.train, context.teacher
        torch.manual_seed(context.seed)
        model = accelerate_model(context.model.build(), context.hardware)
        t = teacher.settings
        module = ExpertModule(model, t.lr, t.momentum, t.weight_decay, train.mean, train.std, teacher.augment)
        tracker = ForgettingTracker(train.num_images)
        dataset = PairDataset(train, unit=teacher.unit, augment=per_image_augment(teacher.augment, train))
        check_full_batches(dataset, t.batch_size, "teacher.batch_size")
        # the teachers' loader settings: this is a teacher's training, over every real image
        loader = DataLoader(dataset, batch_size=t.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(context.seed), **teacher.loader)
        context.trainer(None, [tracker], max_epochs=self.settings.epochs).fit(module, loader)
        # Most forgotten first, ties broken by a seeded shuffle.
        score = tracker.scores()
        order = torch.randperm(train.num_images, generator=torch.Generator().manual_seed(context.seed))
        ranked = order[torch.argsort(score[order], descending=True, stable=True)]
        log.info("forgetting: %d images forgotten at least once", int((tracker.forgotten > 0).sum()))
        return ranked[:context.budget].tolist()
