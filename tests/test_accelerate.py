"""hardware.channels_last / hardware.compile: same values and gradients as the plain model."""

import copy
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from mmdd.methods.matching import BatchSchedule, ParamLayout
from mmdd.methods.meta_gradient import Segment, full_unroll, tesla, with_cached_features
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import DualEncoder
from mmdd.models.losses import symmetric_infonce
from mmdd.utils.trainer import accelerate_model


def model(trainable: str) -> DualEncoder:
    torch.manual_seed(0)
    bb = ConvNet(image_size=8, width=4, depth=2)
    return DualEncoder(bb, bb.num_features, text_dim=5, embed_dim=6, image_head=True, trainable=trainable).double()


def gradients(m: DualEncoder, strategy, steps: int = 3) -> list[torch.Tensor]:
    for p in m.parameters():
        p.requires_grad_(False)
    lay = ParamLayout.from_model(m)
    named = dict(m.named_parameters())
    start = {k: lay.flatten(named, k) for k in ("image", "text")}
    g = torch.Generator().manual_seed(1)
    target = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in start.items()}
    images = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lrs = {k: torch.tensor(0.5, dtype=torch.float64, requires_grad=True) for k in start}
    seg = Segment(m, lay, start, target, lrs, images, texts, BatchSchedule(4, 3, torch.Generator().manual_seed(3)),
                  steps, lambda logits, idx: symmetric_infonce(logits))
    loss, _ = strategy(seg, lambda t, inputs: t.backward(inputs=inputs))
    return [loss, images.grad, texts.grad, *(lr.grad for lr in lrs.values())]


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
