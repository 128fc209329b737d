"""SED (Xie et al., "SED: A Simple Encoder-Decoder for Open-Vocabulary Semantic Segmentation", CVPR 2024) as plain
PyTorch modules, for the checkpoints released at github.com/xb534/SED (Apache-2.0).

The network, as its inference runs:

1. A fine-tuned open_clip ConvNeXt CLIP (``convnext_base_w_320`` or ``convnext_large_d_320``) sees the image
   resized to 768 x 768. Its stages give the decoder's guidance features (strides 4, 8, 16, 32); the last stage,
   through the tower's head norm and projection *at every position*, gives dense CLIP embeddings (stride 32).
2. A cost volume: the cosine of every dense embedding with every class's text embedding under each of the 80
   ImageNet templates (classes x templates x 24 x 24), embedded by a 7x7 convolution over the templates.
3. A gradual-fusion decoder, three stages from 24 to 192 pixels: a large-kernel ConvNeXt block per class, linear
   attention across the classes (on 2x2-pooled maps), a transposed-conv upsample, and a double conv over the
   class's map, the image's guidance features and the cost volume upsampled by transposed convs.
4. One logit map per class at 192 x 192; sigmoid. With fast inference, a 1-channel head after the cost embedding
   and after each decoder stage keeps only the classes in some pixel's top-k, so later stages see fewer classes
   (the released ``TEST.FAST_INFERENCE`` / ``TEST.TOPK``); rejected classes get probability 0.

Module and parameter names follow the released checkpoint (``sem_seg_head.predictor.clip_model.*`` and
``sem_seg_head.predictor.transformer.*``), so it loads with ``strict=True``. Per-class convolutions can run a chunk
of classes at a time (``class_chunk``): they are independent per class, and the cross-class attention always sees
every class, so the result does not depend on the chunk.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_DIR = Path(__file__).resolve().parents[2] / "model_configs" / "sed"
# detectron2's defaults as SED's add_sed_config sets them (sed/config.py): the CLIP mean/std in 0-255 units
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.3231630)


@dataclass(frozen=True)
class SedConfig:
    """One SED architecture and its released test-time settings (configs/convnext{B,L}_768.yaml)."""

    clip_arch: str  # open_clip architecture of the image and text towers
    hidden_dim: int = 128  # MODEL.SEM_SEG_HEAD.HIDDEN_DIMS
    decoder_dims: tuple[int, ...] = (64, 32, 16)  # DECODER_DIMS
    decoder_guidance_dims: tuple[int, ...] = (512, 256, 128)  # DECODER_GUIDANCE_DIMS (res4, res3, res2 channels)
    decoder_guidance_proj_dims: tuple[int, ...] = (32, 16, 8)  # DECODER_GUIDANCE_PROJ_DIMS
    # Aggregator's default (80, 32, 16): SEDPredictor never passes it, so the first entry is the template count
    decoder_corr_guidance_dims: tuple[int, ...] = (80, 32, 16)
    num_heads: int = 4  # NUM_HEADS
    pooling_size: tuple[int, int] = (2, 2)  # POOLING_SIZES
    kernel_sizes: tuple[int, ...] = (9, 9, 9)  # KERNEL_SIZE of the decoder's ConvNeXt blocks
    prompt_templates: int = 80  # PROMPT_ENSEMBLE_TYPE imagenet: CLIP's 80 ImageNet templates
    clip_resolution: int = 768  # SED.clip_resolution: the tower always sees a square of this side
    min_size_test: int = 640  # INPUT.MIN_SIZE_TEST (detectron2 ResizeShortestEdge, PIL bilinear)
    max_size_test: int = 2560  # INPUT.MAX_SIZE_TEST (SED's configs/config.yaml)
    pixel_mean: tuple[float, float, float] = CLIP_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = CLIP_PIXEL_STD
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.decoder_dims) != 3 or len(self.decoder_guidance_dims) != 3 or len(self.kernel_sizes) != 3:
            raise ValueError("SED has three decoder stages: decoder_dims, decoder_guidance_dims and kernel_sizes "
                             "need three entries each")

    @classmethod
    def from_json(cls, path: str | Path) -> SedConfig:
        data = json.loads(Path(path).read_text())
        data.pop("description", None)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict:
        return asdict(self)


def sed_config_names() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def get_sed_config(name: str) -> SedConfig:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown SED architecture {name!r}; choose one of {', '.join(sed_config_names())}")
    return SedConfig.from_json(path)


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the last axis with SED's parameter names (its ConvNeXt block permutes to channels-last)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class LargeKernelConvNextBlock(nn.Module):
    """Depthwise k x k conv, LayerNorm, 4x MLP, layer scale, residual: the decoder's per-class spatial mixing."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = ChannelsLastLayerNorm(channels)
        self.pwconv1 = nn.Linear(channels, 4 * channels)
        self.pwconv2 = nn.Linear(4 * channels, channels)
        self.gamma = nn.Parameter(torch.ones(channels))  # the released decoder builds it with scale 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


def linear_attention(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     eps: float = 1e-6) -> torch.Tensor:
    """Katharopoulos et al.'s linear attention, (N, L, H, D) each: phi(q) (phi(K)^T V) / (phi(q) . sum phi(K)),
    phi = elu + 1. Values are divided by their count before the product and multiplied after (the released
    code does this against fp16 overflow; it changes rounding only)."""
    q = F.elu(queries) + 1
    k = F.elu(keys) + 1
    count = values.shape[1]
    kv = torch.einsum("nshd,nshv->nhdv", k, values / count)
    normaliser = 1.0 / (torch.einsum("nlhd,nhd->nlh", q, k.sum(dim=1)) + eps)
    return torch.einsum("nlhd,nhdv,nlh->nlhv", q, kv, normaliser) * count


class ClassAttention(nn.Module):
    """Query/key/value projections and multi-head linear attention over a sequence of classes."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(channels, channels)
        self.k = nn.Linear(channels, channels)
        self.v = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, channels = x.shape
        split = (n, length, self.heads, channels // self.heads)
        out = linear_attention(self.q(x).reshape(split), self.k(x).reshape(split), self.v(x).reshape(split))
        return out.reshape(n, length, channels)


class ClassAggregation(nn.Module):
    """Every class's map sees every other class's at the same place: the maps are average-pooled, a pre-norm
    transformer layer (linear attention across classes, then an MLP) runs per pooled position, and its output is
    upsampled (bilinear, corners aligned) and added back."""

    def __init__(self, channels: int, heads: int, pooling_size: tuple[int, int]) -> None:
        super().__init__()
        self.pooling_size = tuple(pooling_size)
        self.attention = ClassAttention(channels, heads)
        self.MLP = nn.Sequential(nn.Linear(channels, 4 * channels), nn.ReLU(), nn.Linear(4 * channels, channels))
        self.norm1 = nn.LayerNorm(channels)
        self.norm2 = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, C, H, W), one map per class of one image -> the same shape."""
        classes, channels, height, width = x.shape
        pooled = F.avg_pool2d(x, self.pooling_size)
        ph, pw = pooled.shape[-2:]
        tokens = pooled.permute(2, 3, 0, 1).reshape(ph * pw, classes, channels)
        tokens = tokens + self.attention(self.norm1(tokens))
        tokens = tokens + self.MLP(self.norm2(tokens))
        pooled = tokens.reshape(ph, pw, classes, channels).permute(2, 3, 0, 1)
        return x + F.interpolate(pooled, size=(height, width), mode="bilinear", align_corners=True)


class DoubleConv(nn.Module):
    """(3x3 conv, GroupNorm of 16-channel groups, ReLU) twice; module names as the release's ``double_conv``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(out_channels // 16, out_channels), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class DecoderStage(nn.Module):
    """One gradual-fusion stage: per-class ConvNeXt block, cross-class aggregation, 2x transposed-conv upsample,
    then a double conv over [the class's map, the image's guidance, the class's upsampled cost volume]."""

    def __init__(self, in_channels: int, out_channels: int, guidance_channels: int, heads: int,
                 pooling_size: tuple[int, int], kernel_size: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels - guidance_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels + guidance_channels, out_channels)
        self.cnext = LargeKernelConvNextBlock(in_channels, kernel_size)
        self.attention = ClassAggregation(in_channels, heads, pooling_size)

    def forward(self, x: torch.Tensor, guidance: torch.Tensor, corr_guidance: torch.Tensor,
                class_chunk: int) -> torch.Tensor:
        """x (T, C, h, w), guidance (1, Cg, 2h, 2w), corr_guidance (T, Cg, 2h, 2w) -> (T, out, 2h, 2w)."""
        x = self.attention(_chunked(self.cnext, class_chunk, x))

        def fuse(maps: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
            up = self.up(maps)
            return self.conv(torch.cat([up, guidance.expand(up.shape[0], -1, -1, -1), corr], dim=1))

        return _chunked(fuse, class_chunk, x, corr_guidance)


def _chunked(function, chunk: int, *tensors: torch.Tensor) -> torch.Tensor:
    """`function` over the leading (class) axis `chunk` rows at a time (all at once when chunk <= 0)."""
    rows = tensors[0].shape[0]
    if chunk <= 0 or rows <= chunk:
        return function(*tensors)
    return torch.cat([function(*(t[start:start + chunk] for t in tensors)) for start in range(0, rows, chunk)])


class SedAggregator(nn.Module):
    """Cost volume -> class logit maps: the released ``Aggregator`` with no text guidance (both released configs
    set TEXT_GUIDANCE_DIM 0) and the ConvNeXt (V1) decoder blocks they use."""

    def __init__(self, config: SedConfig) -> None:
        super().__init__()
        hidden, dims = config.hidden_dim, config.decoder_dims
        self.conv1 = nn.Conv2d(config.prompt_templates, hidden, kernel_size=7, padding=3)
        self.decoder_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.Conv2d(d, p, 3, padding=1), nn.ReLU())
            for d, p in zip(config.decoder_guidance_dims, config.decoder_guidance_proj_dims, strict=True)])
        self.decoder_corr_guidance_projection = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(d, p, kernel_size=2, stride=2), nn.ReLU())
            for d, p in zip(config.decoder_corr_guidance_dims, config.decoder_guidance_proj_dims, strict=True)])
        ins = (hidden, dims[0], dims[1])
        for index in range(3):
            setattr(self, f"decoder{index + 1}", DecoderStage(
                ins[index], dims[index], config.decoder_guidance_proj_dims[index], config.num_heads,
                config.pooling_size, config.kernel_sizes[index]))
        self.head0 = nn.Conv2d(hidden, 1, 3, padding=1)
        self.head1 = nn.Conv2d(dims[0], 1, 3, padding=1)
        self.head2 = nn.Conv2d(dims[1], 1, 3, padding=1)
        self.head = nn.Conv2d(dims[2], 1, 3, padding=1)

    def forward(self, dense: torch.Tensor, text: torch.Tensor, guidance: list[torch.Tensor],
                fast_top_k: int = 0, class_chunk: int = 0) -> torch.Tensor:
        """One image: dense (1, D, h, w) CLIP embeddings, text (T, P, D) per-template class embeddings,
        guidance [res4, res3, res2] (1, C_i, ...) -> (T, 8h, 8w) probabilities (sigmoid; with fast_top_k > 0
        rejected classes are 0)."""
        image = F.normalize(dense, dim=1)[0]
        text = F.normalize(text, dim=-1)
        corr = torch.einsum("chw,tpc->tphw", image, text)  # (T, P, h, w): the cost volume
        embedded = _chunked(self.conv1, class_chunk, corr)
        projected = [proj(g) for proj, g in zip(self.decoder_guidance_projection, guidance, strict=True)]
        corr_guidance = []
        for proj in self.decoder_corr_guidance_projection:
            corr = _chunked(proj, class_chunk, corr)
            corr_guidance.append(corr)
        stages = (self.decoder1, self.decoder2, self.decoder3)
        if fast_top_k <= 0:
            x = embedded
            for stage, g, cg in zip(stages, projected, corr_guidance, strict=True):
                x = stage(x, g, cg, class_chunk)
            return torch.sigmoid(_chunked(self.head, class_chunk, x)[:, 0])
        classes = embedded.shape[0]
        kept = torch.arange(classes, device=embedded.device)
        x = embedded
        for stage, gate, g, cg in zip(stages, (self.head0, self.head1, self.head2), projected, corr_guidance,
                                      strict=True):
            keep = _top_k_classes(_chunked(gate, class_chunk, x)[:, 0], fast_top_k)
            kept, x = kept[keep], x[keep]
            x = stage(x, g, cg[kept], class_chunk)
        logits = _chunked(self.head, class_chunk, x)[:, 0]
        out = torch.zeros(classes, *logits.shape[1:], device=logits.device, dtype=logits.dtype)
        out[kept] = torch.sigmoid(logits)
        return out


def _top_k_classes(maps: torch.Tensor, k: int) -> torch.Tensor:
    """(T, H, W) class maps -> (T,) bool: the classes ranked in the top k at one pixel at least."""
    classes = maps.shape[0]
    top = maps.topk(min(k, classes), dim=0).indices
    return torch.bincount(top.reshape(-1), minlength=classes) > 0


class _SedPredictor(nn.Module):
    def __init__(self, clip_model: nn.Module, config: SedConfig) -> None:
        super().__init__()
        self.clip_model = clip_model
        self.transformer = SedAggregator(config)


class _SedHead(nn.Module):
    def __init__(self, clip_model: nn.Module, config: SedConfig) -> None:
        super().__init__()
        self.predictor = _SedPredictor(clip_model, config)


class SedNetwork(nn.Module):
    """The released SED network: ``sem_seg_head.predictor.clip_model`` (open_clip CLIP) and
    ``sem_seg_head.predictor.transformer`` (the aggregator), nested as in its checkpoint."""

    def __init__(self, clip_model: nn.Module, config: SedConfig) -> None:
        super().__init__()
        visual = clip_model.visual
        if not hasattr(visual, "trunk") or not hasattr(visual.trunk, "stages"):
            raise ValueError(f"SED needs an open_clip timm ConvNeXt image tower, got {type(visual).__name__}")
        self.config = config
        self.sem_seg_head = _SedHead(clip_model, config)

    @property
    def clip_model(self) -> nn.Module:
        return self.sem_seg_head.predictor.clip_model

    @property
    def aggregator(self) -> SedAggregator:
        return self.sem_seg_head.predictor.transformer

    def image_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(B, 3, S, S) normalised -> (dense CLIP embeddings (B, D, S/32, S/32), guidance [res4, res3, res2],
        the image embedding (B, D)).

        The dense embedding is the tower's head (its norm, then its projection) applied at every position of the
        last stage's output instead of after pooling; the image embedding is CLIP's own (pool, norm, project)."""
        trunk = self.clip_model.visual.trunk
        x = trunk.stem(pixels)
        stages = []
        for stage in trunk.stages:
            x = stage(x)
            stages.append(x)
        x = trunk.norm_pre(x)
        norm, head = trunk.head.norm, self.clip_model.visual.head
        channels = (x.shape[1],)
        dense = head(F.layer_norm(x.permute(0, 2, 3, 1), channels, norm.weight, norm.bias, norm.eps))
        pooled = head(F.layer_norm(x.mean(dim=(2, 3)), channels, norm.weight, norm.bias, norm.eps))
        return dense.permute(0, 3, 1, 2), [stages[2], stages[1], stages[0]], pooled

    def forward(self, pixels: torch.Tensor, text: torch.Tensor,
                fast_top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, 3, S, S) normalised, (T, P, D) -> ((T, S/4, S/4) probabilities, dense embeddings); fast_top_k > 0
        is the released TEST.FAST_INFERENCE with TEST.TOPK = fast_top_k."""
        dense, guidance, _ = self.image_features(pixels)
        return self.aggregator(dense, text, guidance, fast_top_k=fast_top_k), dense


def build_sed(config: SedConfig, clip_builder) -> SedNetwork:
    """SED around the open_clip CLIP that `clip_builder(arch)` returns (random init; load a checkpoint after)."""
    return SedNetwork(clip_builder(config.clip_arch), config)


def checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict of a released checkpoint: detectron2 saves {"model": state_dict, ...}; a bare state
    dict is accepted too. Tensors only (no pickled code is run: weights_only)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a state dict (got {type(data).__name__})")
    return data
