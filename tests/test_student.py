"""The evaluation protocol on a real Lightning trainer with tiny in-memory splits."""

import pytest
import torch

from mmdd.data.annotations import Split
from mmdd.data.splits import SplitData
from mmdd.evaluate.student import train_student
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder


def split(n_img, seed):
    g = torch.Generator().manual_seed(seed)
    s = Split("x", image_paths=[f"{i}.png" for i in range(n_img)], captions=[f"c{i}" for i in range(2 * n_img)],
              txt2img=[i // 2 for i in range(2 * n_img)])
    images = torch.randint(0, 256, (n_img, 3, 8, 8), generator=g, dtype=torch.uint8)
    return SplitData(split=s, text_emb=torch.randn(2 * n_img, 6, generator=g), image_size=8, images=images,
                     mean=[0.5] * 3, std=[0.25] * 3)


def cfg(selection, epochs=6):
    """The evaluate stage's composed config (trainer, hardware, ...), with a tiny protocol."""
    from hydra import compose, initialize_config_dir

    from mmdd.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return compose("evaluate", overrides=[
            f"protocol.epochs={epochs}", "protocol.lr_decay_epoch=3", "protocol.lr_decay=0.1", "protocol.momentum=0.9",
            "protocol.weight_decay=5e-4", "protocol.batch_size=4", "protocol.eval_every=2",
            f"protocol.selection={selection}", "protocol.eval_schedule=every", "protocol.batch_draw=permutation",
            "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]", "logger=none", "paths.output_dir=/tmp/unused"])


def build():
    bb = ConvNet(image_size=8, width=4, depth=1)
    return DualEncoder(bb, bb.num_features, text_dim=6)


@pytest.fixture
def data():
    return {"val": split(6, 1), "test": split(8, 2)}


def test_val_selection_keeps_best_val_checkpoint(data):
    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    res = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0)
    evals = res.history
    assert [h["epoch"] for h in evals] == [1, 3, 5]
    best = max(evals, key=lambda h: h["r_mean"])
    assert res.best_epoch == best["epoch"] and res.selected["r_mean"] == best["r_mean"]
    assert set(res.test) >= {"ir1", "tr1", "r_mean"}


def test_same_seed_same_result_and_test_best_reports_selected(data):
    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    a = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=3)
    b = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=3)
    assert a.test == b.test
    t = train_student(cfg("test_best"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=3)
    assert t.test == pytest.approx(t.selected)  # chosen on test: the papers' optimistic protocol
    last = train_student(cfg("last"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=3)
    assert last.best_epoch == 5


def test_a_diverging_student_is_a_clear_error(data):
    from mmdd.errors import MmddError

    images, texts = torch.randn(8, 3, 8, 8) * 1e3, torch.randn(8, 6) * 1e3
    with pytest.raises(MmddError, match="diverged"):
        train_student(cfg("val"), build, images, texts, {"image": 1e12, "text": 1e12}, data, seed=0)
    # finite weights, overflowing activations (a set whose pixels blew up): the same clear error, not a ValueError
    with pytest.raises(MmddError, match="diverged"):
        train_student(cfg("val"), build, images * 1e36, texts, {"image": 1e-12, "text": 1e-12}, data, seed=0)


def test_frozen_backbone_students_on_cached_features_match_pixel_students(data):
    """Heads-only students: training and evaluating on cached backbone features gives the pixel path's result,
    and the cache computes each split's features once for every seed."""
    from mmdd.evaluate.encode import BackboneFeatures

    def heads():
        torch.manual_seed(7)  # the same frozen backbone for every student, as a loaded checkpoint would be
        bb = ConvNet(image_size=8, width=4, depth=1)
        return DualEncoder(bb, bb.num_features, text_dim=6, image_head=True, trainable="heads")

    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    plain = train_student(cfg("val"), heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=1)
    cache = BackboneFeatures(256)
    cached = train_student(cfg("val"), heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=1, features=cache)
    assert cached.best_epoch == plain.best_epoch
    assert cached.test == pytest.approx(plain.test, abs=1e-4)
    assert [h["r_mean"] for h in cached.history] == pytest.approx([h["r_mean"] for h in plain.history], abs=1e-4)
    assert len(cache._cache) == 2  # val and test, each encoded once
    again = train_student(cfg("val"), heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=2, features=cache)
    assert len(cache._cache) == 2 and set(again.test) >= {"r_mean"}
    # a backbone that trains cannot be cached: the same call falls back to pixels
    fallback = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=1, features=cache)
    assert fallback.test == train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=1).test


def test_frozen_random_backbones_of_different_students_do_not_share_cached_features(data):
    """Without a checkpoint every student seed draws its own frozen backbone: the cache must tell them apart."""
    from mmdd.evaluate.encode import BackboneFeatures

    def heads():  # random init from the student's seed (train_student seeds before building)
        bb = ConvNet(image_size=8, width=4, depth=1)
        return DualEncoder(bb, bb.num_features, text_dim=6, image_head=True, trainable="heads")

    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    cache = BackboneFeatures(256)
    for seed in (1, 2):
        plain = train_student(cfg("val"), heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=seed)
        cached = train_student(cfg("val"), heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=seed,
                               features=cache)
        assert cached.test == pytest.approx(plain.test, abs=1e-4)
    assert len(cache._cache) == 4  # val and test per backbone


def test_backbone_features_persist_on_disk_for_later_evaluations(data, tmp_path):
    from mmdd.evaluate.encode import BackboneFeatures

    torch.manual_seed(7)
    bb = ConvNet(image_size=8, width=4, depth=1)
    model = DualEncoder(bb, bb.num_features, text_dim=6, image_head=True, trainable="heads")
    calls = []
    model.backbone.register_forward_hook(lambda *args: calls.append(1))
    first = BackboneFeatures(256, cache_dir=tmp_path, data_key="d").split(model, data["test"])
    assert calls and len(list((tmp_path / "backbone_features").glob("*.safetensors"))) == 1
    calls.clear()
    again = BackboneFeatures(256, cache_dir=tmp_path, data_key="d").split(model, data["test"])
    assert torch.equal(first, again) and not calls  # read back, the backbone never ran
    BackboneFeatures(256, cache_dir=tmp_path, data_key="other data").split(model, data["test"])
    assert calls  # another dataset: computed anew


def test_reference_batches_are_drawn_independently_and_evaluations_start_after_the_first_epoch():
    """LoRS/RepBlend (protocol.batch_draw=independent_if_similarity, eval_schedule=reference): ceil(N/B) batches of
    B distinct pairs per epoch, each from a fresh permutation; the test split read after epochs 0, k, 2k, ... and the last."""
    from mmdd.evaluate.student import IndependentBatches, StudentModule

    batches = list(IndependentBatches(10, 4, torch.Generator().manual_seed(0)))
    assert len(batches) == 3 and all(len(b) == len(set(b)) == 4 for b in batches)
    assert len({i for b in batches for i in b}) < 12  # 12 draws from 10 pairs: some pair comes twice in the epoch
    assert list(IndependentBatches(5, 128, torch.Generator())) and len(IndependentBatches(5, 128, torch.Generator())) == 1

    def evaluated(schedule, every, epochs=101):
        m = StudentModule(torch.nn.Linear(1, 1), {}, 0.9, 0, epochs, 51, 0.1, every, None,
                          eval_schedule=schedule)
        return [e for e in range(epochs) if m.evaluates_after(e) or e == epochs - 1]

    assert evaluated("reference", 10) == list(range(0, 101, 10))  # LoRS: 11 test reads
    assert evaluated("reference", 20) == [0, 20, 40, 60, 80, 100]  # RepBlend: 6
    assert evaluated("every", 10) == [9, 19, 29, 39, 49, 59, 69, 79, 89, 99, 100]  # mmdd


def test_a_student_trains_on_independently_drawn_batches_against_s(data):
    c = cfg("test_best", epochs=2)
    c.protocol.batch_draw, c.protocol.eval_schedule = "independent_if_similarity", "reference"
    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    result = train_student(c, build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0, loss="wbce",
                           similarity=torch.eye(8))
    assert [h["epoch"] for h in result.history] == [0, 1] and 0 <= result.test["r_mean"] <= 100


def test_earlier_phases_train_first_and_selection_spans_every_phase(data):
    from mmdd.evaluate.student import StudentPhase

    g = torch.Generator().manual_seed(4)
    first = StudentPhase(torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 6, generator=g), {"image": 0.2, "text": 0.2})
    images, texts = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 6, generator=g)
    res = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0, earlier=[first])
    # each phase runs the protocol's 6 epochs; epochs are counted over both
    assert [(h["phase"], h["epoch"]) for h in res.history] == [(0, 1), (0, 3), (0, 5), (1, 7), (1, 9), (1, 11)]
    best = max(res.history, key=lambda h: h["r_mean"])
    assert res.best_epoch == best["epoch"] and res.selected["r_mean"] == best["r_mean"]
    # the second phase starts from the weights the first left: without it, the student is another one
    alone = train_student(cfg("val"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0)
    assert [h["r_mean"] for h in alone.history] != [h["r_mean"] for h in res.history[3:]]
    last = train_student(cfg("last"), build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0, earlier=[first])
    assert last.best_epoch == 11


def test_a_double_precision_student_trains_and_scores_in_float64(data):
    """hardware.precision=64-true (the parity checks): the student is double before any weights are loaded into it,
    and its evaluations cast the split's float32 images and captions to it instead of failing."""
    c = cfg("val", epochs=2)
    c.hardware.precision = "64-true"
    built = []

    def make():
        built.append(build())
        return built[-1]
    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    res = train_student(c, make, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0)
    assert all(p.dtype == torch.float64 for p in built[0].parameters())
    assert [h["epoch"] for h in res.history] == [1] and 0 <= res.test["r_mean"] <= 100
    # heads on a frozen backbone's cached features (RepBlend's students): the features are float64 too
    from mmdd.evaluate.encode import BackboneFeatures

    def heads():
        bb = ConvNet(image_size=8, width=4, depth=1)
        return DualEncoder(bb, bb.num_features, text_dim=6, image_head=True, trainable="heads")
    cache = BackboneFeatures(256)
    res = train_student(c, heads, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0, features=cache)
    assert {f.dtype for f in cache._cache.values()} == {torch.float64} and 0 <= res.test["r_mean"] <= 100


def test_the_inference_batch_changes_memory_not_the_student(data):
    """hardware.inference_batch (evaluation, selection, feature caches) chunks the forward passes only: a student
    selected and tested in chunks of 3 is the one of chunks of 256."""
    from omegaconf import open_dict

    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    results = []
    for batch in (256, 3):
        c = cfg("val")
        with open_dict(c):
            c.hardware.inference_batch = batch
        results.append(train_student(c, build, images, texts, {"image": 0.1, "text": 0.1}, data, seed=0))
    assert results[1].best_epoch == results[0].best_epoch
    assert results[1].test == pytest.approx(results[0].test, abs=1e-9)


def test_continued_phases_train_as_ptm_st_one_optimizer_one_schedule_the_last_phases_step_sizes(data):
    """protocol.phases=continued (PTM-ST's evaluate_synset_PTM): every phase at the last phase's step sizes, the
    momentum buffers carried from phase to phase, and one schedule over all phases: with 6 epochs per phase and the
    decay at epoch 3, the first phase decays after its third epoch and the second runs decayed throughout."""
    from lightning.pytorch.callbacks import Callback

    from mmdd.evaluate.student import StudentPhase

    class Record(Callback):
        def __init__(self):
            self.lrs, self.momenta = [], []

        def on_train_epoch_start(self, trainer, module):
            opt = trainer.optimizers[0]
            self.lrs.append([g["lr"] for g in opt.param_groups])
            self.momenta.append(sum(float(s["momentum_buffer"].abs().sum()) for s in opt.state.values()
                                    if s.get("momentum_buffer") is not None))

    g = torch.Generator().manual_seed(4)
    first = StudentPhase(torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 6, generator=g), {"image": 0.2, "text": 0.3})
    images, texts = torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 6, generator=g)

    def run(phases):
        c = cfg("val")
        c.protocol.phases = phases
        record = Record()
        from mmdd.utils import trainer as trainer_module

        build_trainer = trainer_module.build_trainer

        def with_record(cfg_, loggers, callbacks, **kw):
            return build_trainer(cfg_, loggers, [*callbacks, record], **kw)

        trainer_module.build_trainer = with_record
        try:
            train_student(c, build, images, texts, {"image": 0.1, "text": 0.05}, data, seed=0, earlier=[first])
        finally:
            trainer_module.build_trainer = build_trainer
        return record

    cont = run("continued")
    assert cont.lrs[:4] == [[0.1, 0.05]] * 3 + [[pytest.approx(0.01), pytest.approx(0.005)]]
    assert all(lr == [pytest.approx(0.01), pytest.approx(0.005)] for lr in cont.lrs[6:])  # phase 2: decayed
    assert cont.momenta[0] == 0 and cont.momenta[6] > 0  # phase 2 starts with phase 1's momentum
    sep = run("separate")
    assert sep.lrs[0] == [0.2, 0.3] and sep.lrs[6] == [0.1, 0.05] and sep.momenta[6] == 0
    from mmdd.errors import MmddError

    with pytest.raises(MmddError, match="protocol.phases must be one of"):
        c = cfg("val")
        c.protocol.phases = "merged"
        train_student(c, build, images, texts, {"image": 0.1, "text": 0.05}, data, seed=0, earlier=[first])


def test_a_text_only_student_trains_the_text_head_on_a_frozen_image_tower(data):
    """protocol.trainable=text (PDS's students): the backbone and any image head stay as built, only the text head
    moves; the frozen backbone's features are cached as for heads-only students."""
    from mmdd.evaluate.encode import BackboneFeatures

    built = []

    def text_only():
        torch.manual_seed(7)  # one frozen image tower for every student, as a loaded checkpoint would be
        bb = ConvNet(image_size=8, width=4, depth=1)
        built.append(DualEncoder(bb, bb.num_features, text_dim=6, trainable="text"))
        return built[-1]

    model = text_only()
    assert model.modality_parameter_names()["image"] == [] and model.backbone_is_cacheable()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == model.modality_parameter_names()["text"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, texts = torch.randn(8, 3, 8, 8), torch.randn(8, 6)
    res = train_student(cfg("last"), text_only, images, texts, {"image": 0.2, "text": 0.2}, data, seed=0,
                        features=BackboneFeatures(256))
    after = built[-1].state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("text_head."))
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("text_head."))
    assert 0 <= res.test["r_mean"] <= 100


def test_the_pds_protocol_composes_as_pds_trains_its_students():
    from hydra import compose, initialize_config_dir

    from mmdd.paths import conf_dir

    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        p = compose("evaluate", overrides=["protocol=pds", "paths.output_dir=/tmp/unused"]).protocol
    assert (p.trainable, p.lr_source, p.lr, p.loss, p.selection) == ("text", "fixed", 0.2, "infonce", "val")
