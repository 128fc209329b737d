"""Train the demo CLIP (open_clip `ovseg-demo-vit`) on the synthetic world, on a CPU, in a fixed time budget.

Two losses: CLIP's image-caption contrastive loss (what makes the image-level embedding and the text tower
meaningful), and a dense loss that scores every patch embedding -- taken through the SAME dense code path the
node uses for official weights (ClipDenseEncoder.dense_features) -- against the text embeddings of the seen
classes, with the class fractions of the patch as soft targets. Held-out compositions never appear.

    python -m ovseg_ros.training.train_clip --minutes 40 --seed 0 --threads 1 --arch ovseg-demo-convvit \
        --out models/demo/ovseg-demo-clip.safetensors
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..core.clip_builders import CONV_STEMS, build_clip
from ..core.clip_dense import ClipDenseEncoder
from ..core.vocabulary import DEFAULT_TEMPLATES
from ..synth.world import STUFF, generate_scene, object_class_names, world_vocabulary

DEFAULT_ARCH = "ovseg-demo-convvit"


MAX_INSTANCES = 5


def build_pool(count: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Pre-generated training scenes at the model resolution: images, label maps, instance maps (0 = none,
    k = k-th object), the world id of each instance (-1 = none), captions."""
    vocab = {name: i for i, name in enumerate(world_vocabulary())}
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    labels = np.empty((count, size, size), dtype=np.uint8)
    instances = np.zeros((count, size, size), dtype=np.uint8)
    instance_ids = np.full((count, MAX_INSTANCES), -1, dtype=np.int64)
    captions = []
    for i in range(count):
        scene = generate_scene(seed * 1_000_003 + i, size=224, split="train", max_objects=MAX_INSTANCES)
        images[i] = cv2.resize(scene.image, (size, size), interpolation=cv2.INTER_AREA)
        labels[i] = cv2.resize(scene.labels.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        instance_map = np.zeros(scene.labels.shape, np.uint8)
        for k, (mask, name) in enumerate(zip(scene.instance_masks, scene.instance_classes, strict=True)):
            instance_map[mask] = k + 1
            instance_ids[i, k] = vocab[name]
        instances[i] = cv2.resize(instance_map, (size, size), interpolation=cv2.INTER_NEAREST)
        captions.append(scene.caption)
    return images, labels, instances, instance_ids, captions


def patch_fractions(labels: torch.Tensor, num_classes: int, patch: int) -> torch.Tensor:
    """(B, H, W) world ids -> (B, h, w, C) fraction of each class in each patch (one bincount, no one-hot)."""
    batch, height, width = labels.shape
    grid_h, grid_w = height // patch, width // patch
    rows = torch.arange(height) // patch
    cols = torch.arange(width) // patch
    cell = (rows[:, None] * grid_w + cols[None, :]).expand(batch, -1, -1)
    sample = torch.arange(batch)[:, None, None] * (grid_h * grid_w)
    index = ((sample + cell) * num_classes + labels.long()).reshape(-1)
    counts = torch.bincount(index, minlength=batch * grid_h * grid_w * num_classes)
    return counts.reshape(batch, grid_h, grid_w, num_classes).float() / float(patch * patch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=DEFAULT_ARCH,
                        help=f"open_clip architecture (conv stems: {', '.join(CONV_STEMS)}; plain: ovseg-demo-vit)")
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=24000, help="pre-generated training scenes")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dense-weight", type=float, default=1.0)
    parser.add_argument(
        "--stuff-patch-weight",
        type=float,
        default=0.3,
        help="weight of patches holding only stuff (they dominate the area)",
    )
    parser.add_argument("--object-weight", type=float, default=1.0,
                        help="weight of the object loss: each instance's mask-pooled patch embedding classified")
    parser.add_argument("--shape-weight", type=float, default=0.0,
                        help="weight of the shape loss: the object loss among same-colour classes only (hard "
                             "negatives; the demo CLIP tells colours apart but confuses shapes)")
    parser.add_argument("--object-negatives", choices=("objects", "all"), default="objects",
                        help="classes the object loss tells apart: the seen object classes, or all seen classes "
                             "(stuff included: a box prompt's label is the top-1 over the whole vocabulary)")
    parser.add_argument("--init", help="start from these weights (fine-tuning) instead of random init")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CPU matrix units)")
    parser.add_argument("--out", default="models/demo/ovseg-demo-clip.safetensors")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUT.ckpt (model, optimiser, clock, data order) written during training")
    parser.add_argument("--checkpoint-every", type=float, default=300.0, help="seconds between checkpoints")
    parser.add_argument("--eval-scenes", type=int, default=100)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    import open_clip

    model = build_clip(args.arch, Path(args.init) if args.init else None)
    tokenizer = open_clip.get_tokenizer(args.arch)
    encoder = ClipDenseEncoder(model, tokenizer, args.arch)
    model.train()
    size = encoder.native_size[0]
    patch = encoder.patch_size[0]

    vocab = world_vocabulary()
    seen = list(STUFF) + object_class_names("seen")
    seen_ids = torch.tensor([vocab.index(name) for name in seen])
    # world id -> column in the seen-class target (held-out ids never occur in training scenes)
    to_seen = torch.full((len(vocab),), -1, dtype=torch.long)
    to_seen[seen_ids] = torch.arange(len(seen))

    start = time.time()
    images, label_maps, instance_maps, instance_ids, captions = build_pool(args.pool, args.seed, size)
    objects_seen = object_class_names("seen")
    object_cols = torch.tensor([seen.index(name) for name in objects_seen])  # object columns of `seen`
    colours = [name.split()[0] for name in objects_seen]
    other_colour = torch.tensor([[a != b for b in colours] for a in colours])  # (O, O) True = different colour
    print(f"pool of {args.pool} scenes generated in {time.time() - start:.0f} s", flush=True)

    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    budget = args.minutes * 60.0
    warmup = 0.05 * budget
    t0 = time.time()
    step = 0
    seen_images = 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = out.with_suffix(".ckpt")
    rng = np.random.default_rng(args.seed)
    if args.resume:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        t0 -= state["elapsed"]  # the schedule is a function of training time, so it continues where it stopped
        step, seen_images = state["step"], state["images"]
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed {checkpoint} at {state['elapsed'] / 60:.1f} min, step {step}", flush=True)
    last_log = last_ckpt = time.time()
    while (elapsed := time.time() - t0) < budget:
        lr = args.lr * min(1.0, elapsed / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / budget)))
        for group in optimiser.param_groups:
            group["lr"] = lr
        idx = rng.integers(0, args.pool, args.batch)
        batch = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
        if rng.random() < 0.5:  # horizontal flip keeps every class name true
            batch = batch.flip(-1)
            labels = torch.from_numpy(label_maps[idx][:, :, ::-1].copy())
            instances = torch.from_numpy(instance_maps[idx][:, :, ::-1].copy())
        else:
            labels = torch.from_numpy(label_maps[idx])
            instances = torch.from_numpy(instance_maps[idx])
        template = DEFAULT_TEMPLATES[step % len(DEFAULT_TEMPLATES)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            global_emb, dense = encoder.dense_features(encoder.normalise(batch), "plain")
            text_caps = F.normalize(model.encode_text(tokenizer([captions[i] for i in idx])), dim=-1)
            class_text = F.normalize(model.encode_text(tokenizer([template.format(n) for n in seen])), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * global_emb.float() @ text_caps.float().T
        target = torch.arange(len(idx))
        loss_contrastive = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

        fractions = patch_fractions(labels, len(vocab), patch)  # (B, h, w, V)
        soft = fractions[..., seen_ids]  # (B, h, w, S)
        patch_logits = scale * dense.float() @ class_text.float().T  # (B, h, w, S)
        per_patch = -(soft * F.log_softmax(patch_logits, dim=-1)).sum(-1)
        stuff_only = fractions[..., : len(STUFF)].sum(-1) > 0.999
        weights = torch.where(stuff_only, args.stuff_patch_weight, 1.0)
        loss_dense = (per_patch * weights).sum() / weights.sum()
        # Object loss: pool each instance's patch embeddings (weighted by how much of the patch it covers) and
        # classify against the seen object classes -- what prompt recognition and tag validation rely on.
        inst_frac = patch_fractions(instances, MAX_INSTANCES + 1, patch)[..., 1:]  # (B, h, w, K)
        pooled = F.normalize(torch.einsum("bhwk,bhwd->bkd", inst_frac, dense.float()), dim=-1)
        ids = torch.from_numpy(instance_ids[idx])  # (B, K) world ids, -1 = none
        valid = (ids >= 0) & (inst_frac.sum((1, 2)) > 0)
        all_logits = scale * pooled[valid] @ class_text.float().T  # (N, S) against every seen class
        object_logits = all_logits[:, object_cols]
        object_target = (to_seen[ids[valid]].unsqueeze(1) == object_cols.unsqueeze(0)).float().argmax(1)
        if not valid.any():
            loss_object = torch.zeros(())
        elif args.object_negatives == "all":  # stuff names too: thin objects' pooled patches are mostly stuff
            loss_object = F.cross_entropy(all_logits, to_seen[ids[valid]])
        else:
            loss_object = F.cross_entropy(object_logits, object_target)
        loss_shape = torch.zeros(())
        if args.shape_weight > 0 and valid.any():  # same logits, other colours masked: only shape can tell
            same_colour = object_logits.masked_fill(other_colour[object_target], float("-inf"))
            loss_shape = F.cross_entropy(same_colour, object_target)
        loss = (loss_contrastive + args.dense_weight * loss_dense + args.object_weight * loss_object
                + args.shape_weight * loss_shape)

        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        seen_images += len(idx)
        now = time.time()
        if now - last_log > 30:
            print(
                f"{(now - t0) / 60:5.1f} min step {step} imgs {seen_images} lr {lr:.2e} "
                f"contrastive {loss_contrastive.item():.3f} dense {loss_dense.item():.3f} "
                f"object {loss_object.item():.3f} shape {loss_shape.item():.3f}",
                flush=True,
            )
            last_log = now
        if now - last_ckpt > args.checkpoint_every:
            save(model, out, args.arch)
            save_checkpoint(checkpoint, model, optimiser, now - t0, step, seen_images, rng)
            last_ckpt = now
    train_minutes = (time.time() - t0) / 60
    save(model, out, args.arch)
    print(f"trained {train_minutes:.1f} min, {step} steps, {seen_images} images; saved {out}", flush=True)

    from ..bench.accuracy import evaluate_dense

    metrics = evaluate_dense(f"{args.arch}:{out}", scenes=args.eval_scenes)
    metrics.update(
        train_minutes=round(train_minutes, 1),
        steps=step,
        images_seen=seen_images,
        arch=args.arch,
        threads=args.threads,
        seed=args.seed,
        pool=args.pool,
        batch=args.batch,
        bf16=args.bf16,
        init=args.init,
        lr=args.lr,
        shape_weight=args.shape_weight,
        object_negatives=args.object_negatives,
    )
    print(json.dumps(metrics, indent=1), flush=True)
    out.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return 0


def save(model: torch.nn.Module, path: Path, arch: str) -> None:
    """float16 safetensors: the token table dominates the size and loses nothing that matters in fp16."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"arch": arch, "format": "open_clip state_dict"})
    tmp.replace(path)


def save_checkpoint(path: Path, model: torch.nn.Module, optimiser: torch.optim.Optimizer, elapsed: float,
                    step: int, images: int, rng: np.random.Generator) -> None:
    """Everything `--resume` needs, in float32, written atomically."""
    tmp = path.with_suffix(".ckpt.tmp")
    torch.save({"model": model.state_dict(), "optimiser": optimiser.state_dict(), "elapsed": elapsed,
                "step": step, "images": images, "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
