"""hardware.channels_last / hardware.compile: same values and gradients as the plain model."""

import copy
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import toy_segment
from mmdd.models.functional import ParamLayout
from mmdd.methods.trajectory.meta_gradient import full_unroll, tesla, with_cached_features
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce
from mmdd.utils.trainer import accelerate_model


def model(trainable: str) -> DualEncoder:
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=4, depth=2)
    return DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable=trainable).double()


def gradients(m: DualEncoder, strategy, steps: int = 3) -> list[torch.Tensor]:
    seg = toy_segment(m, steps, lambda logits, idx: symmetric_infonce(logits))
    loss, _ = strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
    return [loss, seg.images.grad, seg.texts.grad, *(lr.grad for lr in seg.lrs.values())]


@pytest.mark.parametrize("trainable", ["backbone_and_heads", "heads"])
@pytest.mark.parametrize("strategy", [full_unroll, tesla], ids=["full", "tesla"])
def test_channels_last_gives_the_same_meta_gradients(trainable, strategy):
    plain = model(trainable)
    fast = copy.deepcopy(plain).accelerate(channels_last=True)
    conv = next(p for p in fast.backbone.parameters() if p.dim() == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert list(fast.state_dict()) == list(plain.state_dict())  # names (and so trajectories) unchanged
    lay = ParamLayout.from_model(plain)
    for mod in ("image", "text"):  # flattened in logical order: a recorded trajectory means the same
        assert torch.equal(lay.flatten(dict(fast.named_parameters()), mod), lay.flatten(dict(plain.named_parameters()), mod))
    for a, b in zip(gradients(fast, strategy), gradients(plain, strategy)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_compile_is_kept_off_where_double_backward_goes_through_the_backbone():
    hw = OmegaConf.create({"channels_last": False, "compile": True})
    assert not accelerate_model(model("backbone_and_heads"), hw, second_order=True).compiled
    assert not accelerate_model(model("heads"), OmegaConf.create({"compile": False})).compiled
    assert accelerate_model(model("heads"), hw, second_order=True).compiled
    assert "_compiled_backbone" not in "".join(accelerate_model(model("heads"), hw).state_dict())


def test_compiled_frozen_backbone_gives_the_same_meta_gradients():
    """The frozen-backbone path (RepBlend with cached features) through a torch.compile'd backbone."""
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("torch.compile's CPU backend needs a C++ compiler")
    plain = model("heads")
    fast = copy.deepcopy(plain).accelerate(compile=True)
    strategy = with_cached_features(tesla)
    for a, b in zip(gradients(fast, strategy), gradients(plain, strategy)):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-10)


def test_work_outside_the_trainer_runs_on_this_rank_s_device(monkeypatch):
    """k-means initialisations and selections' teacher embeddings run on the process's own GPU, as Lightning
    assigns it (LOCAL_RANK's entry of hardware.devices), and on the CPU without GPUs."""
    from mmdd.utils.trainer import process_device

    def hw(accelerator, devices):
        return OmegaConf.create({"accelerator": accelerator, "devices": devices})

    if not torch.cuda.is_available():
        assert process_device(hw("gpu", 1)) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device(hw("cpu", 1)) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert process_device(hw("gpu", 1)) == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device(hw("auto", 2)) == torch.device("cuda", 1)
    assert process_device(hw("gpu", [2, 3])) == torch.device("cuda", 3)
    assert process_device(hw("gpu", "4,5")) == torch.device("cuda", 5)
