"""Does an image show the scene it was asked for? The rule-based judge of `scenes.py` images (the second
edition of `evaluate.py`, which stays as it is for the current checkpoints).

Backgrounds have no chroma (max - min of R, G, B is 0 on white, gray, black, gray stripes and gray
gradients) and objects are saturated, so, as in `evaluate.py`:

1. objects = the 8-connected components of pixels with chroma > COLOURED (tiny ones are ignored; the
   number of the others is the count); an edge pixel is a blend of the object and a gray, so its chroma
   over the object's own gives how much of the pixel the object covers (`coverage`), and the mask is
   coverage >= 0.5, as in `scenes.render` (MASK_AT);
2. colour: the circular mean hue of the fully covered pixels, snapped to the palette;
3. shape, from four numbers of the coverage (ranges measured on 420 scenes at 64 and 128 px):
   - solidity = area / area of the convex hull: star 0.55-0.65, heart 0.78-0.86, the others 0.87-1;
   - notch = how far the top edge at the middle column lies below the highest top on both sides, over
     the height: a heart's V notch 0.12-0.35, the other shapes <= 0;
   - skewness of the mass along y: a heart (pointing down) +0.44 to +0.47, a triangle (pointing up) -0.57
     (2 sqrt(2) / 5, as in evaluate.py), the others about 0; a triangle is told by its skew alone, whatever
     its fill (blur rounds its tips, which raises the fill towards a circle's);
   - fill = area / (width x height) of the box: square 1, circle pi/4, triangle and diamond 1/2; the box's
     sides are where the object's mass puts its edges (`_soft_extent`), so blurring a straight edge (every
     decoder blurs) moves neither the box nor the fill; blur does shave tips, which shrinks the box a little
     and raises the fill of triangles, diamonds and stars. After a Gaussian blur of 0.5 px every scene is
     judged right, and of 0.75 px every scene without a star (a star's thin points blur into its hull,
     which raises its solidity, and its box shrinks below the size split);
4. size word from the longer side of the box (small <= 20, large >= 24 units of a 64x64 canvas), the
   position word from the third that holds the box centre, relations from the two boxes.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np
import torch

from .scenes import CANVAS, COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, ScenesDataset, render
from .scenes import true_relations as relations  # what holds of a relative to b: "left of", ..., from their boxes

COLOURED = 0.15        # chroma in [0, 1] above which a pixel is (partly) object; jittered fills: 0.4-0.9
MIN_AREA = 20.0        # components smaller than this (pixels of a 64x64 image) are specks, not objects
SIZE_SPLIT = (SIZES["small"][1] + SIZES["large"][0]) / 2     # 22 canvas units
# A rendered mask is coverage >= 8/16 (16 subpixels per pixel); rounding the image to uint8 can move a pixel's
# measured coverage by ~0.005 either way, so the judge's mask threshold sits between 7/16 and 8/16.
MASK_AT = 15 / 32
SOLID_STAR, NOTCH_HEART, SKEW_HEART, FILL_SQUARE, FILL_CIRCLE, SKEW_TRIANGLE = 0.72, 0.06, 0.2, 0.9, 0.64, -0.28


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees of RGB values in [0, 1]: (..., 3) -> (...)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    top, d = rgb.max(-1), np.maximum(rgb.max(-1) - rgb.min(-1), 1e-9)
    h = np.where(top == r, ((g - b) / d) % 6, np.where(top == g, (b - r) / d + 2, (r - g) / d + 4))
    return 60.0 * h % 360


PALETTE_HUES = {name: float(_hue(np.array(rgb, np.float64) / 255)) for name, rgb in COLORS.items()}


@dataclass
class JudgedObject:
    """One object as the judge sees it. `box` = (left, top, right, bottom) in units of a 64x64 canvas."""

    color: str
    shape: str
    size: str
    position: str
    box: tuple[float, float, float, float]
    mask: np.ndarray           # bool (H, W): coverage >= 1/2 (MASK_AT)
    area: float                # pixels of a 64x64 image
    fill: float
    solidity: float
    notch: float
    skew: float


@dataclass
class Judgement:
    objects: list[JudgedObject]   # the largest max_objects objects, largest first
    count: int                    # every object that is not a speck
    relations: list[str]          # what holds of objects[0] relative to objects[1] ([] with one object)


def to_uint8(image) -> np.ndarray:
    """A PIL image, uint8 array (H, W, 3), or tensor (3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"A tensor image must be (3, H, W) in [-1, 1], found shape {tuple(image.shape)}; "
                             f"judge one image at a time.")
        image = ((image.detach().float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)  # (H, W, 3)
        return image.to(torch.uint8).numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] < 3 or array.dtype != np.uint8:
        raise ValueError(f"Expected an RGB image, uint8 (H, W, 3), found {array.dtype} {array.shape}; "
                         f"convert floats in [-1, 1] with a (3, H, W) tensor instead.")
    return array[..., :3]


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected regions of a bool (H, W) mask by flood fill: labels int (H, W) (0 = none), and their number."""
    H, W = mask.shape
    labels = np.zeros((H, W), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < H and 0 <= nx < W and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = n
                        stack.append((ny, nx))
    return labels, n


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool (H, W) mask by one pixel in all 8 directions."""
    p = np.pad(mask, 1)
    return np.any([p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3)], axis=0)


def hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of a bool (H, W) mask's pixels (as unit squares), by the monotone chain."""
    rows = np.nonzero(mask.any(1))[0]
    points = set()
    for y in rows:  # only the first and last pixel of each row can be on the hull
        xs = np.nonzero(mask[y])[0]
        points |= {(xs[0], y), (xs[0], y + 1), (xs[-1] + 1, y), (xs[-1] + 1, y + 1)}
    pts = sorted(points)

    def half(seq):
        chain = []
        for p in seq:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    xs, ys = np.array(hull, dtype=np.float64).T
    return float(abs(np.dot(xs, np.roll(ys, -1)) - np.dot(ys, np.roll(xs, -1))) / 2)  # the shoelace formula


def _soft_extent(profile: np.ndarray) -> tuple[float, float]:
    """Start and end (pixels) of an object along one axis, from its largest coverage in each row or column.

    The object covers the profile's mass: a pixel m inside it (coverage >= 0.5) has, to its left, as many
    pixels' worth of object as the object reaches left of m, so the start is m - (mass left of m) and the end
    m + (mass from m on). On a sharp straight edge this is the partly covered pixel's share (a first pixel i
    with coverage c starts the object at i + 1 - c); on a straight edge blurred over a pixel or two (as every
    decoder blurs) it is still the edge, where the first pixel above 0 would put it a pixel or two out. At a
    tip (a triangle's apex, a star's points) several pixels are partly covered, so the mass puts the edge a
    little inside the tip: up to about a pixel at 64 px."""
    # never empty: coverage is chroma over the object's 75th-percentile chroma, so its strongest pixels are 1
    inside = np.nonzero(profile >= 0.5)[0]
    m = int((inside[0] + inside[-1] + 1) // 2)
    return m - float(profile[:m].sum()), m + float(profile[m:].sum())


def _notch(mask: np.ndarray, x0: float, x1: float) -> float:
    """How far the top edge at the box's middle column lies below the highest top on BOTH sides (away from
    the middle), over the height: a heart's V notch > 0; a circle, triangle, diamond or star's top <= 0."""
    cols = np.nonzero(mask.any(0))[0]
    rows = np.nonzero(mask.any(1))[0]
    top = {x: np.argmax(mask[:, x]) for x in cols}                     # first covered row of each column
    mid, quarter = (x0 + x1) / 2, (x1 - x0) / 4
    centre = [top[x] for x in cols if abs(x + 0.5 - mid) <= 1.0]
    left = [top[x] for x in cols if x + 0.5 < mid - quarter / 2]
    right = [top[x] for x in cols if x + 0.5 > mid + quarter / 2]
    if not (centre and left and right):
        return 0.0
    return float((min(centre) - max(min(left), min(right))) / (rows[-1] - rows[0] + 1))


def _classify_shape(fill: float, solidity: float, notch: float, skew: float) -> str:
    if solidity < SOLID_STAR:
        return "star"
    if notch > NOTCH_HEART and skew > SKEW_HEART:      # a notch on top, and the mass high (it points down)
        return "heart"
    if skew < SKEW_TRIANGLE:                           # the mass low: it points up
        return "triangle"
    if fill > FILL_SQUARE:
        return "square"
    return "circle" if fill > FILL_CIRCLE else "diamond"


def _analyse(rgb: np.ndarray, chroma: np.ndarray, component: np.ndarray, others: np.ndarray) -> JudgedObject:
    H, W = chroma.shape
    per_unit = CANVAS / W                                                # canvas units per pixel
    # 1. coverage of each pixel: its chroma over a fully covered pixel's (edge pixels are gray blends)
    full = np.percentile(chroma[component], 75)
    near = _dilate(component) & ~others
    coverage = np.where(near, np.clip(chroma / max(full, 1e-6), 0.0, 1.0), 0.0)   # (H, W) in [0, 1]
    mask = coverage >= MASK_AT
    area = coverage.sum()
    x0, x1 = _soft_extent(coverage.max(0))                               # from the columns' largest coverage
    y0, y1 = _soft_extent(coverage.max(1))                               # from the rows'
    # 2. shape numbers
    fill = float(area / ((x1 - x0) * (y1 - y0)))
    solidity = float(mask.sum() / hull_area(mask))
    rows = coverage.sum(1) / area                                        # (H,) the mass over rows
    y = np.arange(H, dtype=np.float64)
    mean_y = (rows * y).sum()
    var_y = (rows * (y - mean_y) ** 2).sum()
    skew = float((rows * (y - mean_y) ** 3).sum() / max(var_y, 1e-6) ** 1.5)
    notch = _notch(mask, x0, x1)
    # 3. colour: the circular mean hue of the fully covered pixels, snapped to the palette
    angles = np.deg2rad(_hue(rgb[coverage > 0.8]))
    mean_hue = np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    color = min(PALETTE_HUES, key=lambda c: min(abs(mean_hue - PALETTE_HUES[c]), 360 - abs(mean_hue - PALETTE_HUES[c])))
    # 4. size and position on the 64x64 canvas
    box = (x0 * per_unit, y0 * per_unit, x1 * per_unit, y1 * per_unit)
    side = max(box[2] - box[0], box[3] - box[1])
    cell = tuple(min(2, int((a + b) / 2 // (CANVAS / 3))) for a, b in ((box[0], box[2]), (box[1], box[3])))
    position = next(p for p, c in POSITIONS.items() if c == cell)
    return JudgedObject(color, _classify_shape(fill, solidity, notch, skew), "small" if side < SIZE_SPLIT else "large",
                        position, box, mask, float(area * per_unit ** 2), fill, solidity, notch, skew)


def judge(image, max_objects: int = 2) -> Judgement:
    """Find and describe the objects in one image (PIL, uint8 (H, W, 3), or a (3, H, W) tensor in [-1, 1])."""
    rgb = to_uint8(image).astype(np.float32) / 255.0                     # (H, W, 3)
    H, W, _ = rgb.shape
    chroma = rgb.max(-1) - rgb.min(-1)                                   # (H, W); 0 on the backgrounds
    labels, n = label_components(chroma > COLOURED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]            # (n,) pixels per component
    keep = [k + 1 for k in np.argsort(-sizes, kind="stable") if sizes[k] * (CANVAS / W) * (CANVAS / H) >= MIN_AREA]
    objects = []
    for k in keep[:max_objects]:
        objects.append(_analyse(rgb, chroma, labels == k, (labels > 0) & (labels != k)))
    return Judgement(objects, len(keep), relations(*objects[:2]) if len(objects) >= 2 else [])


def mask_iou(mask: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two bool (H, W) masks (1.0 when both are empty)."""
    if mask.shape != target.shape:
        raise ValueError(f"Masks must have the same shape, found {mask.shape} and {target.shape}; resize one first.")
    union = np.logical_or(mask, target).sum()
    return float(np.logical_and(mask, target).sum() / union) if union else 1.0


# --- scoring an image against what was asked ----------------------------------------------------------
@dataclass
class Wanted:
    """One object as asked for; None = not asked."""

    color: str
    shape: str
    size: str | None = None
    position: str | None = None


def parse_caption(text: str) -> tuple[list[Wanted], str | None]:
    """A scenes caption -> the objects it asks for and the relation of the first to the second (or None)."""
    words = text.strip().split(" on a ")[0].split() if text.endswith(" background") else text.strip().split()
    phrases, relation, current = [], None, []
    i = 0
    while i < len(words):
        two = " ".join(words[i:i + 2])
        if words[i] == "and" or words[i] in RELATIONS or two in RELATIONS:
            relation = None if words[i] == "and" else (two if two in RELATIONS else words[i])
            phrases.append(current)
            current, i = [], i + (2 if two in RELATIONS else 1)
            continue
        current.append(words[i])
        i += 1
    phrases.append(current)
    wanted = []
    for phrase in phrases:
        rest = " ".join(phrase[1:] if phrase[:1] == ["a"] else phrase)
        size = next((s for s in SIZES if rest.startswith(s + " ")), None)
        rest = rest[len(size) + 1:] if size else rest
        parts = rest.split(" ", 2)
        if len(parts) < 2 or parts[0] not in COLORS or parts[1] not in SHAPES:
            raise ValueError(f"Cannot read {' '.join(phrase)!r} in caption {text!r}: expected 'a [small | large] "
                             f"COLOUR SHAPE [POSITION]' with a colour of {tuple(COLORS)} and a shape of {SHAPES}.")
        position = parts[2] if len(parts) == 3 else None
        if position is not None and position not in POSITIONS:
            raise ValueError(f"Unknown position {position!r} in caption {text!r}: expected one of {tuple(POSITIONS)}.")
        wanted.append(Wanted(parts[0], parts[1], size, position))
    return wanted, relation


def score(image, target, said_only: bool = True) -> dict[str, bool]:
    """Is each asked-for attribute right? `image` is an image or a `Judgement`; `target` a caption or a
    `scenes.Scene` (said_only=False checks every attribute of a Scene, said or not, and every relation).
    Judged objects are matched to the asked ones in the order that gets the most attributes right.
    Keys: color, shape, size, position (of every object), objects (colour and shape of every object),
    count, relation, all."""
    if isinstance(target, str):
        wanted, relation = parse_caption(target)
    else:
        wanted = [Wanted(o.color, o.shape, o.size if o.say_size or not said_only else None,
                         o.position if o.say_position or not said_only else None) for o in target.objects]
        relation = target.relation
    judgement = image if isinstance(image, Judgement) else judge(image)
    seen = judgement.objects + [None] * (len(wanted) - len(judgement.objects))

    def right(w: Wanted, o: JudgedObject | None) -> dict[str, bool]:
        if o is None:
            return {"color": False, "shape": False, "size": False, "position": False}
        return {"color": o.color == w.color, "shape": o.shape == w.shape,
                "size": w.size is None or o.size == w.size, "position": w.position is None or o.position == w.position}

    order = max(permutations(seen, len(wanted)), key=lambda p: sum(sum(right(w, o).values()) for w, o in zip(wanted, p)))
    per_object = [right(w, o) for w, o in zip(wanted, order)]
    result = {key: all(r[key] for r in per_object) for key in ("color", "shape", "size", "position")}
    result["objects"] = result["color"] and result["shape"]            # every object's colour and shape
    result["count"] = judgement.count == len(wanted)
    if len(wanted) == 2 and None not in order:
        judged = relations(*order)
        result["relation"] = relation is None or relation in judged
        if not said_only and not isinstance(target, str):                  # every relation that holds
            result["relation"] &= judged == relations(*target.objects)
    else:
        result["relation"] = relation is None
    result["all"] = all(result.values())
    return result


def nearest_object(objects: list[JudgedObject], box) -> JudgedObject | None:
    """The judged object whose box is closest to `box` (sum of the four edges' distances), None if there is none:
    how a drawn object is matched to what the judge saw."""
    return min(objects, default=None, key=lambda o: sum(abs(a - b) for a, b in zip(o.box, box)))


def validate_judge(num_scenes: int = 300, seed: int = 12345, size: int = 64) -> dict:
    """Accuracy of the judge on scenes of every shape (held-out ones included): the share of scenes with each
    attribute right, and the IoU of judged vs rendered masks."""
    ds = ScenesDataset(num_scenes, seed, size, shapes=SHAPES, held_out_pairs=())
    right: dict[str, int] = {}
    ious = []
    for i in range(num_scenes):
        scene = ds.scene(i)
        drawn = render(scene, size)
        judgement = judge(drawn["image"])
        for key, ok in score(judgement, scene, said_only=False).items():
            right[key] = right.get(key, 0) + ok
        for obj, mask in zip(scene.objects, drawn["masks"]):
            match = nearest_object(judgement.objects, obj.box)
            ious.append(mask_iou(match.mask, mask))
    return {"scenes": num_scenes, "resolution": size, **{k: v / num_scenes for k, v in right.items()},
            "iou_min": float(np.min(ious)), "iou_mean": float(np.mean(ious))}
