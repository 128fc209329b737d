"""Deterministic synthetic "colour x shape" world for training and testing the demo models.

Real open-vocabulary data cannot ship with the project, so the demo SAM/CLIP models are trained and evaluated
on procedurally generated scenes whose every pixel carries an exact label. Compositions in ``HELD_OUT`` never
appear in the training split, which lets us measure open-vocabulary generalisation honestly.

Everything is driven by a single ``np.random.default_rng(seed)`` so a seed (plus the arguments) reproduces a
scene byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (250, 135, 15),
    "yellow": (245, 225, 25),
    "green": (25, 195, 45),
    "cyan": (20, 215, 230),
    "blue": (30, 55, 235),
    "purple": (145, 35, 205),
    "pink": (250, 105, 195),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "crescent", "ring", "heart")

STUFF: tuple[str, ...] = ("grass", "water", "sky", "wall", "sand")

# A shifted diagonal plus two extras: every colour and every shape is held out at least once, 10/64 > 15 %.
HELD_OUT: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "star"),
        ("orange", "ring"),
        ("yellow", "heart"),
        ("green", "crescent"),
        ("cyan", "cross"),
        ("blue", "triangle"),
        ("purple", "square"),
        ("pink", "circle"),
        ("green", "square"),
        ("blue", "heart"),
    }
)

_SPLITS = ("all", "seen", "novel")
_SCENE_SPLITS = ("train", "eval")
_MIN_VISIBLE_FRACTION = 0.3
_PLACEMENT_TRIES = 30


def object_class_names(split: str = "all") -> list[str]:
    """Object class names ("red circle", ...) in a fixed colour-major order, filtered by split."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    names = []
    for colour in COLOURS:
        for shape in SHAPES:
            novel = (colour, shape) in HELD_OUT
            if split == "all" or (split == "novel") == novel:
                names.append(f"{colour} {shape}")
    return names


def world_vocabulary() -> list[str]:
    """Every label of the world; a label map's value indexes this list (stuff first, then objects)."""
    return list(STUFF) + object_class_names("all")


_VOCAB_INDEX: dict[str, int] = {name: i for i, name in enumerate(world_vocabulary())}
_SEEN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT
)
_NOVEL_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) in HELD_OUT
)


@dataclass
class Scene:
    """One rendered scene with exact per-pixel and per-instance ground truth."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint16, index into world_vocabulary()
    instance_masks: list[np.ndarray]  # (H, W) bool visible parts, in paint order
    instance_classes: list[str]
    boxes: np.ndarray  # (N, 4) float32 x1, y1, x2, y2 (exclusive max) of each visible mask
    caption: str
    stuff_classes: list[str]


# --------------------------------------------------------------------------------------------------- textures


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth unit-ish noise field, cheap because it is upsampled from a coarse grid."""
    ch = max(2, round(cells * h / max(h, w)))
    cw = max(2, round(cells * w / max(h, w)))
    grid = rng.standard_normal((ch, cw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean, unit-std triangular noise: ~10x cheaper than standard_normal and looks the same here."""
    n = int(np.prod(shape))
    b = np.frombuffer(rng.bytes(2 * n), np.uint8).reshape(2, n)
    return ((b[0].astype(np.float32) - b[1]) * np.float32(1.0 / 104.1)).reshape(shape)


def _strokes(rng: np.random.Generator, h: int, w: int, density: float, ksize: tuple[int, int]) -> np.ndarray:
    """Sparse +-1 seeds smeared by a line kernel: short strokes without a Python loop per stroke."""
    u = rng.random((h, w), dtype=np.float32)
    seeds = np.zeros((h, w), np.float32)
    seeds[u < density * 0.5] = -1.0
    seeds[u > 1.0 - density * 0.5] = 1.0
    kernel = np.ones(ksize, np.float32) / max(ksize)
    return cv2.filter2D(seeds, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _col(rgb: tuple[float, ...] | np.ndarray) -> np.ndarray:
    """A colour as a (3, 1, 1) float32 column; textures are planar (3, H, W) because broadcasting a (H, W)
    field over a leading channel axis is several times faster than over a trailing one."""
    return np.asarray(rgb, np.float32).reshape(3, 1, 1)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: float = 8.0) -> np.ndarray:
    return _col(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32))


def _grass(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, (85, 125, 60))
    length = max(3, min(h, w) // 40)
    strokes = np.clip(_strokes(rng, h, w, 0.16, (length, 1)) * length, -1, 1)
    return base + _lowfreq(rng, h, w, 6) * np.float32(7.0) + strokes * _col((12, 26, 10))


def _water(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, (60, 98, 145))
    period = rng.uniform(0.035, 0.06) * h
    ys = np.arange(h, dtype=np.float32)[:, None]
    xs = np.arange(w, dtype=np.float32)[None, :]
    phase = np.float32(rng.uniform(0, 6.3))
    wobble = np.float32(0.8) * np.sin(xs * np.float32(2 * np.pi / (0.6 * w)) + phase)
    ripple = np.sin(ys * np.float32(2 * np.pi / period) + wobble + np.float32(rng.uniform(0, 6.3)))
    length = max(5, w // 25)
    streaks = np.clip(_strokes(rng, h, w, 0.05, (1, length)) * length, 0, 1)
    shade = _lowfreq(rng, h, w, 5) * np.float32(5.0)
    return base + shade + ripple * _col((6, 10, 13)) + streaks * _col((35, 38, 38))


def _sky(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    top = _jitter(rng, (120, 160, 212))
    bottom = _col((192, 212, 235))
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[None, :, None]
    gradient = top + (bottom - top) * t  # (3, H, 1)
    cloud = np.clip(_lowfreq(rng, h, w, 5) - np.float32(rng.uniform(0.2, 0.9)), 0.0, 1.0) * np.float32(0.8)
    return gradient + cloud * (_col((242, 244, 247)) - gradient)


def _wall(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    tones = ((150, 148, 142), (186, 165, 135))
    brick = _jitter(rng, tones[int(rng.integers(2))])
    bh = int(rng.integers(max(6, min(h, w) // 16), max(7, min(h, w) // 9) + 1))
    bw = 2 * bh + int(rng.integers(0, bh // 2 + 1))
    mortar_w = max(1, bh // 8)
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    row = ys // bh
    xo = xs + (row % 2) * (bw // 2) + int(rng.integers(bw))
    col = xo // bw
    rows, cols = h // bh + 2, (w + 2 * bw) // bw + 2
    shade = rng.normal(0.0, 9.0, (rows, cols)).astype(np.float32)
    mortar = ((ys % bh) < mortar_w) | ((xo % bw) < mortar_w)
    return np.where(mortar, brick * np.float32(0.62), brick + shade[row, col])


def _sand(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = _jitter(rng, (196, 176, 134))
    speckle = _noise(rng, (h, w)) * np.float32(9.0)
    grains = (rng.random((h, w), dtype=np.float32) < 0.03) * np.float32(-28.0)
    return base + (speckle + grains + _lowfreq(rng, h, w, 4) * np.float32(6.0))


_TEXTURES: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "grass": _grass,
    "water": _water,
    "sky": _sky,
    "wall": _wall,
    "sand": _sand,
}


def stuff_patches_image(seed: int = 0, size: tuple[int, int] = (192, 192)) -> np.ndarray:
    """(H, W, 3) uint8: sand with a patch of grass and one of wall, each about a tenth of the frame and no
    object: what object tracking must leave alone (`track_background`)."""
    rng = np.random.default_rng(seed)
    h, w = size
    planar = _sand(rng, h, w)
    planar[:, h // 10:h * 4 // 10, w // 2:w * 9 // 10] = _grass(rng, h * 4 // 10 - h // 10, w * 9 // 10 - w // 2)
    planar[:, h * 6 // 10:h * 9 // 10, w // 6:w // 2] = _wall(rng, h * 9 // 10 - h * 6 // 10, w // 2 - w // 6)
    return np.clip(planar.transpose(1, 2, 0), 0, 255).astype(np.uint8)


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pick a 1-2 region layout; return the planar float background, its stuff labels and names, top first."""
    layout = rng.random()
    if layout < 0.5:
        names = ["sky", str(rng.choice(["grass", "water", "sand"]))]
    elif layout < 0.7:
        names = ["wall", str(rng.choice(["grass", "sand"]))]
    else:
        names = [str(rng.choice(STUFF))]
    if len(names) == 1:
        labels = np.full((h, w), _VOCAB_INDEX[names[0]], np.uint16)
        return _TEXTURES[names[0]](rng, h, w), labels, names
    xs = np.arange(w, dtype=np.float32)
    y0 = rng.uniform(0.25, 0.6) * h
    wavy = 1.0 if names[0] == "sky" else 0.25  # a wall meets the ground almost straight
    amp1, amp2 = rng.uniform(0.01, 0.05) * h * wavy, rng.uniform(0.0, 0.02) * h * wavy
    horizon = (
        y0
        + amp1 * np.sin(xs * (2 * np.pi / rng.uniform(0.5, 1.2) / w) + rng.uniform(0, 6.3))
        + amp2 * np.sin(xs * (2 * np.pi / rng.uniform(0.1, 0.3) / w) + rng.uniform(0, 6.3))
    )
    ground = np.arange(h, dtype=np.float32)[:, None] >= horizon[None, :]
    upper, lower = _TEXTURES[names[0]](rng, h, w), _TEXTURES[names[1]](rng, h, w)
    image = np.where(ground, lower, upper)
    labels = np.where(ground, _VOCAB_INDEX[names[1]], _VOCAB_INDEX[names[0]]).astype(np.uint16)
    return image, labels, names


# ---------------------------------------------------------------------------------------------------- shapes


def _polygon(points: np.ndarray, cx: float, cy: float, angle: float) -> np.ndarray:
    """Rotate unit-free local points by angle and move them to (cx, cy) as int32 pixel vertices."""
    c, s = np.cos(angle), np.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return np.round(np.stack([x, y], axis=1)).astype(np.int32)


def _star_points(r: float) -> np.ndarray:
    k = np.arange(10)
    radii = np.where(k % 2 == 0, r, 0.45 * r)
    a = k * np.pi / 5 - np.pi / 2
    return np.stack([radii * np.cos(a), radii * np.sin(a)], axis=1)


def _cross_points(r: float) -> np.ndarray:
    a = 0.32 * r
    return np.array(
        [
            (-a, -r),
            (a, -r),
            (a, -a),
            (r, -a),
            (r, a),
            (a, a),
            (a, r),
            (-a, r),
            (-a, a),
            (-r, a),
            (-r, -a),
            (-a, -a),
        ]
    )


_HEART_T = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)


def _heart_points(r: float) -> np.ndarray:
    t = _HEART_T
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    y = y + 2.5  # centre the curve's vertical extent (-12..17) on the origin
    return np.stack([x, y], axis=1) * (r / 16.5)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Rasterise one shape without anti-aliasing so the label map is exact; returns a (H, W) bool mask."""
    canvas = np.zeros((h, w), np.uint8)
    centre = (round(cx), round(cy))
    if shape == "circle":
        cv2.circle(canvas, centre, round(r), 1, -1, lineType=cv2.LINE_8)
    elif shape == "ring":
        cv2.circle(canvas, centre, round(r), 1, -1, lineType=cv2.LINE_8)
        cv2.circle(canvas, centre, round(0.55 * r), 0, -1, lineType=cv2.LINE_8)
    elif shape == "crescent":
        cv2.circle(canvas, centre, round(r), 1, -1, lineType=cv2.LINE_8)
        off = (round(cx + 0.45 * r * np.cos(angle)), round(cy + 0.45 * r * np.sin(angle)))
        cv2.circle(canvas, off, round(0.82 * r), 0, -1, lineType=cv2.LINE_8)
    else:
        if shape == "square":
            pts = np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], np.float64) * (0.78 * r)
        elif shape == "triangle":
            a = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
            pts = np.stack([np.cos(a), np.sin(a)], axis=1) * (1.1 * r) + (0.0, 0.2 * r)
        elif shape == "star":
            pts = _star_points(1.08 * r)
        elif shape == "cross":
            pts = _cross_points(r)
        elif shape == "heart":
            pts = _heart_points(r)
        else:
            raise ValueError(f"unknown shape {shape!r}")
        cv2.fillPoly(canvas, [_polygon(pts, cx, cy, angle)], 1, lineType=cv2.LINE_8)
    return canvas.view(bool)


# ---------------------------------------------------------------------------------------------------- scenes


def _pick_pair(rng: np.random.Generator, split: str) -> tuple[str, str]:
    pool = _NOVEL_PAIRS if split == "eval" and rng.random() < 0.5 else _SEEN_PAIRS
    return pool[int(rng.integers(len(pool)))]


_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "ch", "sh")) else "s")


def _caption(classes: list[str], stuff: list[str]) -> str:
    """Natural-language caption, grouping repeated classes, for caption-supervised text towers."""
    if not classes:
        return "a photo of " + " and ".join(stuff) if stuff else "a photo"
    counts: dict[str, int] = {}
    for name in classes:
        counts[name] = counts.get(name, 0) + 1
    parts = [
        f"{'an' if name[0] in 'aeiou' else 'a'} {name}" if n == 1 else f"{_NUMBERS.get(n, n)} {_plural(name)}"
        for name, n in counts.items()
    ]
    things = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    ground = {
        "grass": "on grass",
        "water": "on water",
        "sand": "on sand",
        "sky": "against the sky",
        "wall": "in front of a wall",
    }
    if not stuff:
        where = ""
    elif len(stuff) == 1:
        where = " " + ground[stuff[0]]
    elif stuff[0] == "sky":
        where = f" {ground[stuff[1]]} under the sky"
    else:
        where = f" {ground[stuff[1]]} {ground[stuff[0]]}"
    return f"a photo of {things}{where}"


def generate_scene(
    seed: int,
    size: int | tuple[int, int] = 224,
    split: str = "train",
    min_objects: int = 1,
    max_objects: int = 5,
) -> Scene:
    """Render scene number ``seed``; identical arguments always give byte-identical image and labels.

    split "train" draws only seen compositions; "eval" draws about half of its objects from HELD_OUT.
    size is an int (square) or (height, width).
    """
    if split not in _SCENE_SPLITS:
        raise ValueError(f"split must be one of {_SCENE_SPLITS}, got {split!r}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if h < 16 or w < 16:
        raise ValueError(f"size too small: {(h, w)}")
    rng = np.random.default_rng(seed)
    image, labels, stuff_names = _background(rng, h, w)

    short = min(h, w)
    n_objects = int(rng.integers(min_objects, max_objects + 1))
    full_masks: list[np.ndarray] = []
    full_areas: list[int] = []
    classes: list[str] = []
    owner = np.full((h, w), -1, np.int16)
    for _ in range(n_objects):
        colour, shape = _pick_pair(rng, split)
        radius = rng.uniform(0.08, 0.22) * short
        for attempt in range(_PLACEMENT_TRIES):
            r = radius * (1.0 - 0.5 * attempt / _PLACEMENT_TRIES)  # shrink when crowded so placement succeeds
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            mask = _shape_mask(shape, h, w, cx, cy, r, rng.uniform(0, 2 * np.pi))
            area = int(np.count_nonzero(mask))
            if area < 20:
                continue
            # A new object on top must leave every earlier one at least 30 % visible.
            covered = owner[mask]
            covered = covered[covered >= 0]
            if covered.size:
                lost = np.bincount(covered, minlength=len(full_masks))
                visible = np.bincount(owner[owner >= 0], minlength=len(full_masks)) - lost
                if np.any(visible < _MIN_VISIBLE_FRACTION * np.asarray(full_areas)):
                    continue
            owner[mask] = len(full_masks)
            full_masks.append(mask)
            full_areas.append(area)
            classes.append(f"{colour} {shape}")
            rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-18, 19, 3), 0, 255).astype(np.float32)
            image[:, mask] = rgb[:, None]
            break

    instance_masks: list[np.ndarray] = []
    boxes = np.zeros((len(classes), 4), np.float32)
    for i, name in enumerate(classes):
        visible = owner == i
        labels[visible] = _VOCAB_INDEX[name]
        ys, xs = np.nonzero(visible.any(axis=1))[0], np.nonzero(visible.any(axis=0))[0]
        boxes[i] = (xs[0], ys[0], xs[-1] + 1, ys[-1] + 1)
        instance_masks.append(visible)

    image += _noise(rng, (3, h, w)) * np.float32(3.0)
    np.clip(image, 0, 255, out=image)
    image_u8 = cv2.merge(list(image.astype(np.uint8)))  # planar -> interleaved (H, W, 3)
    present = np.bincount(labels.ravel(), minlength=len(STUFF))[: len(STUFF)]
    stuff_classes = [name for name in stuff_names if present[_VOCAB_INDEX[name]] > 0]
    return Scene(
        image=image_u8,
        labels=labels,
        instance_masks=instance_masks,
        instance_classes=classes,
        boxes=boxes,
        caption=_caption(classes, stuff_classes),
        stuff_classes=stuff_classes,
    )


def generate_scenes(seeds: Iterable[int], **kw: object) -> Iterator[Scene]:
    """Lazily render one scene per seed, with the same keyword arguments as generate_scene."""
    for seed in seeds:
        yield generate_scene(seed, **kw)  # type: ignore[arg-type]
