"""Students' parity hooks (mmdd.evaluate.student_draws) and the set's wbce form reaching its students."""

import pytest
import torch
from safetensors.torch import load_file

from mmdd.errors import MmddError
from mmdd.stages.evaluate import student_loss
from mmdd.evaluate.student import StudentPhase, train_student
from mmdd.evaluate.student_draws import (INIT_FILE, RecordingStudentDraws, ReplayedStudentDraws, StudentDraws,
                                         student_draws)
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from test_student import cfg, split


def build(width=4):
    """A student whose text head draws dropout masks (the papers' 0.1)."""
    bb = ConvNet(image_size=8, width=width, depth=1)
    return DualEncoder(bb, bb.num_features, text_dim=6, dropout=0.1)


@pytest.fixture
def data():
    return {"val": split(6, 1), "test": split(8, 2)}


def tracked():
    """build(), keeping the student so that its final weights can be compared."""
    built = []

    def make():
        built.append(build())
        return built[-1]
    return make, built


def lors_like(epochs=3):
    c = cfg("test_best", epochs=epochs)
    c.protocol.batch_draw, c.protocol.eval_schedule, c.protocol.batch_size = "independent_if_similarity", "reference", 3
    return c


def inputs():
    g = torch.Generator().manual_seed(7)
    images, texts = torch.randn(5, 3, 8, 8, generator=g), torch.randn(5, 6, generator=g)
    s = torch.rand(5, 5, generator=g)
    first = StudentPhase(torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 6, generator=g), {"image": 0.2, "text": 0.1})
    return images, texts, (s + s.t()) / 2, [first]


def train(c, data, seed, draws, make, phased=True):
    images, texts, s, earlier = inputs()
    return train_student(c, make, images, texts, {"image": 0.1, "text": 0.05}, data, seed=seed, loss="wbce",
                         similarity=s, earlier=earlier if phased else [], draws=draws)


def test_a_recorded_student_replays_bit_for_bit_under_another_seed(data, tmp_path):
    make, built = tracked()
    recorded = train(lors_like(), data, 0, RecordingStudentDraws(tmp_path / "student_0"), make)
    steps = 3 * 2 + 3 * 2  # two phases of 3 epochs: ceil(4 / 3) and ceil(5 / 3) batches per epoch
    init = load_file(str(tmp_path / "student_0" / INIT_FILE))
    assert set(init) == {f"{m}.{i}" for m, names in build().modality_parameter_names().items() for i in range(len(names))}
    replayed = train(lors_like(), data, 5, ReplayedStudentDraws(tmp_path / "student_0"), make)
    own = train(lors_like(), data, 5, StudentDraws(), make)
    first, again, other = (dict(m.state_dict()) for m in built)
    assert all(torch.equal(first[k], again[k]) for k in first)  # weights, batches and dropout masks all replayed
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert replayed.history == recorded.history and replayed.test == recorded.test
    assert own.history != recorded.history or own.test != recorded.test
    draws = ReplayedStudentDraws(tmp_path / "student_0").draws
    assert len(draws.iterations) == steps and all(it["dropout_calls"] == 1 for it in draws.iterations)


def test_draws_that_do_not_fit_the_student_are_refused_naming_what_differs(data, tmp_path):
    make, _ = tracked()
    train(lors_like(epochs=2), data, 0, RecordingStudentDraws(tmp_path / "s"), make, phased=False)  # 2 x 2 steps
    with pytest.raises(MmddError, match="more than the 4 recorded training steps"):
        train(lors_like(epochs=3), data, 0, ReplayedStudentDraws(tmp_path / "s"), make, phased=False)
    with pytest.raises(MmddError, match="trained 2 steps, 4 were recorded"):
        train(lors_like(epochs=1), data, 0, ReplayedStudentDraws(tmp_path / "s"), make, phased=False)

    with pytest.raises(MmddError, match=r"init.safetensors's image.0 has shape \(4, 3, 3, 3\), the student's \(5, 3, 3, 3\)"):
        train(lors_like(epochs=2), data, 0, ReplayedStudentDraws(tmp_path / "s"), lambda: build(width=5), phased=False)


def test_the_hooks_come_from_the_config_per_student(tmp_path):
    c = lors_like()
    assert type(student_draws(c, 0)) is StudentDraws
    c.student_draws.record = str(tmp_path)
    assert student_draws(c, 2).folder == tmp_path / "student_2"
    c.student_draws.replay = str(tmp_path)
    with pytest.raises(MmddError, match="both set"):
        student_draws(c, 0)


def test_a_set_distilled_with_the_reference_wbce_trains_its_students_with_it(data):
    protocol = cfg("val").protocol
    manifest = {"inner_loss": "wbce", "label_temperature": 0.1, "wbce_log_eps": 1e-6}
    protocol.loss = "set"
    assert student_loss(protocol, manifest) == ("wbce", 0.1, 1e-6)
    assert student_loss(protocol, {})[2] is None  # sets before the option: mmdd's exact wbce
    protocol.loss = "wbce"
    assert student_loss(protocol, manifest)[2] is None  # a named loss is mmdd's own form
    # and the form reaches the loss: with saturated logits (large inputs) the two forms train different students
    make, built = tracked()
    for eps in (None, 1e-6):
        images, texts, s, _ = inputs()
        train_student(lors_like(epochs=1), make, images * 30, texts * 30, {"image": 0.1, "text": 0.05}, data, seed=0,
                      loss="wbce", similarity=s.round(), log_eps=eps)
    exact, reference = (dict(m.state_dict()) for m in built)
    assert not all(torch.equal(exact[k], reference[k]) for k in exact)
