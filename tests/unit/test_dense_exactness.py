"""Every dense variant equals its paper's released method, written here again from the papers' equations.

The references below are independent of ovseg_ros.core.clip_dense: sequence-first tensors as in the papers'
code, attention spelled out per head, NACLIP's Gaussian kernel built by explicit loops. They run on a random
open_clip ViT with native grid 14x14 (as ViT-B/16 at 224) whose last-block queries and keys are scaled up so the
attention is peaked and any difference in the method shows. Sizes cover native, non-square both ways and 336.
"""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from ovseg_ros.core.clip_dense import DENSE_VARIANTS, ClipDenseEncoder

SIZES = [(224, 224), (224, 320), (320, 224), (336, 336)]
SIGMA = 5.0  # NACLIP's gaussian_std


@pytest.fixture(scope="module")
def encoder() -> ClipDenseEncoder:
    torch.manual_seed(7)
    vision = {"image_size": 224, "patch_size": 16, "width": 192, "layers": 3, "head_width": 48}
    text = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    model = open_clip.model.CLIP(embed_dim=96, vision_cfg=vision, text_cfg=text)
    for param in model.visual.parameters():  # random weights of a realistic scale, not open_clip's zero inits
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=0.05)
    width = vision["width"]
    with torch.no_grad():
        last = model.visual.transformer.resblocks[-1].attn
        last.in_proj_weight[: 2 * width] *= 4.0  # peaked last-block attention (queries and keys)
        last.in_proj_bias.normal_(std=0.1)
    return ClipDenseEncoder(model.eval(), open_clip.get_tokenizer("ViT-B-16"), "exactness-test")


def reference_positions(visual, grid_h: int, grid_w: int) -> torch.Tensor:
    """(1 + h*w, C): the papers' interpolate_pos_encoding (bicubic, scale factor (n + 0.1) / sqrt(N))."""
    table = visual.positional_embedding
    side = int(math.sqrt(table.shape[0] - 1))
    if (grid_h, grid_w) == (side, side):
        return table
    patches = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic")
    return torch.cat([table[:1], patches.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)])


def reference_gaussian(grid_h: int, grid_w: int, sigma: float) -> torch.Tensor:
    """NACLIP's attention addition: kernel value between patches, zero row and column for the class token."""
    n = grid_h * grid_w
    out = torch.zeros(n + 1, n + 1)
    for a in range(n):
        for b in range(n):
            dy, dx = a // grid_w - b // grid_w, a % grid_w - b % grid_w
            out[1 + a, 1 + b] = math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma))
    return out


def reference_dense(encoder: ClipDenseEncoder, images: torch.Tensor, variant: str) -> torch.Tensor:
    """(B, h, w, D) normalised patch embeddings, as each paper's released code computes them."""
    visual = encoder.visual
    batch, _, height, width = images.shape
    grid_h, grid_w = height // 16, width // 16
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(batch, 1, -1), x], dim=1)
    x = visual.ln_pre(x + reference_positions(visual, grid_h, grid_w))
    for block in visual.transformer.resblocks[:-1]:
        x = block(x)  # open_clip blocks are batch-first; the unchanged blocks are the model's own
    x = x.transpose(0, 1)  # sequence-first (L, B, C) from here, as in the papers' code
    block = visual.transformer.resblocks[-1]
    attn = block.attn

    def attention(inp: torch.Tensor, how: str) -> torch.Tensor:
        length, bsz, channels = inp.shape
        heads = attn.num_heads
        hd = channels // heads
        q, k, v = (t.reshape(length, bsz * heads, hd).transpose(0, 1)
                   for t in (inp @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1))
        scale = hd ** -0.5
        if how == "vanilla":
            weights = torch.softmax(torch.bmm(q * scale, k.transpose(1, 2)), dim=-1)
        elif how == "identity":  # MaskCLIP: every token attends only to itself
            weights = torch.eye(length).expand(bsz * heads, length, length)
        elif how == "qq":
            weights = torch.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
        elif how == "csa":
            weights = (torch.softmax(torch.bmm(q, q.transpose(1, 2)) * scale, dim=-1)
                       + torch.softmax(torch.bmm(k, k.transpose(1, 2)) * scale, dim=-1))
        elif how == "naclip":
            logits = torch.bmm(k, k.transpose(1, 2)) * scale + reference_gaussian(grid_h, grid_w, SIGMA)
            weights = torch.softmax(logits, dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(length, bsz, channels)
        return out @ attn.out_proj.weight.T + attn.out_proj.bias

    if variant == "plain":
        x = x + attention(block.ln_1(x), "vanilla")
        x = x + block.mlp(block.ln_2(x))
    elif variant == "sclip":  # SCLIP: residual and feed-forward kept around correlative self-attention
        x = x + attention(block.ln_1(x), "csa")
        x = x + block.mlp(block.ln_2(x))
    elif variant == "maskclip":  # ClearCLIP's MaskCLIP mode: value path, no residual, no feed-forward
        x = attention(block.ln_1(x), "identity")
    elif variant == "clearclip":
        x = attention(block.ln_1(x), "qq")
    elif variant == "naclip":  # NACLIP's reduced architecture
        x = attention(block.ln_1(x), "naclip")
    tokens = visual.ln_post(x.transpose(0, 1)) @ visual.proj
    tokens = tokens / tokens.norm(dim=-1, keepdim=True)
    return tokens[:, 1:].reshape(batch, grid_h, grid_w, -1)


def test_every_paper_variant_is_covered():
    assert set(DENSE_VARIANTS) == {"plain", "maskclip", "clearclip", "sclip", "naclip"}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", DENSE_VARIANTS)
def test_dense_features_equal_the_papers_code(encoder, variant, size):
    generator = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    images = encoder.normalise(torch.rand(2, 3, *size, generator=generator))
    with torch.inference_mode():
        global_emb, dense = encoder.dense_features(images, variant, naclip_sigma=SIGMA)
        expected = reference_dense(encoder, images, variant)
        plain_global = reference_dense(encoder, images, "plain")  # shape check only
    assert dense.shape == expected.shape == (2, size[0] // 16, size[1] // 16, 96)
    assert plain_global.shape == expected.shape
    assert (dense - expected).abs().max().item() <= 1e-5
    assert global_emb.shape == (2, 96)


def test_peaked_attention_makes_the_methods_differ(encoder):
    """The test model is sensitive: each method gives clearly different features (so equality above means
    something), and the papers' position interpolation differs from a resize to the exact grid."""
    images = encoder.normalise(torch.rand(1, 3, 224, 320, generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        outputs = {v: encoder.dense_features(images, v)[1] for v in DENSE_VARIANTS}
    for a in DENSE_VARIANTS:
        for b in DENSE_VARIANTS:
            if a < b:
                assert (outputs[a] - outputs[b]).abs().max().item() > 1e-2, (a, b)
    table = encoder.visual.positional_embedding[1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    exact = F.interpolate(table, size=(14, 20), mode="bicubic")
    papers = F.interpolate(table, scale_factor=(14.1 / 14, 20.1 / 14), mode="bicubic")
    assert (exact - papers).abs().max().item() > 1e-3
