"""Builders for the project's own small Segment Anything model.

No official SAM weights can be fetched on our build machines, so the demo and the accuracy tests use a tiny
SAM trained from scratch on the synthetic world (see ``ovseg_ros.training.train_sam``). It is assembled from
segment_anything's own modules so that ``SamPredictor``, ``ResizeLongestSide`` and every downstream code path
behave exactly as they do with the official checkpoints; only the sizes differ.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

DEMO_SAM_CONFIG: dict[str, Any] = {
    # Image encoder: 128 px input, 8 px patches -> 16x16 tokens, all blocks with global attention.
    "img_size": 128,
    "patch_size": 8,
    "encoder_embed_dim": 128,
    "encoder_depth": 4,
    "encoder_num_heads": 4,
    "encoder_mlp_ratio": 4.0,
    "encoder_use_rel_pos": True,
    "encoder_window_size": 0,
    "encoder_global_attn_indexes": (),
    # Prompt encoder and mask decoder.
    "prompt_embed_dim": 128,
    "image_embedding_size": 16,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_num_heads": 4,
    "decoder_mlp_dim": 512,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    # SAM's standard normalisation (RGB, 0-255 inputs).
    "pixel_mean": (123.675, 116.28, 103.53),
    "pixel_std": (58.395, 57.12, 57.375),
}


def _build(cfg: dict[str, Any]) -> Sam:
    """Assemble a Sam from a DEMO_SAM_CONFIG-shaped dict."""
    if cfg["img_size"] // cfg["patch_size"] != cfg["image_embedding_size"]:
        raise ValueError("image_embedding_size must equal img_size // patch_size")
    dim = cfg["prompt_embed_dim"]
    size = cfg["image_embedding_size"]
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=cfg["img_size"],
            patch_size=cfg["patch_size"],
            embed_dim=cfg["encoder_embed_dim"],
            depth=cfg["encoder_depth"],
            num_heads=cfg["encoder_num_heads"],
            mlp_ratio=cfg["encoder_mlp_ratio"],
            out_chans=dim,
            qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=cfg["encoder_use_rel_pos"],
            window_size=cfg["encoder_window_size"],
            global_attn_indexes=tuple(cfg["encoder_global_attn_indexes"]),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=dim,
            image_embedding_size=(size, size),
            input_image_size=(cfg["img_size"], cfg["img_size"]),
            mask_in_chans=cfg["mask_in_chans"],
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=cfg["num_multimask_outputs"],
            transformer=TwoWayTransformer(
                depth=cfg["decoder_depth"],
                embedding_dim=dim,
                mlp_dim=cfg["decoder_mlp_dim"],
                num_heads=cfg["decoder_num_heads"],
            ),
            transformer_dim=dim,
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        pixel_mean=list(cfg["pixel_mean"]),
        pixel_std=list(cfg["pixel_std"]),
    )


def _read_state_dict(checkpoint: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read weights without executing pickled code: safetensors, or torch.load with weights_only."""
    path = os.fspath(checkpoint)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    if path.endswith((".pt", ".pth")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
        return state
    raise ValueError(f"unsupported SAM checkpoint format {path!r}: expected .safetensors, .pt or .pth")


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def build_demo_sam(checkpoint: str | os.PathLike[str] | None = None) -> Sam:
    """Build the demo SAM (in eval mode), optionally loading weights strictly.

    A checkpoint that does not match the architecture raises ValueError naming the missing and unexpected
    keys, so a wrong file fails loudly instead of yielding a half-initialised model.
    """
    sam = _build(dict(DEMO_SAM_CONFIG))
    sam.eval()
    if checkpoint is None:
        return sam
    state = _read_state_dict(checkpoint)
    expected = sam.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {os.fspath(checkpoint)} does not match the demo SAM: "
            f"missing keys [{_short(missing)}]; unexpected keys [{_short(unexpected)}]"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        details = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong]
        raise ValueError(f"checkpoint {os.fspath(checkpoint)} has mismatched shapes: {_short(details)}")
    sam.load_state_dict(state, strict=True)
    return sam
