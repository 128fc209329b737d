"""Train the demo SAM (``ovseg_ros.core.sam_builders``) from scratch on the synthetic world.

No official SAM weights are available on our machines, so the demo ships a ~1.8 M parameter SAM trained here
on CPU within a wall-clock budget. Training mirrors SAM's recipe at toy scale: point prompts (1-3 points,
sometimes a background point) and jittered boxes, BCE + dice on the single-mask output plus the minimum loss
over the three multimask outputs, and the IoU head regressed to the true IoU of each output.

Usage::

    python -m ovseg_ros.training.train_sam --minutes 40 --seed 0 --threads 1 \
        --out models/demo/ovseg-demo-sam.safetensors

``--minutes`` covers pool generation and training; the final evaluation (200 ``split="eval"`` scenes with
seeds disjoint from training) runs after it, through ``SamPredictor`` exactly as downstream code uses it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ovseg_ros.core.sam_builders import DEMO_SAM_CONFIG, build_demo_sam
from ovseg_ros.synth import generate_scene

SCENE_SIZE = 224
# A quarter of the pool is 4:3 (like a 640x480 camera) so the model also learns SAM's bottom/right padding.
WIDE_SIZE = (168, 224)
WIDE_FRACTION = 0.25
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000_000  # far from any training seed
POINT_PROMPTS_PER_IMAGE = 3
BOX_PROMPTS_PER_IMAGE = 1


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class Pool:
    """Pre-rendered training scenes at model resolution; instance maps are PNG-compressed to save memory."""

    images: np.ndarray  # (N, S, S, 3) uint8, ResizeLongestSide output at the top-left, zeros elsewhere
    input_hw: np.ndarray  # (N, 2) size of the resized image inside the S x S canvas
    ids_png: list[bytes]  # instance id map at scene resolution: 0 = stuff, k + 1 = instance k
    counts: np.ndarray  # (N,) number of instances


def build_pool(n: int, seed: int, img_size: int, deadline: float) -> Pool:
    """Render n training scenes (fewer if the deadline passes first), resized the way SamPredictor resizes."""
    transform = ResizeLongestSide(img_size)
    rng = np.random.default_rng(seed + 17)
    wide = rng.random(n) < WIDE_FRACTION
    images = np.zeros((n, img_size, img_size, 3), np.uint8)
    input_hw = np.zeros((n, 2), np.int32)
    ids_png: list[bytes] = []
    counts = np.zeros(n, np.int32)
    for i in range(n):
        if time.monotonic() > deadline:
            log(f"pool: deadline reached after {i} scenes")
            n = i
            break
        size = WIDE_SIZE if wide[i] else SCENE_SIZE
        scene = generate_scene(TRAIN_SEED_BASE + seed * 10_000_000 + i, size=size, split="train")
        small = transform.apply_image(scene.image)
        images[i, : small.shape[0], : small.shape[1]] = small
        input_hw[i] = small.shape[:2]
        ids = np.zeros(scene.labels.shape, np.uint8)
        for k, mask in enumerate(scene.instance_masks):
            ids[mask] = k + 1
        ids_png.append(cv2.imencode(".png", ids)[1].tobytes())
        counts[i] = len(scene.instance_masks)
    return Pool(images[:n], input_hw[:n], ids_png, counts[:n])


@dataclass
class PromptGroup:
    """Prompts with the same token layout, decoded in one batched call."""

    image_index: torch.Tensor  # (P,) which image of the batch
    targets: torch.Tensor  # (P, S, S) soft masks at model resolution
    points: tuple[torch.Tensor, torch.Tensor] | None = None  # coords (P, K, 2), labels (P, K)
    boxes: torch.Tensor | None = None  # (P, 4)


def _soft_target(mask: np.ndarray, input_hw: tuple[int, int], img_size: int) -> np.ndarray:
    """Area-downsample a full-resolution mask into the padded model canvas (soft edges, exact coverage)."""
    canvas = np.zeros((img_size, img_size), np.float32)
    h, w = input_hw
    canvas[:h, :w] = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return canvas


def _negative_point(rng: np.random.Generator, mask: np.ndarray, box: np.ndarray) -> tuple[int, int]:
    """A background click, usually near the object where it is informative."""
    h, w = mask.shape
    x1, y1, x2, y2 = box
    mx, my = 0.3 * (x2 - x1) + 2, 0.3 * (y2 - y1) + 2
    for _ in range(20):
        if rng.random() < 0.75:
            x = int(rng.uniform(max(0, x1 - mx), min(w, x2 + mx)))
            y = int(rng.uniform(max(0, y1 - my), min(h, y2 + my)))
        else:
            x, y = int(rng.integers(w)), int(rng.integers(h))
        x, y = min(x, w - 1), min(y, h - 1)
        if not mask[y, x]:
            return x, y
    ys, xs = np.nonzero(~mask)
    j = int(rng.integers(len(xs)))
    return int(xs[j]), int(ys[j])


def _jitter_box(rng: np.random.Generator, box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """SAM-style box noise: each side moves by ~8 % of the box size (capped at 20 %), sometimes exact."""
    if rng.random() < 0.2:
        return box.astype(np.float64)
    x1, y1, x2, y2 = box.astype(np.float64)
    bw, bh = x2 - x1, y2 - y1
    noise = np.clip(rng.normal(0.0, 0.08, 4), -0.2, 0.2) * np.array([bw, bh, bw, bh])
    out = np.array([x1, y1, x2, y2]) + noise
    out[[0, 2]] = np.clip(out[[0, 2]], 0, hw[1])
    out[[1, 3]] = np.clip(out[[1, 3]], 0, hw[0])
    out[2] = max(out[2], out[0] + 2)
    out[3] = max(out[3], out[1] + 2)
    return out


def make_batch(
    pool: Pool, rng: np.random.Generator, batch_size: int, img_size: int
) -> tuple[torch.Tensor, torch.Tensor, list[PromptGroup]]:
    """Sample images (random horizontal flips) and prompts; return raw pixels, input sizes, prompt groups."""
    transform = ResizeLongestSide(img_size)
    images = np.zeros((batch_size, img_size, img_size, 3), np.uint8)
    input_hw = np.zeros((batch_size, 2), np.int64)
    groups: dict[str, dict[str, list]] = {}

    def add(key: str, b: int, target: np.ndarray, **prompt: np.ndarray) -> None:
        g = groups.setdefault(key, {"index": [], "target": [], "coords": [], "labels": [], "boxes": []})
        g["index"].append(b)
        g["target"].append(target)
        for name, value in prompt.items():
            g[name].append(value)

    for b in range(batch_size):
        i = int(rng.integers(len(pool.counts)))
        h, w = (int(v) for v in pool.input_hw[i])
        ids = cv2.imdecode(np.frombuffer(pool.ids_png[i], np.uint8), cv2.IMREAD_UNCHANGED)
        image = pool.images[i]
        if rng.random() < 0.5:
            image = image.copy()
            image[:h, :w] = image[:h, :w][:, ::-1]
            ids = np.ascontiguousarray(ids[:, ::-1])
        images[b] = image
        input_hw[b] = (h, w)
        full_hw = ids.shape
        n = int(pool.counts[i])
        for p in range(POINT_PROMPTS_PER_IMAGE + BOX_PROMPTS_PER_IMAGE):
            mask = ids == int(rng.integers(n)) + 1
            ys, xs = np.nonzero(mask)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            target = _soft_target(mask, (h, w), img_size)
            if p >= POINT_PROMPTS_PER_IMAGE:
                jittered = transform.apply_boxes(_jitter_box(rng, box, full_hw)[None], full_hw)[0]
                add("box", b, target, boxes=jittered.astype(np.float32))
                continue
            u = rng.random()
            n_pos, n_neg = (1, 0) if u < 0.6 else (2, 0) if u < 0.7 else (1, 1) if u < 0.85 else (2, 1)
            picks = rng.integers(len(xs), size=n_pos)
            pts = [(int(xs[j]), int(ys[j])) for j in picks]
            pts += [_negative_point(rng, mask, box) for _ in range(n_neg)]
            coords = transform.apply_coords(np.array(pts, np.float64), full_hw).astype(np.float32)
            labels = np.array([1] * n_pos + [0] * n_neg, np.float32)
            add(f"points{n_pos + n_neg}", b, target, coords=coords, labels=labels)

    out: list[PromptGroup] = []
    for key in sorted(groups):
        g = groups[key]
        group = PromptGroup(
            image_index=torch.tensor(g["index"], dtype=torch.long),
            targets=torch.from_numpy(np.stack(g["target"])),
        )
        if key == "box":
            group.boxes = torch.from_numpy(np.stack(g["boxes"]))
        else:
            group.points = (torch.from_numpy(np.stack(g["coords"])), torch.from_numpy(np.stack(g["labels"])))
        out.append(group)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return pixels, torch.from_numpy(input_hw), out


# ----------------------------------------------------------------------------------------------------- model


def preprocess(sam: Sam, pixels: torch.Tensor, input_hw: torch.Tensor) -> torch.Tensor:
    """Sam.preprocess for a batch of differently sized inputs: normalise, then zero the padding."""
    x = (pixels - sam.pixel_mean) / sam.pixel_std
    size = x.shape[-1]
    rows = torch.arange(size)[None, :, None] < input_hw[:, 0, None, None]
    cols = torch.arange(size)[None, None, :] < input_hw[:, 1, None, None]
    return x * (rows & cols)[:, None].to(x.dtype)


def decode(
    sam: Sam,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskDecoder.predict_masks for prompts from many images at once.

    segment_anything's decoder repeats ONE image embedding for all prompts, so a batch of images would need a
    Python loop per image; this is the same computation with the embedding picked per prompt (verified against
    predict_masks by ``check_decode``). Returns all 1 + num_multimask_outputs masks and IoU predictions.
    """
    dec = sam.mask_decoder
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
    src = image_embeddings[image_index] + dense
    pos_src = sam.prompt_encoder.get_dense_pe().expand(src.shape[0], -1, -1, -1)
    b, c, h, w = src.shape
    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + dec.num_mask_tokens, :]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, dec.iou_prediction_head(iou_token_out)


@torch.no_grad()
def check_decode(sam: Sam) -> None:
    """Fail fast if the batched decoder ever diverges from segment_anything's own predict_masks."""
    was_training = sam.training
    sam.eval()
    emb = torch.randn(2, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    coords = torch.rand(3, 2, 2) * sam.image_encoder.img_size
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0]])
    sparse, dense = sam.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    index = torch.tensor([1, 0, 1])
    masks, iou = decode(sam, emb, index, sparse, dense)
    for p in range(3):
        ref_m, ref_i = sam.mask_decoder.predict_masks(
            emb[index[p] : index[p] + 1],
            sam.prompt_encoder.get_dense_pe(),
            sparse[p : p + 1],
            dense[p : p + 1],
        )
        torch.testing.assert_close(masks[p : p + 1], ref_m, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(iou[p : p + 1], ref_i, rtol=1e-4, atol=1e-4)
    sam.train(was_training)


def group_loss(
    sam: Sam, embeddings: torch.Tensor, group: PromptGroup, img_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask loss (single-mask output + best multimask output) and IoU-head loss, summed over the group."""
    sparse, dense = sam.prompt_encoder(points=group.points, boxes=group.boxes, masks=None)
    low_res, iou_pred = decode(sam, embeddings, group.image_index, sparse, dense)
    # Upsample as Sam.postprocess_masks does, so the loss sees the boundaries that inference will produce.
    logits = F.interpolate(low_res.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    target = group.targets[:, None].expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=(2, 3))
    prob = logits.sigmoid()
    inter = (prob * target).sum(dim=(2, 3))
    dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1.0)
    per_output = bce + dice  # (P, 4)
    mask_loss = per_output[:, 0] + per_output[:, 1:].min(dim=1).values
    with torch.no_grad():
        hard, truth = logits > 0, target > 0.5
        true_iou = (hard & truth).sum(dim=(2, 3)) / (hard | truth).sum(dim=(2, 3)).clamp(min=1)
    iou_loss = F.mse_loss(iou_pred.float(), true_iou.float(), reduction="none").sum(dim=1)
    return mask_loss.sum(), iou_loss.sum(), true_iou[:, 0].sum()


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warmup then cosine decay to 2 % of the peak, as a function of the budget used."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    t = min(1.0, (progress - warmup) / max(1e-9, 1.0 - warmup))
    return peak * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * t)))


def make_optimizer(sam: Sam, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with no decay on norms, biases and embeddings (1-D parameters and positional tables)."""
    decay, no_decay = [], []
    for name, param in sam.named_parameters():
        skip = param.ndim < 2 or "pos" in name or name.endswith(("_token.weight", "_tokens.weight"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


# ------------------------------------------------------------------------------------------------ evaluation


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return float(np.count_nonzero(a & b) / union) if union else 1.0


def _centre_point(mask: np.ndarray) -> tuple[int, int]:
    """The interior pixel farthest from the mask boundary (image borders count as boundary)."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


@torch.no_grad()
def evaluate(
    sam: Sam, n_scenes: int = 200, size: int | tuple[int, int] = SCENE_SIZE, seed: int = 0
) -> dict[str, float]:
    """Mean instance IoU at full scene resolution via SamPredictor (ResizeLongestSide + postprocess_masks).

    Reports a random interior point, the centre-most point and the tight box, each with the single-mask
    output, plus the random point with the multimask output of highest predicted IoU.
    """
    sam.eval()
    predictor = SamPredictor(sam)
    rng = np.random.default_rng(seed + 99)
    scores: dict[str, list[float]] = {"point": [], "centre_point": [], "box": [], "point_multimask": []}
    for i in range(n_scenes):
        scene = generate_scene(EVAL_SEED_BASE + i, size=size, split="eval")
        predictor.set_image(scene.image)
        for mask, box in zip(scene.instance_masks, scene.boxes, strict=True):
            ys, xs = np.nonzero(mask)
            j = int(rng.integers(len(xs)))
            one = np.array([1])
            for key, pt in (("point", (xs[j], ys[j])), ("centre_point", _centre_point(mask))):
                pred, _, _ = predictor.predict(np.array([pt], np.float64), one, multimask_output=False)
                scores[key].append(_iou(pred[0], mask))
            pred, quality, _ = predictor.predict(np.array([(xs[j], ys[j])], np.float64), one)
            scores["point_multimask"].append(_iou(pred[int(np.argmax(quality))], mask))
            pred, _, _ = predictor.predict(box=box, multimask_output=False)
            scores["box"].append(_iou(pred[0], mask))
    result = {key: float(np.mean(v)) for key, v in scores.items()}
    result["instances"] = float(len(scores["box"]))
    return result


# -------------------------------------------------------------------------------------------------- training


def save_weights(sam: Sam, path: Path, metadata: dict[str, str]) -> None:
    """Write float32 safetensors atomically, so a crash never leaves a truncated model file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().float().contiguous() for k, v in sam.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_state(path: Path, sam: Sam, opt: torch.optim.Optimizer, extra: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": sam.state_dict(), "optimizer": opt.state_dict(), "extra": json.dumps(extra)}, tmp)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--minutes", type=float, default=40.0, help="wall-clock budget: pool generation + training"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("models/demo/ovseg-demo-sam.safetensors"))
    p.add_argument("--pool", type=int, default=24000, help="pre-generated training scenes")
    p.add_argument("--pool-minutes", type=float, default=4.0, help="cap on pool generation time")
    p.add_argument("--batch", type=int, default=32, help="images per step (4 prompts each)")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the budget")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bfloat16 autocast")
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--resume", action="store_true", help="continue from <out>.train-state.pt")
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--eval-only", action="store_true", help="evaluate --out and exit")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    cv2.setNumThreads(0 if args.threads == 1 else args.threads)
    if args.eval_only:
        sam = build_demo_sam(args.out)
        log(f"eval {args.out}: {evaluate(sam, args.eval_scenes, seed=args.seed)}")
        return

    start = time.monotonic()
    budget_s = args.minutes * 60.0
    img_size = int(DEMO_SAM_CONFIG["img_size"])
    torch.manual_seed(args.seed)
    sam = build_demo_sam()
    check_decode(sam)
    sam.train()
    opt = make_optimizer(sam, args.lr, args.weight_decay)
    rng = np.random.default_rng(args.seed)
    state_path = args.out.with_name(args.out.name + ".train-state.pt")
    step, trained_s, prompts_seen = 0, 0.0, 0
    train_budget: float | None = None
    if args.resume:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        extra = json.loads(state["extra"])
        step, trained_s, prompts_seen = extra["step"], extra["trained_s"], extra["prompts_seen"]
        train_budget = extra["train_budget"]
        rng.bit_generator.state = extra["rng"]
        torch.set_rng_state(torch.tensor(extra["torch_rng"], dtype=torch.uint8))
        log(f"resumed at step {step}, {trained_s / 60:.1f} min trained")

    pool_deadline = start + min(args.pool_minutes * 60.0, 0.25 * budget_s)
    pool = build_pool(args.pool, args.seed, img_size, pool_deadline)
    pool_s = time.monotonic() - start
    log(f"pool: {len(pool.counts)} scenes in {pool_s:.0f} s ({pool.images.nbytes / 1e9:.2f} GB of pixels)")
    if train_budget is None:  # the LR schedule spans what the pool left of the budget
        train_budget = max(1.0, budget_s - pool_s)
    loop_start = time.monotonic() - trained_s
    last_log = last_ckpt = time.monotonic()
    sums, steps_since_log = np.zeros(4), 0
    while True:
        trained_s = time.monotonic() - loop_start
        progress = trained_s / train_budget
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, input_hw, groups = make_batch(pool, rng, args.batch, img_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            embeddings = sam.image_encoder(preprocess(sam, pixels, input_hw))
            totals = [group_loss(sam, embeddings, g, img_size) for g in groups]
        n_prompts = sum(len(g.image_index) for g in groups)
        mask_loss = sum(t[0] for t in totals) / n_prompts
        iou_loss = sum(t[1] for t in totals) / n_prompts
        loss = mask_loss + iou_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sam.parameters(), 1.0)
        opt.step()
        step += 1
        steps_since_log += 1
        prompts_seen += n_prompts
        train_iou = float(sum(t[2] for t in totals)) / n_prompts
        sums += (loss.item(), mask_loss.item(), iou_loss.item(), train_iou)
        if time.monotonic() - last_log >= 30.0:
            avg = sums / steps_since_log
            log(
                f"step {step} {trained_s / 60:5.1f}/{train_budget / 60:.1f} min lr {lr:.2e} "
                f"loss {avg[0]:.4f} (mask {avg[1]:.4f}, iou-head {avg[2]:.4f}) train IoU {avg[3]:.3f} "
                f"{steps_since_log * args.batch / (time.monotonic() - last_log):.1f} img/s"
            )
            sums[:], steps_since_log = 0, 0
            last_log = time.monotonic()
        if time.monotonic() - last_ckpt >= args.ckpt_minutes * 60.0:
            extra = {
                "step": step,
                "trained_s": time.monotonic() - loop_start,
                "train_budget": train_budget,
                "prompts_seen": prompts_seen,
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state().tolist(),
            }
            save_state(state_path, sam, opt, extra)
            last_ckpt = time.monotonic()
            log(f"checkpoint: {state_path} (step {step})")

    total_s = time.monotonic() - start
    images_seen = step * args.batch
    log(
        f"done: {step} steps, {images_seen} images, {prompts_seen} prompts; training loop "
        f"{trained_s / 60:.1f} min (all runs), this process {total_s / 60:.1f} min wall"
    )
    sam.eval()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "config": json.dumps(DEMO_SAM_CONFIG),
        "command": f"python -m ovseg_ros.training.train_sam --minutes {args.minutes:g} --seed {args.seed} "
        f"--threads {args.threads} --out {args.out}",
        "steps": str(step),
        "images_seen": str(images_seen),
        "pool_scenes": str(len(pool.counts)),
        "license": "Apache-2.0",
    }
    save_weights(sam, args.out, metadata)
    log(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")

    reloaded = build_demo_sam(args.out)  # evaluate what was written, through the public loader
    t0 = time.monotonic()
    square = evaluate(reloaded, args.eval_scenes, seed=args.seed)
    log(
        f"eval 224x224 ({args.eval_scenes} scenes, {square['instances']:.0f} instances, "
        f"{time.monotonic() - t0:.0f} s): "
        + ", ".join(f"{k} IoU {v:.3f}" for k, v in square.items() if k != "instances")
    )
    wide = evaluate(reloaded, max(1, args.eval_scenes // 4), size=(480, 640), seed=args.seed)
    log(
        f"eval 480x640 ({max(1, args.eval_scenes // 4)} scenes): "
        + ", ".join(f"{k} IoU {v:.3f}" for k, v in wide.items() if k != "instances")
    )
    summary = {
        "steps": step,
        "images_seen": images_seen,
        "prompts_seen": prompts_seen,
        "pool_scenes": len(pool.counts),
        "wall_minutes": total_s / 60,
        "train_minutes": trained_s / 60,
        "eval_224": square,
        "eval_480x640": wide,
    }
    log("summary " + json.dumps(summary))
    if state_path.exists():
        state_path.unlink()  # the final weights supersede the resumable state


if __name__ == "__main__":
    main()
