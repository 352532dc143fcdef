"""The maths of the methods after trajectory matching (kernels, MMD, merging, k-means, Hungarian matching,
prototypes) against hand-computed values, and DM, MDM and PDS-style selection through the real `mmdd distill`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TINY, run_in_process
from helpers import method_settings, method_values
from mmdd.errors import MmddError
from mmdd.methods.selection.clustering import cooccurrence, kmeans, match_clusters, nearest_members
from mmdd.methods.distribution.encoders import EncoderSampler, EncoderSettings, merge_weights, model_stock_ratio
from mmdd.methods.distribution.mmd import agreement_and_disparity, geodesic_kernel, gke, mean_distance, mmd2
from mmdd.methods.engine.outer_loop import OuterLoopModule
from mmdd.methods.selection.prototypes import match_prototypes, nearest_distinct, prune_pairs

E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def k(theta: float, sigma: float) -> float:
    return math.exp(-theta**2 / (2 * sigma**2))


# ------------------------------------------------------------------ kernels and MMD
def test_geodesic_kernel_is_a_gaussian_of_the_great_circle_distance():
    a = torch.stack([E1, E2, -E1, torch.tensor([1.0, 1.0])])
    got = geodesic_kernel(a, torch.stack([3 * E1]), sigma=0.5).flatten()  # lengths do not matter, directions do
    # theta = 0 is clamped to acos(1 - 1e-6) = 1.414e-3 rad, and pi to pi - 1.414e-3
    eps = math.acos(1 - 1e-6)
    want = [k(eps, 0.5), k(math.pi / 2, 0.5), k(math.pi - eps, 0.5), k(math.pi / 4, 0.5)]
    assert got.tolist() == pytest.approx(want, rel=1e-5, abs=1e-12)


def test_mmd_estimators_by_hand():
    s, r, sigma = torch.stack([E1, E2]), torch.stack([E1, -E1]), 1.0
    same = k(math.acos(1 - 1e-6), sigma)  # a point with itself (the clamp)
    ss = k(math.pi / 2, sigma)  # e1 vs e2
    rr = k(math.pi - math.acos(1 - 1e-6), sigma)  # e1 vs -e1
    sr = (same + rr + ss + ss) / 4  # e1-e1, e1-(-e1), e2-e1, e2-(-e1)
    assert float(mmd2(s, r, sigma, "unbiased")) == pytest.approx(ss + rr - 2 * sr, rel=1e-5)
    assert float(mmd2(s, r, sigma, "biased")) == pytest.approx((2 * same + 2 * ss) / 4 + (2 * same + 2 * rr) / 4 - 2 * sr,
                                                               rel=1e-5)
    assert float(mmd2(s, r, sigma, "unbiased", diversity_weight=0.5)) == pytest.approx(0.5 * ss + rr - 2 * sr, rel=1e-5)


def test_gke_is_zero_for_one_distribution_and_its_gradient_stays_finite():
    x = torch.nn.functional.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    assert float(mmd2(x, x, 0.5, "biased")) == pytest.approx(0.0, abs=1e-6)
    assert float(mmd2(x, x, 0.5, "unbiased")) < 0  # the U-statistic of identical samples: below zero ...
    y = x.clone().requires_grad_(True)
    g = gke(y, x, 0.5, "unbiased")
    assert float(g) == pytest.approx(1e-6)  # ... clamped at 0 under the root (sqrt(0 + 1e-12))
    gke(y, x, 0.5, "biased").backward()  # theta = 0 everywhere: arccos' derivative is infinite without the clamp
    assert torch.isfinite(y.grad).all()
    with pytest.raises(MmddError, match="at least 2 samples"):
        mmd2(x[:1], x, 0.5, "unbiased")


def test_gke_gradient_matches_finite_differences():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: gke(a, r, 0.7, "unbiased"), (s,))


def test_dm_mean_distance_and_the_joint_views():
    assert float(mean_distance(torch.tensor([[0.0, 2.0], [2.0, 0.0]]), torch.tensor([[0.0, 0.0]]))) == 2.0
    u, g = agreement_and_disparity(E1[None], E2[None])
    assert u.flatten().tolist() == pytest.approx([2**-0.5, 2**-0.5])
    assert g.flatten().tolist() == pytest.approx([2**-0.5, -(2**-0.5)])


# ------------------------------------------------------------------ the mixed teacher
def test_model_stock_merge_by_hand():
    w0, w1, w2 = torch.zeros(2), torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    c = math.cos(math.pi / 4)
    r = 2 * c / (1 + c)
    assert float(model_stock_ratio(w0, w1, w2)) == pytest.approx(r)
    merged = merge_weights({"w": w0 + 1}, [{"w": w1 + 1}, {"w": w2 + 1}], alpha=0.5)["w"]  # the anchor moves too
    assert merged.tolist() == pytest.approx((1 + 0.5 * r * torch.tensor([1.5, 0.5])).tolist())
    # opposed deltas: MDM's r = 2c/(1+c) diverges at c = -1; clamped, the merge stays at the anchor
    assert float(model_stock_ratio(w0, w1, -w1)) == 0.0
    assert float(model_stock_ratio(w0, w1, w1)) == pytest.approx(1.0)  # agreeing deltas: the average itself


class _Store:
    """Three 'experts' of a 2-parameter model; snapshot e of expert x is (x + e) * base (+ init for expert x)."""

    epochs, n_experts = 3, 3

    def __init__(self, shared_init: bool):
        self.shared_init = shared_init

    def snapshots(self, expert, epochs):
        base = {"image": torch.tensor([1.0, 2.0]), "text": torch.tensor([3.0])}
        init = 0.0 if self.shared_init else 10.0 * expert
        return [{m: (expert + 1) * e * b + init for m, b in base.items()} for e in epochs]


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(2))
        self.b = torch.nn.Parameter(torch.zeros(1))

    def modality_parameter_names(self):
        return {"image": ["a"], "text": ["b"]}


def encoder(**changes) -> EncoderSettings:
    """conf/method/mdm.yaml's encoder settings with `changes`."""
    from mmdd.config_schema import build_settings

    return build_settings(EncoderSettings, {**method_values("mdm")["encoder"], **changes}, "method.encoder", "test")


def test_encoder_sampler_loads_an_expert_snapshot_and_a_merged_teacher(caplog):
    model = _Tiny()
    store = _Store(shared_init=True)
    gen = torch.Generator().manual_seed(3)
    sampler = EncoderSampler(encoder(kind="expert", min_epoch=1), model, store)
    stats = sampler.draw(gen)
    want = store.snapshots(int(stats["distill/encoder_expert"]), [int(stats["distill/encoder_epoch"])])[0]
    assert torch.equal(model.a.detach(), want["image"]) and torch.equal(model.b.detach(), want["text"])
    assert 1 <= stats["distill/encoder_epoch"] <= 3

    mixed = EncoderSampler(encoder(kind="mixed", alpha=0.5), model, store)
    gen, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    mixed.draw(gen)
    experts = torch.randperm(3, generator=replay)[:2].tolist()
    epochs = [1 + int(torch.randint(3, (1,), generator=replay)) for _ in range(2)]
    snaps = [store.snapshots(x, [0, e]) for x, e in zip(experts, epochs)]
    for m, name in (("image", "a"), ("text", "b")):
        w0, w1, w2 = snaps[0][0][m], snaps[0][1][m], snaps[1][1][m]
        want = merge_weights({name: w0}, [{name: w1}, {name: w2}], 0.5)[name]
        assert torch.allclose(model.get_parameter(name).detach(), want)
    assert "different initialisations" not in caplog.text
    EncoderSampler(encoder(kind="mixed"), model, _Store(shared_init=False)).draw(gen)
    assert "different initialisations" in caplog.text  # merging experts of different inits is said, not hidden
    with pytest.raises(MmddError, match="recorded epochs"):
        EncoderSampler(encoder(kind="expert", max_epoch=5), model, store)


# ------------------------------------------------------------------ k-means and matching
def blobs(centres, n=20, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = torch.tensor(centres)
    return (c.repeat_interleave(n, 0) + spread * torch.randn(len(centres) * n, c.shape[1], generator=gen)), n


def test_kmeans_recovers_separated_blobs_and_is_seeded():
    x, n = blobs([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    res = kmeans(x, 3, torch.Generator().manual_seed(0), "euclidean", restarts=3)
    groups = [set(res.labels[i * n:(i + 1) * n].tolist()) for i in range(3)]
    assert all(len(g) == 1 for g in groups) and len(set.union(*groups)) == 3
    for i in range(3):  # centres are the blobs' means
        assert torch.allclose(res.centres[int(res.labels[i * n])], x[i * n:(i + 1) * n].mean(0), atol=1e-5)
    again = kmeans(x, 3, torch.Generator().manual_seed(0), "euclidean", restarts=3)
    assert torch.equal(res.labels, again.labels)
    medoids = nearest_members(x, res)
    for c, i in enumerate(medoids):
        members = (res.labels == c).nonzero().flatten()
        assert i == int(members[(x[members] - res.centres[c]).norm(dim=1).argmin()])


def test_cosine_kmeans_clusters_directions_not_lengths():
    x = torch.tensor([[1.0, 0.1], [10.0, 0.5], [0.1, 1.0], [0.4, 8.0]])
    res = kmeans(x, 2, torch.Generator().manual_seed(0), "cosine")
    assert res.labels[0] == res.labels[1] != res.labels[2] == res.labels[3]
    assert torch.allclose(res.centres.norm(dim=1), torch.ones(2))


def test_kmeans_with_more_clusters_than_distinct_rows_still_picks_distinct_members():
    x = torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    res = kmeans(x, 4, torch.Generator().manual_seed(0))
    picked = nearest_members(x, res)
    assert len(set(picked)) == 4


def test_cooccurrence_and_hungarian_by_hand():
    a = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    b = torch.tensor([2, 2, 1, 1, 0, 0, 0, 1])
    counts = cooccurrence(a, b, 3)
    assert counts.tolist() == [[0, 1, 2], [1, 1, 0], [2, 1, 0]]
    # the one-to-one matching with the largest total: 0->2, 1->1, 2->0 (2 + 1 + 2); and where a greedy pick of
    # each row's best fails: [[3, 2], [2, 0]] greedy 0->0, 1->1 = 3, optimum 0->1, 1->0 = 4
    assert match_clusters(counts) == [(0, 2), (1, 1), (2, 0)]
    assert match_clusters(torch.tensor([[3, 2], [2, 0]])) == [(0, 1), (1, 0)]
    assert cooccurrence(torch.tensor([0, 0]), torch.tensor([1, 1]), 3).shape == (3, 3)  # absent clusters keep rows


def test_pruning_drops_the_least_agreeing_pairs():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 0.2]])
    assert prune_pairs(img, txt, 0.4).tolist() == [0, 2, 4]
    assert prune_pairs(img, txt, 0.0).tolist() == [0, 1, 2, 3, 4]


def test_prototypes_are_the_means_of_matched_cells():
    # two concepts, each a blob of images and a blob of captions; the two clusterings label them independently
    img, n = blobs([[0.0, 0.0], [6.0, 6.0]], n=10, seed=1)
    txt, _ = blobs([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]], n=10, seed=2)
    protos = match_prototypes(img, txt, 2, torch.Generator().manual_seed(0))
    for p_img, p_txt, cell in zip(protos.image, protos.text, protos.members):
        assert len(cell) == n and len({c // n for c in cell}) == 1  # a whole concept, image and caption together
        assert torch.allclose(p_img, img[cell].mean(0)) and torch.allclose(p_txt, txt[cell].mean(0))
    assert nearest_distinct(torch.tensor([[1.0, 0.0], [1.0, 0.01]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == [0, 1]


def test_loss_weights_must_leave_a_loss():
    from mmdd.methods.distribution.objective import DMLoss, DMSettings, MDMLoss, MDMSettings

    with pytest.raises(MmddError, match="lambda_image=0.0, lambda_text=0.0, lambda_agr=0.0, lambda_dis=0.0"):
        DMLoss(method_settings(DMSettings, "dm", lambda_image=0.0, lambda_text=0.0, lambda_agr=0.0, lambda_dis=0.0))
    with pytest.raises(MmddError, match="must be >= 0"):
        MDMLoss(method_settings(MDMSettings, "mdm", lambda_agr=-1.0))
    MDMLoss(method_settings(MDMSettings, "mdm", lambda_agr=0.0, lambda_dis=0.0))  # InfoNCE alone is a loss


def test_prototypes_of_empty_clusters_are_finite():
    """Repeated rows (each image once per caption) can leave a k-means cluster empty: its prototype is its centre,
    never the NaN mean of nothing."""
    img = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])  # two distinct images for k = 3
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    km = kmeans(img, 3, torch.Generator().manual_seed(0), "euclidean", 10)
    assert (torch.bincount(km.labels, minlength=3) == 0).any()  # the case under test
    protos = match_prototypes(img, txt, 3, torch.Generator().manual_seed(0))
    assert torch.isfinite(protos.image).all() and torch.isfinite(protos.text).all()
    # clustered in another space: the caption row nearest the empty cluster's centre there
    both = match_prototypes(txt, img, 3, torch.Generator().manual_seed(0), cluster_captions=img * 2)
    assert torch.isfinite(both.text).all()


# ------------------------------------------------------------------ through `mmdd distill`
@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dm")
    run_in_process(["buffer", *TINY, "hydra.run.dir=outputs/buffer"], root, check=True)
    return root


SMALL = [o for o in TINY if not o.startswith("method.")] + ["method.iterations=4", "evaluate=false"]
TINY_DATA = [o for o in TINY if o.startswith("data.")]
ONE_STUDENT = [o for o in TINY if o.startswith("protocol.") and "num_seeds" not in o] + ["protocol.num_seeds=1"]


def test_mdm_distills_from_kmeans_medoids_with_its_three_terms(tiny_store):
    run_in_process(["distill", "method=mdm", *SMALL, "method.syn_batch=4", "method.real_batch=16",
                    "hydra.run.dir=outputs/mdm"], tiny_store, check=True)
    out = tiny_store / "outputs" / "mdm" / "synthetic"
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


def test_dm_and_pds_distill_and_save_a_set(tiny_store):
    run_in_process(["distill", "method=dm", *SMALL, "method.real_batch=16", "hydra.run.dir=outputs/dm"], tiny_store,
                   check=True)
    history = json.loads((tiny_store / "outputs" / "dm" / "synthetic" / "history.json").read_text())
    assert {"distill/loss_image", "distill/loss_text", "distill/loss_agr", "distill/loss_dis"} <= set(history[0])
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "hydra.run.dir=outputs/pds"], tiny_store,
                   check=True)
    manifest_file = tiny_store / "outputs" / "pds" / "synthetic" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    assert manifest["method"] == "pds" and manifest["budget"] == 8
    assert manifest["distill_stats"]["cost"]["teachers"]["experts"] == 1  # one teacher embeds
    # a rerun reuses the complete selection (no second k-means); another setting or resume=false selects again
    stamp = manifest_file.stat().st_mtime_ns
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "hydra.run.dir=outputs/pds"], tiny_store,
                   check=True)
    assert manifest_file.stat().st_mtime_ns == stamp
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=2", "resume=false", "hydra.run.dir=outputs/pds"],
                   tiny_store, check=True)
    assert manifest_file.stat().st_mtime_ns != stamp
    stamp = manifest_file.stat().st_mtime_ns
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1", "hydra.run.dir=outputs/pds"], tiny_store,
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


def test_students_of_other_architectures_evaluate_a_convnet_set(tiny_store):
    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1", "hydra.run.dir=outputs/pds_x"], tiny_store,
                   check=True)
    syn = tiny_store / "outputs" / "pds_x" / "synthetic"
    data, protocol = TINY_DATA, ONE_STUDENT
    for student, backbone in (("resnet18_minilm", "resnet18"), ("vit_tiny_minilm", "vit_tiny_patch16_224")):
        run_in_process(["evaluate", f"synthetic={syn}", f"model={student}", *data, *protocol,
                        f"hydra.run.dir=outputs/x_{student}"], tiny_store, check=True)
        res = json.loads((tiny_store / "outputs" / f"x_{student}" / "results.json").read_text())
        assert res["config"]["model"]["image"]["name"] == backbone and res["method"] == "pds"
        assert 0 <= res["mean"]["r_mean"] <= 100


def test_full_train_upper_bound_trains_heads_only_students_on_every_pair(tmp_path):
    data, protocol = TINY_DATA, ONE_STUDENT
    heads = ["model=convnet_heads", "model.image.checkpoint=null"]  # a random frozen backbone (model.image.init_seed)
    run_in_process(["evaluate", "synthetic=full_train", *heads, *data, *protocol, "hydra.run.dir=outputs/full"],
                   tmp_path, check=True)
    res = json.loads((tmp_path / "outputs" / "full" / "results.json").read_text())
    assert res["method"] == "full_train" and res["budget"] == 64 and res["synthetic"] == "full_train"
    history = res["seeds"][0]["history"]
    assert history and 0 <= res["mean"]["r_mean"] <= 100
    refused = run_in_process(["evaluate", "synthetic=full_train", *data, *protocol, "hydra.run.dir=outputs/full2"],
                             tmp_path)
    assert refused.returncode == 2 and "heads-only students" in refused.stderr


def test_teachers_can_start_from_one_initialisation(tmp_path):
    from safetensors.torch import load_file

    from mmdd.teachers.trajectory_store import TrajectoryStore

    run_in_process(["buffer", *TINY, "teacher.init=shared", "hydra.run.dir=outputs/shared"], tmp_path, check=True)
    run_in_process(["buffer", *TINY, "hydra.run.dir=outputs/per_expert"], tmp_path, check=True)
    stores = {json.loads(m.read_text())["teacher"].get("init", "per_expert"): m.parent
              for m in (tmp_path / "outputs" / "artifacts" / "buffers").rglob("manifest.json")}
    assert set(stores) == {"shared", "per_expert"}  # two stores: the setting is part of the store's identity

    def experts(kind):
        return [load_file(str(TrajectoryStore.open(stores[kind]).expert_path(e))) for e in (0, 1)]

    shared, own = experts("shared"), experts("per_expert")
    assert all(torch.equal(shared[0][n][0], shared[1][n][0]) for n in shared[0])  # one start ...
    assert any(not torch.equal(shared[0][n][-1], shared[1][n][-1]) for n in shared[0])  # ... two fine-tunings
    assert any(not torch.equal(own[0][n][0], own[1][n][0]) for n in own[0])  # the default: a start each
    bad = run_in_process(["buffer", *TINY, "teacher.init=one", "hydra.run.dir=outputs/bad"], tmp_path)
    assert bad.returncode == 2 and "teacher.init must be per_expert or shared" in bad.stderr


class FlatColourGenerator:
    """A stand-in image generator for the PDS hook (a diffusion model cannot be loaded here): prototype k becomes a
    flat image of grey level k, so the test can tell which prototype each image came from."""

    def __call__(self, prototypes, prompts, image_size):
        k = prototypes.image.shape[0]
        assert len(prompts) == k and all(isinstance(p, str) for p in prompts)
        return torch.arange(k, dtype=torch.uint8).view(k, 1, 1, 1).expand(k, 3, image_size, image_size).clone()


def test_pds_generator_hook_renders_one_image_per_prototype(tiny_store):
    from hydra import compose, initialize_config_dir

    from mmdd.data.transforms import denormalize
    from mmdd.paths import conf_dir
    from mmdd.synthetic.synthetic_set import SyntheticSet

    run_in_process(["distill", "method=pds", *SMALL, "method.restarts=1",
                    "method.generator={_target_: test_distribution_matching.FlatColourGenerator}",
                    "hydra.run.dir=outputs/pds_gen"], tiny_store, check=True)
    syn, _ = SyntheticSet.load(tiny_store / "outputs" / "pds_gen" / "synthetic")
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        data = compose("distill", overrides=["paths.output_dir=/tmp/x"]).data
    pixels = denormalize(syn.images.detach(), list(data.mean), list(data.std)) * 255
    assert torch.allclose(pixels.flatten(1).mean(1), torch.arange(8.0), atol=0.05)  # image k is prototype k's


def test_mdm_resumed_equals_uninterrupted(tiny_store):
    """A run extended from its checkpoint (iterations 2 -> 4) ends with the set of a run that never stopped: the
    real batches, synthetic batches and teachers drawn after the resume are the same (and k-means is not redone)."""
    from safetensors.torch import load_file

    common = ["distill", "method=mdm", *SMALL, "method.syn_batch=4", "method.real_batch=16", "save_every=1"]
    run_in_process([*common, "method.iterations=4", "hydra.run.dir=outputs/mdm_straight"], tiny_store, check=True)
    run_in_process([*common, "method.iterations=2", "hydra.run.dir=outputs/mdm_resumed"], tiny_store, check=True)
    run_in_process([*common, "method.iterations=4", "hydra.run.dir=outputs/mdm_resumed"], tiny_store, check=True)
    sets = [load_file(str(tiny_store / "outputs" / d / "synthetic" / "synthetic.safetensors"))
            for d in ("mdm_straight", "mdm_resumed")]
    assert sets[0].keys() == sets[1].keys() and all(torch.equal(sets[0][k], sets[1][k]) for k in sets[0])
    manifest = json.loads((tiny_store / "outputs" / "mdm_resumed" / "synthetic" / "manifest.json").read_text())
    assert manifest["resumed"][0]["iteration"] == 2
    # its cost counts the two iterations the first process made, which this process's wall time does not see
    history = json.loads((tiny_store / "outputs" / "mdm_resumed" / "synthetic" / "history.json").read_text())
    stats = manifest["distill_stats"]
    earlier = sum(h["distill/sec_per_iter"] for h in history[:2])
    assert stats["cost"]["distill_seconds"] == pytest.approx(stats["total_seconds"] + earlier)


def test_pds_settings_are_typed_like_every_method_s():
    from mmdd.methods.selection.prototypes import PrototypeSettings

    with pytest.raises(MmddError, match=r"method.prune_ratio must be a finite number, got 'abc'"):
        method_settings(PrototypeSettings, "pds", prune_ratio="abc")
    with pytest.raises(MmddError, match="method.metric must be one of"):
        method_settings(PrototypeSettings, "pds", metric="manhattan")
    assert method_settings(PrototypeSettings, "pds", restarts=3.0).restarts == 3  # a whole float from the command line


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
                      images=torch.randint(0, 256, (12, 3, 8, 8), generator=g, dtype=torch.uint8))
    backbone = ConvNet(image_size=8, width=4, depth=1)
    model = DualEncoder(backbone, backbone.num_features, text_dim=6, image_head=True, trainable="heads").eval()
    mean, std = [0.5] * 3, [0.25] * 3
    cache = BackboneFeatures(mean, std, 256)
    cached = RealPairs(train, mean, std, cache).embed(model, 10, torch.Generator().manual_seed(1), "cpu")
    plain = RealPairs(train, mean, std).embed(model, 10, torch.Generator().manual_seed(1), "cpu")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(cached, plain))
    first = cache.split(model, train)
    RealPairs(train, mean, std, cache).embed(model, 10, torch.Generator().manual_seed(2), "cpu")
    assert cache.split(model, train) is first  # not computed again
