"""The maths of the methods after trajectory matching (kernels, MMD, merging, k-means, Hungarian matching,
prototypes) against hand-computed values, and DM, MDM and PDS-style selection through the real `mmdd distill`."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_in_process
from helpers import SMALL, method_settings
from mmdd.errors import MmddError
from mmdd.methods.engine.outer_loop import OuterLoopModule


def test_loss_weights_must_leave_a_loss():
    from mmdd.methods.distribution.objective import DMLoss, DMSettings, MDMLoss, MDMSettings

    with pytest.raises(MmddError, match="lambda_image=0.0, lambda_text=0.0, lambda_agr=0.0, lambda_dis=0.0"):
        DMLoss(method_settings(DMSettings, "dm", lambda_image=0.0, lambda_text=0.0, lambda_agr=0.0, lambda_dis=0.0))
    with pytest.raises(MmddError, match="must be >= 0"):
        MDMLoss(method_settings(MDMSettings, "mdm", lambda_agr=-1.0))
    MDMLoss(method_settings(MDMSettings, "mdm", lambda_agr=0.0, lambda_dis=0.0))  # InfoNCE alone is a loss


def test_dm_features_space_and_dsa_settings_are_checked():
    from mmdd.methods.distribution.objective import DMSettings, MDMSettings

    with pytest.raises(MmddError, match="lambda_agr=0 and method.lambda_dis=0"):
        method_settings(DMSettings, "dm", space="features")
    with pytest.raises(MmddError, match="method.space=features is DM's"):
        method_settings(MDMSettings, "mdm", space="features")
    with pytest.raises(MmddError, match="method.dsa"):
        method_settings(DMSettings, "dm", dsa={"strategy": "color"})  # the other fields missing


def test_mdm_distills_from_kmeans_medoids_with_its_three_terms(root):
    run_in_process(["distill", "method=mdm", *SMALL, "method.syn_batch=4", "method.real_batch=16",
                    "hydra.run.dir=outputs/mdm"], root, check=True)
    out = root / "outputs" / "mdm" / "synthetic"
    manifest = json.loads((out / "manifest.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert manifest["method"] == "mdm" and len(history) == 4
    assert {"distill/loss_nce", "distill/loss_agr", "distill/loss_dis", "distill/encoder_epoch"} <= set(history[0])
    for h in history:
        assert h["distill/matching_loss"] == pytest.approx(
            h["distill/loss_nce"] + 0.8 * h["distill/loss_agr"] + 0.8 * h["distill/loss_dis"], rel=1e-5)
    assert manifest["distill_stats"]["iterations"] == 4
    cost = manifest["distill_stats"]["cost"]  # the mixed teacher draws from both experts: their training is counted
    assert cost["teachers"]["experts"] == 2 and cost["teachers"]["seconds"] > 0 and cost["distill_seconds"] > 0
    assert cost["device"].startswith("cpu")
    assert cost["storage"] == {"pairs": 8, "images": 8 * 3 * 32 * 32, "texts": 8 * 384, "similarity": 0, "step_sizes": 2,
                               "floats": 8 * 3 * 32 * 32 + 8 * 384 + 2}


def test_dm_and_pds_distill_and_save_a_set(root):
    run_in_process(["distill", "method=dm", *SMALL, "method.real_batch=16", "hydra.run.dir=outputs/dm"], root,
                   check=True)
    history = json.loads((root / "outputs" / "dm" / "synthetic" / "history.json").read_text())
    assert {"distill/loss_image", "distill/loss_text", "distill/loss_agr", "distill/loss_dis"} <= set(history[0])
    # DM as its paper runs it: DSA, and the backbone's features (not the joint embeddings) matched
    run_in_process(["distill", "method=dm", "method/dsa=standard", "method.space=features", "method.lambda_agr=0",
                    "method.lambda_dis=0", *SMALL, "method.real_batch=16", "hydra.run.dir=outputs/dm_dsa"], root,
                   check=True)
    out = root / "outputs" / "dm_dsa" / "synthetic"
    history = json.loads((out / "history.json").read_text())
    assert {"distill/loss_image", "distill/loss_text"} <= set(history[0]) and "distill/loss_agr" not in history[0]
    variant = json.loads((out / "manifest.json").read_text())["variant"]  # which DM a table's row is
    assert variant == {"space": "features", "dsa": "color_crop_cutout_flip_scale_rotate", "encoder": "random"}
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "hydra.run.dir=outputs/pds"], root,
                   check=True)
    manifest_file = root / "outputs" / "pds" / "synthetic" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["method"] == "pds" and manifest["budget"] == 8
    assert manifest["distill_stats"]["cost"]["teachers"]["experts"] == 1  # one teacher embeds
    # a rerun reuses the complete selection (no second k-means); another setting or resume=false selects again
    stamp = manifest_file.stat().st_mtime_ns
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "hydra.run.dir=outputs/pds"], root,
                   check=True)
    assert manifest_file.stat().st_mtime_ns == stamp
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "resume=false", "hydra.run.dir=outputs/pds"],
                   root, check=True)
    assert manifest_file.stat().st_mtime_ns != stamp
    stamp = manifest_file.stat().st_mtime_ns
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1", "hydra.run.dir=outputs/pds"], root,
                   check=True)
    assert manifest_file.stat().st_mtime_ns != stamp


def test_grad_clip_bounds_the_joint_norm_of_the_step():
    from test_outer_loop import SETTINGS, MeanMatchingObjective, MeanMatchingSettings, fit, toy_set

    syn = toy_set()
    before = [p.detach().clone() for p in (syn.images, syn.texts)]
    settings = MeanMatchingSettings(**{**SETTINGS, "momentum": 0.0, "lr_img": 1.0, "lr_txt": 1.0, "grad_clip": 0.01})
    fit(OuterLoopModule(MeanMatchingObjective(torch.full((1, 3, 4, 4), 50.0), torch.full((1, 5), 50.0)), syn, settings,
                  seed=0), 1)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip((syn.images, syn.texts), before)])
    assert float(step.norm()) == pytest.approx(0.01, rel=1e-4)


def test_mdm_resumed_equals_uninterrupted(root):
    """A run extended from its checkpoint (iterations 2 -> 4) ends with the set of a run that never stopped: the
    real batches, synthetic batches and teachers drawn after the resume are the same (and k-means is not redone)."""
    from safetensors.torch import load_file

    common = ["distill", "method=mdm", *SMALL, "method.syn_batch=4", "method.real_batch=16", "save_every=1"]
    run_in_process([*common, "method.iterations=4", "hydra.run.dir=outputs/mdm_straight"], root, check=True)
    run_in_process([*common, "method.iterations=2", "hydra.run.dir=outputs/mdm_resumed"], root, check=True)
    run_in_process([*common, "method.iterations=4", "hydra.run.dir=outputs/mdm_resumed"], root, check=True)
    sets = [load_file(str(root / "outputs" / d / "synthetic" / "synthetic.safetensors"))
            for d in ("mdm_straight", "mdm_resumed")]
    assert sets[0].keys() == sets[1].keys() and all(torch.equal(sets[0][k], sets[1][k]) for k in sets[0])
    manifest = json.loads((root / "outputs" / "mdm_resumed" / "synthetic" / "manifest.json").read_text())
    assert manifest["resumed"][0]["iteration"] == 2
    # its cost counts the two iterations the first process made, which this process's wall time does not see
    history = json.loads((root / "outputs" / "mdm_resumed" / "synthetic" / "history.json").read_text())
    stats = manifest["distill_stats"]
    earlier = sum(h["distill/sec_per_iter"] for h in history[:2])
    assert stats["cost"]["distill_seconds"] == pytest.approx(stats["total_seconds"] + earlier)


def test_real_pairs_under_a_frozen_backbone_embed_from_features_computed_once():
    """The backbone's features of the train images are computed once; each batch then runs the heads only, and
    embeds as the whole model does."""
    from mmdd.data.annotations import Split
    from mmdd.data.splits import SplitData
    from mmdd.evaluate.encode import BackboneFeatures
    from mmdd.methods.distribution.objective import RealPairs
    from mmdd.models.convnet import ConvNet
    from mmdd.models.dual_encoder import DualEncoder

    g = torch.Generator().manual_seed(0)
    split = Split("train", image_paths=[f"{i}.png" for i in range(12)], captions=[f"c{i}" for i in range(24)],
                  txt2img=[i // 2 for i in range(24)])
    train = SplitData(split=split, text_emb=torch.randn(24, 6, generator=g), image_size=8,
                      images=torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8),
                      mean=[0.5] * 3, std=[0.25] * 3)
    backbone = ConvNet(image_size=8, width=4, depth=1)
    model = DualEncoder(backbone, backbone.num_features, text_dim=6, image_head=True, trainable="heads").eval()
    cache = BackboneFeatures(256)
    cached = RealPairs(train, cache).embed(model, 10, torch.Generator().manual_seed(1), "cpu")
    plain = RealPairs(train).embed(model, 10, torch.Generator().manual_seed(1), "cpu")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cached, plain))
    first = cache.split(model, train)
    RealPairs(train, cache).embed(model, 10, torch.Generator().manual_seed(2), "cpu")
    assert cache.split(model, train) is first  # not computed again


def test_real_pairs_augment_the_pixels_and_embed_in_the_chosen_space():
    """DSA's transformation is applied to the real images before the encoder; space=features gives the backbone's
    features and the text embeddings themselves."""
    from mmdd.data.annotations import Split
    from mmdd.data.splits import SplitData
    from mmdd.methods.distribution.objective import RealPairs
    from mmdd.models.convnet import ConvNet
    from mmdd.models.dual_encoder import DualEncoder

    g = torch.Generator().manual_seed(0)
    split = Split("train", image_paths=[f"{i}.png" for i in range(6)], captions=[f"c{i}" for i in range(6)],
                  txt2img=list(range(6)))
    train = SplitData(split=split, text_emb=torch.randn(6, 5, generator=g), image_size=8,
                      images=torch.randint(0, 256, (6, 3, 8, 8), generator=g, dtype=torch.uint8),
                      mean=[0.5] * 3, std=[0.25] * 3)
    backbone = ConvNet(image_size=8, width=4, depth=1)
    model = DualEncoder(backbone, backbone.num_features, text_dim=5, image_head=True).eval()
    flip = lambda x: x.flip(3)  # noqa: E731
    images, texts = RealPairs(train).embed(model, 6, torch.Generator().manual_seed(1), "cpu", flip)
    caps = torch.randperm(6, generator=torch.Generator().manual_seed(1))
    pixels = train.normalise(train.image_batch(caps.tolist()))
    assert torch.allclose(images, model.encode_image(pixels.flip(3)), atol=1e-6)
    assert torch.allclose(texts, model.encode_text(train.text_emb[caps]), atol=1e-6)
    images, texts = RealPairs(train).embed(model, 6, torch.Generator().manual_seed(1), "cpu", None, "features")
    assert torch.allclose(images, model.features(pixels), atol=1e-6) and torch.equal(texts, train.text_emb[caps])
