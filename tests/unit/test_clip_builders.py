"""CLIP architecture name -> builder: the demo conv-stem ViTs keep open_clip's CLIP class and every dense path."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ovseg_ros.core.clip_builders import CONV_STEMS, ConvStem, build_clip, builder_for
from ovseg_ros.core.clip_dense import DENSE_VARIANTS
from ovseg_ros.core.registry import ModelError, load_clip


@pytest.mark.parametrize("arch", list(CONV_STEMS))
def test_conv_stem_architectures_replace_only_the_patchify_convolution(arch):
    import open_clip

    torch.manual_seed(0)
    model = build_clip(arch)
    assert isinstance(model, open_clip.model.CLIP) and isinstance(model.visual.conv1, ConvStem)
    assert model.visual.conv1.stride == model.visual.patch_size[0]
    size = model.visual.image_size[0]
    tokens = model.visual.conv1(torch.rand(2, 3, size, size))
    assert tokens.shape == (2, model.visual.transformer.width, *model.visual.grid_size)
    assert model.encode_image(torch.rand(1, 3, size, size)).shape == (1, 128)  # open_clip's own forward


def test_every_dense_variant_runs_on_a_conv_stem_model_at_a_non_square_size():
    encoder = load_clip("ovseg-demo-convvit-224")
    encoder.model.eval()
    patch = encoder.patch_size[0]
    images = encoder.normalise(torch.rand(1, 3, 14 * patch, 20 * patch))
    for variant in DENSE_VARIANTS:
        global_emb, dense = encoder.dense_features(images, variant)
        assert dense.shape == (1, 14, 20, 128) and torch.isfinite(dense).all(), variant
        assert torch.allclose(dense.norm(dim=-1), torch.ones(1, 14, 20), atol=1e-4)


def test_weights_load_strictly_into_the_same_architecture_only(tmp_path):
    torch.manual_seed(1)
    model = build_clip("ovseg-demo-convvit-224").eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    again = build_clip("ovseg-demo-convvit-224", path).eval()
    image = torch.rand(1, 3, 224, 224)
    assert torch.equal(model.encode_image(image), again.encode_image(image))
    with pytest.raises(ModelError):  # a plain ViT cannot take a conv-stem checkpoint (nor the reverse)
        load_clip(f"ovseg-demo-vit:{path}")
    assert builder_for("ViT-B-16") is not builder_for("ovseg-demo-convvit-224")


def test_loading_weights_logs_no_random_init_warning(caplog):
    """open_clip warns "initialized randomly" before our loader puts the weights in; the log must not say so."""
    import logging

    with caplog.at_level(logging.WARNING):
        load_clip("ovseg-demo-clip")
    assert "initialized randomly" not in caplog.text
