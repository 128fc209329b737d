"""Open-Vocabulary SAM (Yuan et al., ECCV 2024) as plain PyTorch modules, loading the released checkpoints.

The released model (github.com/HarborYuan/ovsam, `seg/models`) is one frozen CLIP backbone (OpenAI's RN50x16)
feeding three trained parts:

- ``neck`` -- the SAM2CLIP adapter (`MultiLayerTransformerNeck`): each of the four ResNet stages projected to
  stride 16, summed with a level embedding and SAM ViT-H's position table, five SAM encoder blocks, SAM's neck.
  It stands in for SAM's image encoder: its output is SAM-like (256, 64, 64) image embeddings.
- ``fpn_neck`` -- an FPN over the same four stages (mmdet's `FPN`, 256 channels, no extra levels).
- ``mask_decoder`` -- the CLIP2SAM head (`OVSAMHead`): SAM's mask decoder with a label token in place of the IoU
  token, and a RoI branch that pools the FPN inside the predicted mask's box and classifies it against the
  text embeddings.

SAM's prompt encoder (`pe`, from SAM ViT-H's checkpoint) is segment_anything's own ``PromptEncoder``; the backbone
and the text tower are open_clip's own RN50x16. Module and parameter names follow the released code, so each
checkpoint loads with ``strict=True`` under the prefix it is saved with (``OVSAM_CHECKPOINT_PREFIXES``).

What is computed but unused in the released head is kept out of the forward pass: the label token's MLP output
is added times zero to the RoI features (`roi_feats[:, None] + 0 * cls_embed`), so its weights load but never run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.prompt_encoder import PromptEncoder
from segment_anything.modeling.transformer import TwoWayTransformer
from torch import nn
from torchvision.ops import roi_align

CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs" / "ovsam"

# Where each part of the network lives in the released files (the prefix `load_checkpoint_with_prefix` strips).
OVSAM_CHECKPOINT_PREFIXES = {
    "neck": ("sam2clip", "neck_student."),
    "fpn_neck": ("clip2sam", "fpn_neck."),
    "mask_decoder": ("clip2sam", "mask_decoder."),
    "pe": ("sam", "prompt_encoder."),
}


@dataclass(frozen=True)
class OvSamConfig:
    """One OV-SAM layout, as its released config (`seg/configs/ovsam/ovsam_*_rn50x16_point.py`) sets it."""

    name: str
    clip_arch: str  # open_clip architecture of the backbone and text tower
    backbone_channels: tuple[int, ...]  # the four ResNet stages' widths
    attnpool_size: int  # the CLIP attention pool's grid (image_size / 32): the CLIP branch's RoIAlign size
    head_roi_size: int  # the CLIP2SAM head's RoIAlign output (12 for COCO, 7 for LVIS)
    label_set: str  # the released class list the head was trained on (model_configs/ovsam/classes-*.json)
    neck_embed_dim: int = 1280  # SAM ViT-H's width
    neck_depth: int = 5
    neck_heads: int = 16
    neck_window: int = 14
    neck_global_blocks: tuple[int, ...] = (4,)
    image_size: int = 1024
    prompt_embed_dim: int = 256
    fpn_channels: int = 256
    strides: tuple[int, ...] = (4, 8, 16, 32)
    alpha: float = 0.1  # weight of the CLIP classifier for classes seen in training
    beta: float = 0.9  # ... and for unseen classes
    log_logit_scale: float = 4.6052  # OVSAMHead's default: exp() = 100
    finest_scale: int = 56  # mmdet SingleRoIExtractor's level mapping
    text_dim: int = 768
    pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    parts: dict[str, str] = field(default_factory=dict)  # part -> manifest entry (sam2clip, clip2sam, sam, clip)
    description: str = ""

    @property
    def embedding_size(self) -> int:
        return self.image_size // 16


def ovsam_config_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("ovsam-*.json"))


@cache
def get_ovsam_config(name: str) -> OvSamConfig:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown OV-SAM architecture '{name}'; choose one of {', '.join(ovsam_config_names())}")
    raw = json.loads(path.read_text())
    for key in ("backbone_channels", "neck_global_blocks", "strides", "pixel_mean", "pixel_std"):
        if key in raw:
            raw[key] = tuple(raw[key])
    raw.pop("comment", None)
    return OvSamConfig(name=name, **raw)


class Sam2ClipNeck(nn.Module):
    """SAM2CLIP: the four CLIP stages -> SAM-like (B, 256, 64, 64) image embeddings.

    ``patch_embeds.i.projection`` takes stage i to stride 16 (a strided conv for finer stages, a transposed conv
    for the stride-32 stage), as mmdet's ``PatchEmbed`` does with inputs whose size the stride divides.
    """

    STRIDE = 16

    def __init__(self, cfg: OvSamConfig) -> None:
        super().__init__()
        size = cfg.image_size // self.STRIDE
        self.patch_embeds = nn.ModuleList()
        for channels, stride in zip(cfg.backbone_channels, cfg.strides, strict=True):
            embed = nn.Module()
            if stride > self.STRIDE:
                embed.projection = nn.ConvTranspose2d(channels, cfg.neck_embed_dim, stride // self.STRIDE,
                                                      stride // self.STRIDE)
            else:
                embed.projection = nn.Conv2d(channels, cfg.neck_embed_dim, self.STRIDE // stride,
                                             self.STRIDE // stride)
            self.patch_embeds.append(embed)
        self.register_buffer("pos_embed", torch.zeros(1, size, size, cfg.neck_embed_dim))  # SAM ViT-H's, saved
        self.level_encoding = nn.Embedding(len(cfg.backbone_channels), cfg.neck_embed_dim)
        self.blocks = nn.ModuleList(
            Block(dim=cfg.neck_embed_dim, num_heads=cfg.neck_heads, mlp_ratio=4, qkv_bias=True,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6), act_layer=nn.GELU, use_rel_pos=True,
                  rel_pos_zero_init=True, window_size=0 if i in cfg.neck_global_blocks else cfg.neck_window,
                  input_size=(size, size))
            for i in range(cfg.neck_depth))
        out = cfg.prompt_embed_dim
        self.neck = nn.Sequential(nn.Conv2d(cfg.neck_embed_dim, out, 1, bias=False), LayerNorm2d(out),
                                  nn.Conv2d(out, out, 3, padding=1, bias=False), LayerNorm2d(out))

    def forward(self, stages: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = 0
        for level, (embed, feat) in enumerate(zip(self.patch_embeds, stages, strict=True)):
            x = x + embed.projection(feat).permute(0, 2, 3, 1) + self.level_encoding.weight[level]
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2).contiguous())


class ConvUnit(nn.Module):
    """A conv with mmcv ConvModule's parameter names (``conv``) and an optional ReLU after it."""

    def __init__(self, conv: nn.Conv2d, relu: bool = False) -> None:
        super().__init__()
        self.conv = conv
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class FeaturePyramid(nn.Module):
    """mmdet's FPN as OV-SAM configures it: 1x1 laterals, nearest top-down sums, 3x3 outputs, no extra levels."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvUnit(nn.Conv2d(c, out_channels, 1)) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvUnit(nn.Conv2d(out_channels, out_channels, 3, padding=1))
                                       for _ in in_channels)

    def forward(self, stages: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, stages, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return tuple(conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=True))


class PromptMaskDecoder(nn.Module):
    """SAM's mask decoder with one mask token and no IoU head (the released ``MaskDecoder(with_iou=False)``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8)
        self.num_mask_tokens = 1
        self.mask_tokens = nn.Embedding(1, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_hypernetworks_mlps = nn.ModuleList([MLP(dim, dim, dim // 8, 3)])


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, h, w) bool -> (N, 4) x1, y1, x2, y2 tight boxes (exclusive ends; zeros for an empty mask), as mmdet's
    ``mask2bbox``."""
    boxes = masks.new_zeros((masks.shape[0], 4), dtype=torch.float32)
    columns, rows = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        xs, ys = torch.where(columns[i])[0], torch.where(rows[i])[0]
        if len(xs) and len(ys):
            boxes[i] = torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()
    return boxes


def multilevel_roi_align(feats: tuple[torch.Tensor, ...], boxes: torch.Tensor, strides: tuple[int, ...],
                         output_size: int, finest_scale: int = 56) -> torch.Tensor:
    """mmdet's SingleRoIExtractor over one image: each box pools the level its scale maps to
    (floor(log2(sqrt(area) / finest_scale)), clamped), with mmcv's RoIAlign = torchvision's ``aligned=True``."""
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(0, len(feats) - 1).long()
    out = feats[0].new_zeros(len(boxes), feats[0].shape[1], output_size, output_size)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).to(feats[0].dtype)
    for level, (feat, stride) in enumerate(zip(feats, strides, strict=True)):
        index = (levels == level).nonzero(as_tuple=False).squeeze(1)
        if index.numel():
            out[index] = roi_align(feat, rois[index], output_size, spatial_scale=1.0 / stride,
                                   sampling_ratio=0, aligned=True)
    return out


class Clip2SamHead(nn.Module):
    """CLIP2SAM: SAM's decoder run with a label token, plus the FPN RoI classifier (the released ``OVSAMHead``)."""

    def __init__(self, cfg: OvSamConfig) -> None:
        super().__init__()
        dim = cfg.prompt_embed_dim
        self.mask_decoder = PromptMaskDecoder(dim)
        self.label_token = nn.Embedding(1, dim)
        self.label_mlp = MLP(dim, dim, cfg.text_dim, 3)  # trained, loaded, and multiplied by zero in the release
        self.roi_conv = nn.Sequential(ConvUnit(nn.Conv2d(cfg.fpn_channels, cfg.text_dim, 1, bias=False), relu=True))
        self.roi_size = cfg.head_roi_size
        self.strides = cfg.strides
        self.finest_scale = cfg.finest_scale
        self.register_buffer("logit_scale", torch.tensor(cfg.log_logit_scale), persistent=False)

    def decode(self, image_embedding: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor,
               dense: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) embedding, (N, T, C) prompt tokens, (N, C, h, w) dense prompt -> (N, 1, 4h, 4w) logits."""
        count = sparse.shape[0]
        decoder = self.mask_decoder
        tokens = torch.cat([self.label_token.weight, decoder.mask_tokens.weight], dim=0)
        queries = torch.cat([tokens.unsqueeze(0).expand(count, -1, -1), sparse], dim=1)
        source = image_embedding.expand(count, -1, -1, -1) + dense
        positions = image_pe.expand(count, -1, -1, -1)
        b, c, h, w = source.shape
        queries, keys = decoder.transformer(source, positions, queries)
        mask_token = queries[:, 1, :]
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, c, h, w))
        weights = decoder.output_hypernetworks_mlps[0](mask_token)[:, None, :]
        b, c, h, w = upscaled.shape
        return (weights @ upscaled.reshape(b, c, h * w)).reshape(b, 1, h, w)

    def region_embeddings(self, fpn: tuple[torch.Tensor, ...], boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) boxes in input pixels -> (N, D) un-normalised embeddings of the FPN inside them."""
        pooled = multilevel_roi_align(fpn, boxes, self.strides, self.roi_size, self.finest_scale)
        return self.roi_conv(pooled).mean(dim=(-2, -1))

    def logits(self, embeddings: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """(N, D) against (D, K + 1, P) class prototypes -> (N, K + 1): the best prototype, times exp(scale)."""
        scores = torch.einsum("nc,ckp->nkp", F.normalize(embeddings, dim=-1), class_embeddings)
        return self.logit_scale.exp() * scores.max(-1).values


class OvSamNetwork(nn.Module):
    """The whole inference network: open_clip's CLIP (``clip``: backbone, attention pool and text tower),
    ``neck``, ``fpn_neck``, ``pe`` and ``mask_decoder`` with the released parts' parameter names."""

    def __init__(self, cfg: OvSamConfig, clip: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.clip = clip
        self.neck = Sam2ClipNeck(cfg)
        self.fpn_neck = FeaturePyramid(cfg.backbone_channels, cfg.fpn_channels)
        size = cfg.embedding_size
        self.pe = PromptEncoder(embed_dim=cfg.prompt_embed_dim, image_embedding_size=(size, size),
                                input_image_size=(cfg.image_size, cfg.image_size), mask_in_chans=16)
        self.mask_decoder = Clip2SamHead(cfg)

    def backbone_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """open_clip ModifiedResNet's stem and four stages (what the released OpenCLIPBackbone returns)."""
        visual = self.clip.visual
        x = visual.act1(visual.bn1(visual.conv1(images)))
        x = visual.act2(visual.bn2(visual.conv2(x)))
        x = visual.act3(visual.bn3(visual.conv3(x)))
        x = visual.avgpool(x)
        stages = []
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x).contiguous()
            stages.append(x)
        return tuple(stages)

    def clip_region_embeddings(self, last_stage: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """The CLIP branch: RoIAlign of the stride-32 stage to the attention pool's grid, then CLIP's pool."""
        size = self.cfg.attnpool_size
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).to(last_stage.dtype)
        pooled = roi_align(last_stage, rois, (size, size), spatial_scale=1 / 32.0, sampling_ratio=0, aligned=True)
        return self.clip.visual.attnpool(pooled)


def ensemble_logits(head_logits: torch.Tensor, clip_logits: torch.Tensor, seen: torch.Tensor,
                    valid: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """OV-SAM's open-vocabulary ensemble (``OVSAM.open_voc_inference``): geometric means of the two softmaxes,
    weighted alpha for classes seen in training (and the background), beta otherwise; prompts whose mask is
    empty at the CLIP grid keep the head's classifier alone. (N, K + 1) each -> (N, K + 1) log-scores."""
    head = head_logits.softmax(-1)
    clip = clip_logits.softmax(-1)
    a = alpha * valid[:, None]
    b = beta * valid[:, None]
    seen_part = (head ** (1 - a) * clip ** a).log() * seen
    unseen_part = (head ** (1 - b) * clip ** b).log() * (1 - seen)
    return seen_part + unseen_part


def attnpool_grid(clip: nn.Module) -> int:
    """The side of the CLIP attention pool's position grid (RN50x16: 12)."""
    return int(math.isqrt(clip.visual.attnpool.positional_embedding.shape[0] - 1))


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A released ``.pth`` (a bare state dict or mmengine's ``{"state_dict": ..., "meta": ...}``) or a
    ``.safetensors`` file -> its tensors. Pickles are read with ``weights_only``; a file whose mmengine metadata
    needs more is read in full only when `trusted` (its sha256 verified against the manifest's record)."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not trusted:
            raise ValueError(f"{path}: not a plain tensor checkpoint ({exc}); fetch it through the manifest "
                             "(ovseg-models fetch NAME) so its checksum is verified before it is read in full") from exc
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a state dict")
    return checkpoint


def with_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix`, with it stripped (mmengine's ``load_checkpoint_with_prefix``)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_ovsam_parts(network: OvSamNetwork, parts: dict[str, str | Path | dict[str, torch.Tensor]],
                     trusted: bool = False) -> None:
    """Load the released files into `network`, each module strictly: ``clip`` (an open_clip checkpoint of
    ``cfg.clip_arch``), ``sam`` (SAM ViT-H's checkpoint: its prompt encoder), ``sam2clip`` and ``clip2sam``
    (OV-SAM's). A part may also be given as an already read state dict. ValueError names what does not fit."""
    missing = sorted({"clip", *(part for part, _ in OVSAM_CHECKPOINT_PREFIXES.values())} - set(parts))
    if missing:
        raise ValueError(f"OV-SAM needs the parts {', '.join(missing)} too")
    read: dict[str, dict[str, torch.Tensor]] = {}

    def state_of(part: str) -> dict[str, torch.Tensor]:
        if part not in read:
            source = parts[part]
            read[part] = source if isinstance(source, dict) else read_checkpoint(source, trusted)
        return read[part]

    clip_source = parts["clip"]
    if isinstance(clip_source, dict):
        network.clip.load_state_dict(clip_source, strict=True)
    else:
        import open_clip

        open_clip.load_checkpoint(network.clip, str(clip_source), strict=True)
    for module_name, (part, prefix) in OVSAM_CHECKPOINT_PREFIXES.items():
        state = with_prefix(state_of(part), prefix)
        if not state:
            raise ValueError(f"the {part} file holds no '{prefix}*' weights (is it the right file?)")
        module = getattr(network, module_name)
        result = module.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"the {part} file's '{prefix}*' weights do not fit {module_name}: missing "
                             f"{result.missing_keys[:6]}, unexpected {result.unexpected_keys[:6]}")
