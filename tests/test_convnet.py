import pytest
import torch
from omegaconf import OmegaConf

from mmdd.errors import MmddError
from mmdd.models.convnet import ConvNet
from mmdd.models.dual_encoder import build_dual_encoder
from mmdd.paths import conf_dir


def test_features_stay_bounded_at_real_image_sizes():
    """The default CPU model at Flickr's 224 px: width x 4 x 4 features (was 25,088 and a 639M-parameter text head)."""
    cfg = OmegaConf.load(conf_dir() / "model" / "convnet_minilm.yaml")
    small = build_dual_encoder(cfg, 384, 32)
    big = build_dual_encoder(cfg, 384, 224)
    assert small.embed_dim == big.embed_dim == 32 * 16
    assert list(dict(small.named_parameters())) == list(dict(big.named_parameters()))  # same store layout
    assert sum(p.numel() for p in big.parameters()) < 1e6
    assert big(torch.randn(2, 3, 224, 224), torch.randn(2, 384)).shape == (2, 2)


def test_pooling_is_the_mean_over_blocks_of_the_last_map():
    net = ConvNet(image_size=64, width=2, depth=2, feature_side=4)  # 16 x 16 map -> 4 x 4
    x = torch.randn(1, 3, 64, 64)
    full = net.features(x)
    want = full.reshape(1, 2, 4, 4, 4, 4).mean(dim=(3, 5)).flatten(1)
    assert torch.allclose(net(x), want, atol=1e-6)
    unpooled = ConvNet(image_size=64, width=2, depth=2, feature_side=None)
    assert unpooled.num_features == 2 * 16 * 16


def test_an_image_size_the_depth_cannot_halve_is_refused_with_what_to_set():
    cfg = OmegaConf.load(conf_dir() / "model" / "convnet_minilm.yaml")
    with pytest.raises(MmddError, match="divisible by 8"):
        build_dual_encoder(cfg, 384, 36)


def test_an_unknown_backbone_name_is_a_sentence():
    import pytest

    from mmdd.errors import MmddError
    from mmdd.models.image_encoder import build_image_backbone

    with pytest.raises(MmddError, match="neither one of \\['convnet'\\] nor a timm model name"):
        build_image_backbone("no_such_backbone", image_size=32)
