"""Dense (per-patch) CLIP features from any open_clip ViT image tower, without training.

CLIP's last block mixes every patch with the class token, so its patch outputs localise poorly. The training-free
methods change only the last block at inference time:

- ``plain``: the unchanged block (patch tokens through ln_post and the projection).
- ``maskclip``: value path only (MaskCLIP): each patch keeps its own value, no attention mixing.
- ``clearclip``: query-query attention, no residual and no feed-forward (ClearCLIP).
- ``sclip``: correlative self-attention, softmax(qq^T) + softmax(kk^T), inside the block's residual and
  feed-forward (SCLIP's released code keeps both).
- ``naclip``: key-key attention whose logits get the value of a Gaussian kernel over patch distance added
  (exp(-d^2 / 2 sigma^2), at most +1; nothing for the class token), no residual, no feed-forward (NACLIP).

Every variant resizes the position table as the papers' code does: bicubic with a scale factor of
(n + 0.1) / native per axis (n = the target grid side), which is not the same as resizing to an exact size.
The class token always goes through the unchanged block, so the image-level embedding equals CLIP's own.
Official weights and the project's demo weights go through exactly this code; tests/unit/test_dense_exactness.py
compares every variant with an independent implementation of its paper's equations at several input sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DENSE_VARIANTS = ("plain", "maskclip", "clearclip", "sclip", "naclip")


@dataclass(frozen=True)
class _LastBlockRecipe:
    attention: str  # "standard", "value", "qq", "qq+kk", "kk+gauss"
    residual: bool
    feed_forward: bool


_RECIPES = {
    "plain": _LastBlockRecipe("standard", residual=True, feed_forward=True),
    "maskclip": _LastBlockRecipe("value", residual=False, feed_forward=False),
    "clearclip": _LastBlockRecipe("qq", residual=False, feed_forward=False),
    "sclip": _LastBlockRecipe("qq+kk", residual=True, feed_forward=True),
    "naclip": _LastBlockRecipe("kk+gauss", residual=False, feed_forward=False),
}


def interpolate_positional_embedding(pos: torch.Tensor, native_grid: tuple[int, int],
                                     grid: tuple[int, int]) -> torch.Tensor:
    """Resize a (1 + h*w, C) learnable position table to another patch grid (bicubic on the patch part).

    As MaskCLIP/SCLIP/ClearCLIP/NACLIP do (after DINO): the scale factor per axis is (n + 0.1) / native and is
    used as given for the sampling positions, so the result differs slightly from a resize to exactly n.
    """
    if tuple(grid) == tuple(native_grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    channels = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, native_grid[0], native_grid[1], channels).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / native_grid[0], (grid[1] + 0.1) / native_grid[1])
    patch_pos = F.interpolate(patch_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(patch_pos.shape[-2:]) != tuple(grid):  # pragma: no cover - (n + 0.1) / N * N floors to n
        raise ValueError(f"position table resized to {tuple(patch_pos.shape[-2:])}, expected {tuple(grid)}")
    patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(grid[0] * grid[1], channels)
    return torch.cat([cls_pos, patch_pos], dim=0)


def gaussian_neighbourhood(grid: tuple[int, int], sigma: float, device: torch.device) -> torch.Tensor:
    """(1 + N, 1 + N) additive attention bias of NACLIP: exp(-d^2 / (2 sigma^2)) between patches at grid
    distance d, 0 in the class token's row and column. Added to the logits as a value, not as a log-prior."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                            indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], dim=1).float()
    dist2 = (coords[:, None, :] - coords[None, :, :]).pow(2).sum(-1)
    bias = torch.zeros(coords.shape[0] + 1, coords.shape[0] + 1, device=device)
    bias[1:, 1:] = torch.exp(-dist2 / (2.0 * sigma * sigma))
    return bias


@torch.inference_mode()
def encode_prompts(model: torch.nn.Module, tokenizer, prompts: list[str], device: torch.device, embed_dim: int,
                   batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings of an open_clip CLIP, (len(prompts), D), float32 on the CPU."""
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start:start + batch_size]).to(device)
        out.append(F.normalize(encode_tokens(model, tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, embed_dim)


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's encode_text, run only up to the batch's last end-of-text token.

    A causal text tower pooled at the end-of-text token never looks past it, so the padding (most of the 77
    positions for class-name prompts) changes nothing; skipping it makes the 80-template ensembles ~4x
    cheaper. Towers that are not causal CLIP text towers pooled that way get open_clip's own call."""
    mask = getattr(model, "attn_mask", None)
    if (mask is None or getattr(model, "text_pool_type", None) != "argmax"
            or not hasattr(model, "token_embedding") or tokens.shape[1] != mask.shape[0]):
        return model.encode_text(tokens)
    length = int(tokens.argmax(dim=-1).max().item()) + 1
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens[:, :length]).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens[:, :length].argmax(dim=-1)]
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


class ClipDenseEncoder:
    """Wraps an open_clip CLIP model: text embeddings and dense image embeddings in the joint space."""

    def __init__(self, model: torch.nn.Module, tokenizer, model_id: str, device: str = "cpu") -> None:
        visual = model.visual
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise ValueError(f"{model_id}: dense features need an open_clip ViT image tower, "
                             f"got {type(visual).__name__}")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(f"{model_id}: attentional-pool towers (CoCa) are not supported for dense features")
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = torch.device(device)
        self.visual = visual
        self.native_size: tuple[int, int] = tuple(visual.image_size)  # type: ignore[assignment]
        self.patch_size: tuple[int, int] = tuple(visual.patch_size)  # type: ignore[assignment]
        self.native_grid: tuple[int, int] = tuple(visual.grid_size)  # type: ignore[assignment]
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.logit_scale = float(model.logit_scale.exp().clamp(max=100).item())
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else int(visual.transformer.width)

    # ---------------------------------------------------------------- text
    def encode_text(self, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, (len(prompts), D), float32 on the CPU."""
        return encode_prompts(self.model, self.tokenizer, prompts, self.device, self.embed_dim, batch_size)

    # ---------------------------------------------------------------- image
    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> CLIP-normalised."""
        return (images - self.mean) / self.std

    def dense_features(self, images: torch.Tensor, variant: str = "plain",
                       naclip_sigma: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images (B, 3, H, W) -> (global (B, D), dense (B, h, w, D)), both L2-normalised.

        The grid is conv1's output: for a patchify conv, floor(side / patch) (pixels past the last whole patch
        are not seen, as in the papers' code); the position table is interpolated to it.
        Differentiable (training uses it too); wrap calls in inference_mode for serving.
        """
        if variant not in _RECIPES:
            raise ValueError(f"unknown dense variant {variant!r}; choose one of {', '.join(DENSE_VARIANTS)}")
        visual = self.visual
        batch, _, height, width = images.shape
        x = visual.conv1(images)
        grid = (int(x.shape[-2]), int(x.shape[-1]))  # a patchify conv floors a side that is not a multiple
        x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = self._positions(grid)
        x = visual.ln_pre(x + pos.to(x.dtype))
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = _batch_first_block(block, x) if batch_first else block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        last = blocks[-1]
        recipe = _RECIPES[variant]
        if recipe.attention != "standard" and batch_first:
            cls_out = _batch_first_block(last, x, class_token_only=True)  # the patches' outputs are not needed
        else:
            standard = _batch_first_block(last, x) if batch_first else _standard_block(last, x)
            cls_out = standard[:, :1]
        if recipe.attention == "standard":
            patches = standard[:, 1:]
        else:
            patches = _modified_last_block(last, x, recipe, grid, naclip_sigma)[:, 1:]
        global_emb = self._project(cls_out[:, 0])
        dense = self._project(patches).reshape(batch, grid[0], grid[1], -1)
        return global_emb, dense

    def _positions(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for `grid`; when serving (no autograd), resized once per grid and table version
        (4.6 ms per whole-image pass at 21x28 on the development machine), recomputed after any weight update."""
        table = self.visual.positional_embedding
        if torch.is_grad_enabled() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return interpolate_positional_embedding(table, self.native_grid, grid)
        try:  # tensors being traced for an export (fake, functional) have no storage: computed, not cached
            key = (tuple(grid), table._version, table.data_ptr(), table.dtype)
        except (RuntimeError, NotImplementedError):
            return interpolate_positional_embedding(table, self.native_grid, grid)
        cache = self.__dict__.setdefault("_position_cache", {})
        if key not in cache:
            if len(cache) >= 16:
                cache.clear()
            cache[key] = interpolate_positional_embedding(table, self.native_grid, grid)
        return cache[key]

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = self.visual.ln_post(tokens)
        if self.visual.proj is not None:
            tokens = tokens @ self.visual.proj
        return F.normalize(tokens, dim=-1)


def _batch_first_block(block: torch.nn.Module, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock on batch-first (B, N, C) input, computed batch-first throughout.

    nn.MultiheadAttention(batch_first=True) transposes its input to sequence-first, and a linear layer on that
    non-contiguous view runs, under CPU bf16 autocast, as a batched matmul against a copy of its weight per token
    (the in-projection alone copied 350 M elements per block: bf16 ran 7x slower than fp32). The same equations on
    contiguous tensors with scaled_dot_product_attention; blocks of any other shape run as they are.
    class_token_only: only the class token's output (B, 1, C), for a last block whose patch outputs a dense
    variant replaces (a twelfth of a ViT-B's cost saved)."""
    if not _fast_path(block):
        return block(x)[:, :1] if class_token_only else block(x)
    attn = block.attn
    batch, _, channels = x.shape
    heads = attn.num_heads
    y = block.ln_1(x)
    if class_token_only:  # attention rows are independent: the class token's output needs only its own query
        weight, bias = attn.in_proj_weight, attn.in_proj_bias
        q = F.linear(y[:, :1], weight[:channels], bias[:channels])
        k, v = F.linear(y, weight[channels:], bias[channels:]).chunk(2, dim=-1)
        x = x[:, :1]
    else:
        q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, x.shape[1], channels)
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _fast_path(block: torch.nn.Module) -> bool:
    """An open_clip block of the usual shape (self-attention through nn.MultiheadAttention, no extra norms)."""
    attn = getattr(block, "attn", None)
    return (isinstance(attn, torch.nn.MultiheadAttention) and attn._qkv_same_embed_dim
            and not hasattr(block, "ln_1_kv")
            and isinstance(getattr(block, "ln_attn", torch.nn.Identity()), torch.nn.Identity))


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, heads, N, C / heads)."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _standard_block(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a sequence-first block on batch-first input."""
    return block(x.transpose(0, 1)).transpose(0, 1)


def _modified_last_block(block: torch.nn.Module, x: torch.Tensor, recipe: _LastBlockRecipe,
                         grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """The last residual block with its attention replaced; x is batch-first (B, N, C)."""
    attn: torch.nn.MultiheadAttention = block.attn
    heads = attn.num_heads
    batch, tokens, channels = x.shape
    head_dim = channels // heads
    y = block.ln_1(x)
    q, k, v = F.linear(y, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    q, k, v = (_split_heads(t, heads) for t in (q, k, v))
    scale = 1.0 / math.sqrt(head_dim)
    if recipe.attention == "value":
        out = v
    elif recipe.attention == "qq":
        out = torch.softmax(q @ q.transpose(-2, -1) * scale, dim=-1) @ v
    elif recipe.attention == "qq+kk":
        weights = torch.softmax(q @ q.transpose(-2, -1) * scale, dim=-1)
        weights = weights + torch.softmax(k @ k.transpose(-2, -1) * scale, dim=-1)
        out = weights @ v
    elif recipe.attention == "kk+gauss":
        logits = k @ k.transpose(-2, -1) * scale
        bias = gaussian_neighbourhood(grid, sigma, x.device).to(logits.dtype)
        out = torch.softmax(logits + bias, dim=-1) @ v
    else:  # pragma: no cover - guarded by DENSE_VARIANTS
        raise ValueError(recipe.attention)
    out = out.transpose(1, 2).reshape(batch, tokens, channels)
    out = F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    if hasattr(block, "ls_1"):
        out = block.ls_1(out)
    if recipe.residual:
        out = x + out
    if recipe.feed_forward:
        mlp_out = block.mlp(block.ln_2(out))
        out = out + (block.ls_2(mlp_out) if hasattr(block, "ls_2") else mlp_out)
    return out
