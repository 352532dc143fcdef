"""The retrieval evaluation against the official one: `python experiments/parity/evaluate.py --official <LoRS_Distill>`.

One fixed model (an expert of the LoRS parity run at its last recorded epoch: nfnet_l0 and the text head, trained
by `mmdd buffer`) is evaluated on the test split twice:
- by the official code: `src/epoch.py` epoch_test (its test loader with transform_test, its cached BERT embeddings
  of the test captions, the text projection, scores truncated to each row's top 128, `logit_scale.exp()`) and
  itm_eval (ranks by numpy argsort, R@1/5/10 both ways), called on a view of mmdd's model with the attributes
  epoch_test reads (image_encoder, text_projection, logit_scale);
- by mmdd's `evaluate_retrieval` (mmdd.evaluate.encode / retrieval) on mmdd's paper data path.
Compared: the score matrices and every recall. (epoch_test takes topk(k=128) of every row; with fewer than 128
images here that is all of them, so k is capped at the row length, which keeps every score: R@1/5/10 depend only
on each row's first ten, which the top-128 truncation keeps, on Flickr30K's 1000 x 5000 as here.)

What is not compared here: the students' training (evaluate_synset_with_similarity's SGD, schedule and batch draw
against `protocol=lors`); see ../parity.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import mmdd_data, official_modules  # noqa: E402
from run import git_commit, on_lors_run, relative  # noqa: E402


class OfficialView(torch.nn.Module):
    """mmdd's DualEncoder seen through the attributes the official epoch_test reads."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.logit_scale = model.logit_scale

    def image_encoder(self, images):
        return self.model.image_head(self.model.features(images))

    def text_projection(self, text):
        return self.model.text_head(text)


def expert_model(cfg, store_dir: Path, text_dim: int):
    """The store's expert 0 at its last recorded epoch, in the parity run's model."""
    from mmdd.models.dual_encoder import build_dual_encoder
    from mmdd.models.functional import ParamLayout
    from mmdd.teachers.trajectory_store import ExpertSnapshots, TrajectoryStore

    model = build_dual_encoder(cfg.model, text_dim, int(cfg.data.image_size))
    store = TrajectoryStore.open(store_dir)
    reader = ExpertSnapshots(store, store.param_names, store.completed_experts())
    ParamLayout.from_model(model).load_into(model, reader.snapshots(0, [reader.epochs])[0])
    return model.eval()


def tied_queries(scores: torch.Tensor, txt2img: torch.Tensor) -> dict:
    """Queries whose best ground-truth score equals another candidate's exactly (e.g. two identical captions)."""
    n_img = scores.shape[0]
    tr = 0
    for i in range(n_img):
        gt = (txt2img == i).nonzero().flatten()
        best = scores[i, gt].max()
        others = torch.ones(scores.shape[1], dtype=torch.bool)
        others[gt] = False
        tr += bool((scores[i, others] == best).any())
    ir = 0
    for t in range(scores.shape[1]):
        col = scores[:, t]
        gt = int(txt2img[t])
        ir += bool(((col == col[gt]).sum() > 1))
    return {"text_retrieval": tr, "of_images": n_img, "image_retrieval": ir, "of_captions": int(scores.shape[1])}


def compare(model, test, cfg, embed: torch.Tensor, test_set, epoch) -> dict:
    """mmdd's evaluation of `model` on `test` against the official epoch_test + itm_eval on `embed` (the test
    captions' embeddings as the official run cached them) and its test loader."""
    from mmdd.evaluate.encode import encode_split, evaluate_retrieval

    ours = evaluate_retrieval(model, test, cfg.hardware.inference_batch)
    img, txt = encode_split(model, test, cfg.hardware.inference_batch)
    our_scores = model.logit_scale.exp() * img @ txt.t()
    loader = torch.utils.data.DataLoader(test_set, batch_size=64, shuffle=False)
    topk, to = torch.Tensor.topk, torch.Tensor.to
    torch.Tensor.topk = capped_topk(topk)
    torch.Tensor.to = lambda self, *a, **k: to(self, *["cpu" if x == "cuda" else x for x in a], **k)
    try:
        with torch.no_grad():
            i2t, t2i = epoch.epoch_test(loader, OfficialView(model), "cpu", embed)
        theirs = epoch.itm_eval(i2t, t2i, test_set.txt2img, test_set.img2txt)
    finally:
        torch.Tensor.topk, torch.Tensor.to = topk, to
    names = {"ir1": "img_r1", "ir5": "img_r5", "ir10": "img_r10", "tr1": "txt_r1", "tr5": "txt_r5",
             "tr10": "txt_r10", "r_mean": "r_mean"}
    # 1. the score matrices, where the official one keeps a score (each row's top 128; -100 elsewhere)
    scores = torch.from_numpy(i2t)
    kept = scores > -100
    rel = relative(our_scores[kept], scores[kept])
    # 2. the two metric functions on the same (mmdd's) scores: they differ only where scores tie exactly, which the
    # official argsort breaks by index order and mmdd counts against the query (pessimistic)
    official_on_ours = epoch.itm_eval(our_scores.numpy(), our_scores.t().numpy(), test_set.txt2img, test_set.img2txt)
    recalls = {k: {"official": float(theirs[v]), "mmdd": ours[k], "official_metric_on_mmdd_scores":
                   float(official_on_ours[v])} for k, v in names.items()}
    return {"recalls": recalls, "scores_relative": rel, "tied_queries": tied_queries(our_scores, test.txt2img),
            "largest_recall_difference": max(abs(v["official"] - v["mmdd"]) for v in recalls.values())}


def capped_topk(original):
    def topk(self, k, *args, **kwargs):
        dim = kwargs.get("dim", args[0] if args else -1)
        return original(self, min(k, self.shape[dim]), *args, **kwargs)
    return topk


def main() -> int:
    args, official, work, inputs = on_lors_run(__doc__, "LoRS_Distill")
    cfg, data = mmdd_data(work, inputs, args.image_size)
    test = data["test"]
    model = expert_model(cfg, inputs["store"], test.text_emb.shape[1])

    official_data, _, _ = official_modules(official)
    import src.epoch as epoch

    embed = torch.from_numpy(np.load(work / "official" / "cwd" / "flickr_bert_text_embed.npz")["bert_test_embed"])
    _, _, test_set = official_data.create_dataset(SimpleNamespace(
        image_size=args.image_size, no_aug=False, dataset="flickr", image_root=str(inputs["image_root"]) + "/",
        ann_root=str(inputs["ann_root"])))
    # The embedded dataset repeats captions (templates), so exact score ties are common; a second comparison feeds
    # both sides the same caption embeddings with a small seeded jitter, which breaks them.
    jitter = embed + 0.05 * embed.std() * torch.randn(embed.shape, generator=torch.Generator().manual_seed(0))
    result = {"official_commit": git_commit(official), "images": test.num_images,
              "captions": int(test.text_emb.shape[0]),
              "as_is": compare(model, test, cfg, embed, test_set, epoch),
              "ties_broken": compare(model, replace(test, text_emb=jitter), cfg, jitter, test_set, epoch),
              "command": " ".join(["python", "experiments/parity/evaluate.py", *sys.argv[1:]])}
    (work / "parity_evaluate.json").write_text(json.dumps(result, indent=2))
    for case in ("as_is", "ties_broken"):
        r = result[case]
        print(f"{case}: scores (kept entries) relative {r['scores_relative']:.1e}; queries whose ground truth ties "
              f"another candidate: {r['tied_queries']}")
        for k, v in r["recalls"].items():
            print(f"  {k}: official {v['official']:.2f} | official metric on mmdd's scores "
                  f"{v['official_metric_on_mmdd_scores']:.2f} | mmdd {v['mmdd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
