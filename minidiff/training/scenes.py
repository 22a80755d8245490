"""Captioned synthetic scenes, second edition: one or two shapes, a relation, textured backgrounds, and
the conditions (masks, edges, depth) and edit pairs that the later lessons train on.

    "a red circle"
    "a small blue square at the top left and a yellow star"
    "a red circle left of a large green triangle on a striped background"

Like `shapes.py` (the first edition's data), nothing is downloaded: a `Scene` is a plain
description, drawn with PIL at 4x the size and shrunk (antialiased edges). Scene `i` of a data set with
seed `s` comes from a random generator seeded with (s, i): the same on any machine, in any order.

The caption grammar (every word is one token of the tiny tokenizer, `caption_words()`):

    OBJECT [(and | left of | right of | above | below) OBJECT] [on a BACKGROUND background]
    OBJECT = a [small | large] COLOUR SHAPE [POSITION]

Rules that keep every scene readable by the rule-based judge (`judge.py`):
- boxes are in units of a 64x64 canvas at any `size`; each object's size word is true of its box
  (small: side 14-20, large: 24-30, never in between), its box centre keeps 2 units away from the
  lines between the thirds that name positions, and two boxes are 3 units or more apart along any axis
  on which they are apart, and overlap by 3 or more on any axis on which they overlap;
- backgrounds have no chroma (white, gray, black, gray stripes, a gray gradient), objects are saturated.
Depth follows MiDaS / DPT: larger = nearer. The ground runs from 0.1 (top row, far) to 0.7 (bottom, near);
each object is a flat upright card standing on the ground at its box's bottom edge, GROUND_LIFT nearer
than that ground row, so it is nearer than all the ground behind it.
Stars and hearts, and the colour x shape pairs of HELD_OUT_PAIRS, are never in the base distribution;
`random_scene(rng, shapes=SHAPES, held_out_pairs=(), pairs=[("purple", "star")])` draws them on request.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image, ImageDraw

from .shapes import BACKGROUNDS as PLAIN_BACKGROUNDS, COLORS, POSITIONS, SUPERSAMPLE

SHAPES = ("circle", "square", "triangle", "diamond", "star", "heart")
HELD_OUT_SHAPES = ("star", "heart")
BASE_SHAPES = tuple(s for s in SHAPES if s not in HELD_OUT_SHAPES)
HELD_OUT_PAIRS = (("purple", "square"), ("cyan", "triangle"))  # as shapes.HELD_OUT: composition tests
SIZES = {"small": (14.0, 20.0), "large": (24.0, 30.0)}  # side of the box, units of a 64x64 canvas
BACKGROUNDS = (*PLAIN_BACKGROUNDS, "striped", "gradient")
RELATIONS = ("left of", "right of", "above", "below")
CANVAS = 64.0   # scene coordinates: a 64x64 canvas, whatever the rendered size
MARGIN = 1.0    # between a box and the canvas edge
BAND = 2.0      # box centres keep this far from the lines between thirds
SEP = 3.0       # along each axis two boxes are apart by >= SEP or overlap by >= SEP
GROUND_NEAR, GROUND_FAR, GROUND_LIFT = 0.7, 0.1, 0.2
EDIT_KINDS = ("color", "shape", "position")
MOVES = {"to the left": (-1, 0), "to the right": (1, 0), "up": (0, -1), "down": (0, 1)}


@dataclass(frozen=True)
class SceneObject:
    """One shape. `box` = (left, top, right, bottom) on the 64x64 canvas; `rgb` its (jittered) fill."""

    color: str
    shape: str
    size: str                                    # "small" or "large": always true of the box
    box: tuple[float, float, float, float]
    rgb: tuple[int, int, int]
    say_size: bool = False                       # is the size word in the caption?
    say_position: bool = False                   # is the position phrase in the caption?

    @property
    def cell(self) -> tuple[int, int]:
        """(column, row) third of the canvas that holds the box centre."""
        x0, y0, x1, y1 = self.box
        return tuple(min(2, int((a + b) / 2 // (CANVAS / 3))) for a, b in ((x0, x1), (y0, y1)))

    @property
    def position(self) -> str:
        return next(p for p, c in POSITIONS.items() if c == self.cell)

    @property
    def depth(self) -> float:
        """Nearness of the card (larger = nearer): the ground's at its bottom edge, plus GROUND_LIFT."""
        return ground_depth(self.box[3] / CANVAS) + GROUND_LIFT


@dataclass(frozen=True)
class Scene:
    """What is drawn. `relation` is the said relation of objects[0] to objects[1] (None: "and");
    `texture` holds the background's numbers: plain (gray,), striped (period, phase, angle, gray, gray),
    gradient (angle, gray at start, gray at end); angles in degrees, lengths in canvas units."""

    objects: tuple[SceneObject, ...]
    background: str
    texture: tuple[float, ...]
    say_background: bool = False
    relation: str | None = None


def caption_words() -> list[str]:
    """Every word that a caption or an edit instruction can contain."""
    phrases = ["a and on background", *COLORS, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS, *RELATIONS,
               "make the turn into move", *MOVES]
    return sorted({word for phrase in phrases for word in phrase.split()})


def ground_depth(y: np.ndarray | float) -> np.ndarray | float:
    """Nearness of the ground at height y in [0, 1] (0 top = far, 1 bottom = near)."""
    return GROUND_FAR + (GROUND_NEAR - GROUND_FAR) * y


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations of a to b that hold: its box is wholly left of / right of / above / below b's."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    held = (ax1 < bx0, bx1 < ax0, ay1 < by0, by1 < ay0)
    return [r for r, h in zip(RELATIONS, held) if h]


def _well_apart(a: SceneObject, b: SceneObject) -> bool:
    """Apart along some axis, and no axis within SEP of touching (so the judge never has to guess)."""
    gaps = [max(b.box[i] - a.box[i + 2], a.box[i] - b.box[i + 2]) for i in (0, 1)]  # > 0: apart on that axis
    return max(gaps) >= SEP and all(abs(g) >= SEP for g in gaps)


def _centre_range(side: float, third: int) -> tuple[float, float]:
    """Where a box centre may lie along one axis: inside the canvas and inside its third, with margins."""
    lo = max(side / 2 + MARGIN, third * CANVAS / 3 + (BAND if third else 0))
    hi = min(CANVAS - side / 2 - MARGIN, (third + 1) * CANVAS / 3 - (BAND if third < 2 else 0))
    return lo, hi


def _jitter(rng: random.Random, color: str) -> tuple[int, int, int]:
    # the models see a colour as a small region of RGB space, not one point (as shapes.py)
    return tuple(int(min(255, max(0, v + rng.randint(-12, 12)))) for v in COLORS[color])


def _place(rng: random.Random, color: str, shape: str, size: str, cell: tuple[int, int]) -> SceneObject | None:
    side = rng.uniform(*SIZES[size])
    ranges = [_centre_range(side, third) for third in cell]
    if any(lo > hi for lo, hi in ranges):
        return None                                                   # this size does not fit in this third
    cx, cy = (rng.uniform(lo, hi) for lo, hi in ranges)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    return SceneObject(color, shape, size, box, _jitter(rng, color), rng.random() < 0.5, rng.random() < 0.3)


def _check_names(shapes, pairs) -> None:
    for name in shapes:
        if name not in SHAPES:
            raise ValueError(f"Unknown shape {name!r}: expected names from {SHAPES}. Check the spelling.")
    for color, shape in pairs:
        if color not in COLORS or shape not in SHAPES:
            raise ValueError(f"Unknown colour x shape pair ({color!r}, {shape!r}): colours are {tuple(COLORS)}, "
                             f"shapes {SHAPES}.")


def _check_size(size) -> None:
    if not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int of at least 32 (pixels per side), found {size!r}; "
                         f"the data set is drawn at 64 or 128.")


def random_scene(rng: random.Random, shapes=BASE_SHAPES, held_out_pairs=HELD_OUT_PAIRS, max_objects: int = 2,
                 pairs=None, backgrounds=BACKGROUNDS) -> Scene:
    """A random scene of 1..max_objects objects of `shapes`, never a pair in `held_out_pairs`.
    `pairs` = [(colour, shape), ...] (1 or 2 of them) asks for exactly those objects, held out or not."""
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2, found {max_objects!r}: scenes hold one or two objects.")
    if pairs is not None and (len(pairs) not in (1, 2) or len(set(pairs)) != len(pairs)):
        raise ValueError(f"pairs must list 1 or 2 different (colour, shape) pairs, found {list(pairs)}.")
    if not set(backgrounds) <= set(BACKGROUNDS) or not backgrounds:
        raise ValueError(f"backgrounds must be names from {BACKGROUNDS}, found {tuple(backgrounds)}.")
    _check_names(shapes, pairs or ())
    allowed = [(c, s) for c in COLORS for s in shapes if (c, s) not in held_out_pairs]
    if not allowed and pairs is None:
        raise ValueError(f"No colour x shape pair is left to draw with shapes={tuple(shapes)} and "
                         f"held_out_pairs={tuple(held_out_pairs)}: allow more shapes.")
    while True:  # rejection sampling: usually a few tries, when the second object does not fit
        want = list(pairs) if pairs else [rng.choice(allowed) for _ in range(rng.randint(1, max_objects))]
        if len(want) == 2 and want[0] == want[1]:
            continue                                                  # two identical objects: ambiguous
        objects: list[SceneObject] = []
        for color, shape in want:
            for _ in range(50):
                cell = (rng.randrange(3), rng.randrange(3))
                obj = _place(rng, color, shape, rng.choice(list(SIZES)), cell)
                if obj is not None and all(_well_apart(obj, o) for o in objects):
                    objects.append(obj)
                    break
        if len(objects) == len(want):
            break
    relation = None
    if len(objects) == 2 and rng.random() < 0.5:  # a said relation replaces the position phrases
        relation = rng.choice(true_relations(*objects))
        objects = [replace(o, say_position=False) for o in objects]
    background = rng.choices(backgrounds, weights=[4 if b == "white" else 1.5 for b in backgrounds])[0]
    say = background != "white" or rng.random() < 0.2
    return Scene(tuple(objects), background, _random_texture(rng, background), say, relation)


def _random_texture(rng: random.Random, background: str) -> tuple[float, ...]:
    if background in PLAIN_BACKGROUNDS:
        return (float(PLAIN_BACKGROUNDS[background][0]),)
    angle = float(rng.choice((0, 45, 90, 135)))
    if background == "striped":
        period = rng.uniform(6, 12)
        return (period, rng.uniform(0, period), angle, rng.uniform(205, 245), rng.uniform(120, 175))
    ends = [rng.uniform(200, 255), rng.uniform(30, 110)]
    rng.shuffle(ends)
    return (angle, *ends)


# --- captions -------------------------------------------------------------------------------------
def describe(obj: SceneObject) -> str:
    words = ["a"] + ([obj.size] if obj.say_size else []) + [obj.color, obj.shape]
    return " ".join(words + ([obj.position] if obj.say_position else []))


def caption(scene: Scene) -> str:
    """The scene's caption: its objects, the said relation (or "and"), the said background."""
    text = describe(scene.objects[0])
    if len(scene.objects) == 2:
        text += f" {scene.relation or 'and'} {describe(scene.objects[1])}"
    return text + (f" on a {scene.background} background" if scene.say_background else "")


# --- drawing --------------------------------------------------------------------------------------
def _outline(shape: str) -> list[list[tuple[float, float]]]:
    """The shape as polygons / ellipses in the unit box (x right, y down), filling the box exactly."""
    if shape == "triangle":
        return [[(0.5, 0), (1, 1), (0, 1)]]
    if shape == "diamond":
        return [[(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]]
    if shape == "star":  # five points, inner radius 0.45 of the outer, stretched to fill the box
        pts = [(r * math.sin(k * math.pi / 5), -r * math.cos(k * math.pi / 5))
               for k, r in zip(range(10), [1.0, 0.45] * 5)]
        xs, ys = zip(*pts)
        return [[((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in pts]]
    if shape == "heart":  # two round lobes, a V notch between them, and a point at the bottom
        return [[(0, 0.22), (0.44, 0.22), (0.5, 0.37), (0.56, 0.22), (1, 0.22), (0.5, 1)]]
    return []


def object_coverage(obj: SceneObject, size: int) -> np.ndarray:
    """How much of each supersampled pixel the object covers: float (S*size, S*size), 0 or 1."""
    big = size * SUPERSAMPLE
    s = big / CANVAS
    x0, y0, x1, y1 = (v * s for v in obj.box)
    w, h = x1 - x0, y1 - y0
    layer = Image.new("L", (big, big), 0)
    pen = ImageDraw.Draw(layer)
    if obj.shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=255)
    elif obj.shape == "square":
        pen.rectangle((x0, y0, x1, y1), fill=255)
    elif obj.shape == "heart":  # the lobes: circles of radius 0.22 at (0.22, 0.22) and (0.78, 0.22)
        for left in (0.0, 0.56):
            pen.ellipse((x0 + left * w, y0, x0 + (left + 0.44) * w, y0 + 0.44 * h), fill=255)
    elif obj.shape not in SHAPES:
        raise ValueError(f"Unknown shape {obj.shape!r}: expected one of {SHAPES}.")
    for polygon in _outline(obj.shape):
        pen.polygon([(x0 + u * w, y0 + v * h) for u, v in polygon], fill=255)
    return np.asarray(layer, dtype=np.float32) / 255.0


def _background(scene: Scene, big: int) -> np.ndarray:
    """The background's gray level at each supersampled pixel: float (big, big)."""
    u = (np.arange(big) + 0.5) * CANVAS / big                         # pixel centres in canvas units
    x, y = np.meshgrid(u, u)                                          # (big, big) each
    if scene.background in PLAIN_BACKGROUNDS:
        return np.full((big, big), scene.texture[0], dtype=np.float32)
    if scene.background == "striped":
        period, phase, angle, g1, g2 = scene.texture
        t = math.radians(angle)
        along = x * math.cos(t) + y * math.sin(t) + phase
        return np.where((along // (period / 2)) % 2 == 0, g1, g2).astype(np.float32)
    if scene.background == "gradient":
        angle, g1, g2 = scene.texture
        t = math.radians(angle)
        along = x * math.cos(t) + y * math.sin(t)
        along = (along - along.min()) / (along.max() - along.min())
        return (g1 + (g2 - g1) * along).astype(np.float32)
    raise ValueError(f"Unknown background {scene.background!r}: expected one of {BACKGROUNDS}.")


def _shrink(big: np.ndarray, size: int) -> np.ndarray:
    """Mean over each SxS block: (S*size, S*size, ...) -> (size, size, ...)."""
    S = SUPERSAMPLE
    return big.reshape(size, S, size, S, *big.shape[2:]).mean(axis=(1, 3))


def edges_from_masks(masks: np.ndarray, width: int = 1) -> np.ndarray:
    """Object outlines: mask pixels within `width` pixels (4-neighbour steps) of the outside. (N, H, W) -> (H, W)."""
    inner = masks.copy()                                              # (N, H, W)
    for _ in range(width):
        padded = np.pad(inner, ((0, 0), (1, 1), (1, 1)))              # outside the image counts as outside
        inner = (padded[:, 1:-1, 1:-1] & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1]
                 & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:])
    return (masks & ~inner).any(axis=0)


def render(scene: Scene, size: int = 64) -> dict:
    """Draw a scene. Returns image uint8 (size, size, 3), masks bool (N, size, size) (an object covers at
    least half of the pixel), edges bool (size, size) (outlines, 1 px per 64 px of size), depth float32
    (size, size) in [0, 1] (larger = nearer), coverage float32 (N, size, size)."""
    _check_size(size)
    big = size * SUPERSAMPLE
    image = np.repeat(_background(scene, big)[..., None], 3, axis=-1)     # (big, big, 3) gray
    coverages = []
    for obj in scene.objects:
        cover = object_coverage(obj, size)                                # (big, big) 0 or 1
        image = image * (1 - cover[..., None]) + np.array(obj.rgb, np.float32) * cover[..., None]
        coverages.append(_shrink(cover, size))                            # (size, size) in [0, 1]
    coverage = np.stack(coverages).astype(np.float32)                     # (N, size, size)
    masks = coverage >= 0.5
    rows = ground_depth((np.arange(size, dtype=np.float32) + 0.5) / size)  # (size,) far -> near
    depth = np.repeat(rows[:, None], size, axis=1)                         # (size, size) the ground
    for obj, cover in zip(scene.objects, coverage):
        depth = depth * (1 - cover) + obj.depth * cover                     # the cards, antialiased
    return {"image": np.round(_shrink(image, size)).astype(np.uint8), "masks": masks,
            "edges": edges_from_masks(masks, max(1, size // 64)), "depth": depth.astype(np.float32),
            "coverage": coverage}


# --- edit pairs -----------------------------------------------------------------------------------
def _name(scene: Scene, k: int) -> str:
    """How an instruction names object k: by shape, and by colour too when the other has that shape."""
    obj = scene.objects[k]
    twin = any(o.shape == obj.shape for j, o in enumerate(scene.objects) if j != k)
    return f"the {obj.color} {obj.shape}" if twin else f"the {obj.shape}"


def edit_pair(scene: Scene, rng: random.Random, kinds=EDIT_KINDS, shapes=BASE_SHAPES,
              held_out_pairs=HELD_OUT_PAIRS) -> tuple[Scene, str]:
    """The same scene with one attribute of one object changed, and the instruction that asks for it:
    "make the circle blue", "turn the square into a circle", "move the red circle to the left"."""
    if not kinds or not set(kinds) <= set(EDIT_KINDS):
        raise ValueError(f"kinds must be a non-empty subset of {EDIT_KINDS}, found {tuple(kinds)}.")
    _check_names(shapes, ())
    options = []  # every possible edit: (kind, object index, new value)
    for k, obj in enumerate(scene.objects):
        if "color" in kinds:
            options += [("color", k, c) for c in COLORS if c != obj.color]
        if "shape" in kinds:
            options += [("shape", k, s) for s in shapes if s != obj.shape]
        if "position" in kinds:
            options += [("position", k, m) for m in MOVES]
    rng.shuffle(options)
    for kind, k, value in options:
        obj, others = scene.objects[k], [o for j, o in enumerate(scene.objects) if j != k]
        if kind == "color":
            new, instruction = replace(obj, color=value, rgb=_jitter(rng, value)), f"make {_name(scene, k)} {value}"
        elif kind == "shape":
            new, instruction = replace(obj, shape=value), f"turn {_name(scene, k)} into a {value}"
        else:
            new, instruction = _move(obj, MOVES[value], rng), f"move {_name(scene, k)} {value}"
        if new is None or (new.color, new.shape) in held_out_pairs or \
                any((o.color, o.shape) == (new.color, new.shape) or not _well_apart(o, new) for o in others):
            continue
        objects = tuple(new if j == k else o for j, o in enumerate(scene.objects))
        after = replace(scene, objects=objects)
        if after.relation and after.relation not in true_relations(*objects):
            after = replace(after, relation=true_relations(*objects)[0])   # keep the caption true
        return after, instruction
    raise ValueError(f"No edit of kinds {tuple(kinds)} fits this scene ({caption(scene)!r}); allow more kinds.")


def _move(obj: SceneObject, step: tuple[int, int], rng: random.Random) -> SceneObject | None:
    """The object moved into the neighbouring third in direction `step`, the other axis unchanged."""
    col, row = obj.cell[0] + step[0], obj.cell[1] + step[1]
    if not (0 <= col <= 2 and 0 <= row <= 2):
        return None
    axis = 0 if step[0] else 1
    side = obj.box[2 + axis] - obj.box[axis]
    lo, hi = _centre_range(side, (col, row)[axis])
    if lo > hi:
        return None
    shift = rng.uniform(lo, hi) - (obj.box[axis] + obj.box[2 + axis]) / 2
    box = [v + shift if i % 2 == axis else v for i, v in enumerate(obj.box)]
    return replace(obj, box=tuple(box))


# --- the data set ---------------------------------------------------------------------------------
class ScenesDataset(torch.utils.data.Dataset):
    """`ds[i]` = (image float (3, size, size) in [-1, 1], caption), and with conditions=True also a dict
    masks bool (2, size, size) (a second all-False mask when there is one object), edges and depth float
    (1, size, size). `ds.scene(i)`, `ds.render(i)` and `ds.edit(i)` give the description, the numpy
    arrays, and an edit pair (scene, scene after, instruction)."""

    def __init__(self, n: int, seed: int = 0, size: int = 64, shapes=BASE_SHAPES, held_out_pairs=HELD_OUT_PAIRS,
                 conditions: bool = False):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of scenes) must be an int of at least 1, found {n!r}.")
        _check_size(size)
        _check_names(shapes, held_out_pairs)
        self.n, self.seed, self.size, self.conditions = n, seed, size, conditions
        self.shapes, self.held_out_pairs = tuple(shapes), tuple(held_out_pairs)

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int, what: str = "scene") -> random.Random:
        if not 0 <= i < self.n:
            raise IndexError(f"Index {i} out of range for a data set of {self.n} scenes.")
        return random.Random(f"minidiff-scenes/{self.seed}/{i}/{what}")  # a string seed: stable across versions

    def scene(self, i: int) -> Scene:
        return random_scene(self._rng(i), self.shapes, self.held_out_pairs)

    def render(self, i: int) -> dict:
        return render(self.scene(i), self.size)

    def edit(self, i: int) -> tuple[Scene, Scene, str]:
        scene = self.scene(i)
        return (scene, *edit_pair(scene, self._rng(i, "edit"), shapes=self.shapes, held_out_pairs=self.held_out_pairs))

    def __getitem__(self, i: int):
        scene = self.scene(i)
        drawn = render(scene, self.size)
        image = torch.from_numpy(drawn["image"]).permute(2, 0, 1).float() / 127.5 - 1.0   # (H, W, 3) -> (3, H, W)
        if not self.conditions:
            return image, caption(scene)
        masks = np.zeros((2, self.size, self.size), dtype=bool)
        masks[: len(drawn["masks"])] = drawn["masks"]
        conditions = {"masks": torch.from_numpy(masks),
                      "edges": torch.from_numpy(drawn["edges"]).float()[None],      # (H, W) -> (1, H, W)
                      "depth": torch.from_numpy(drawn["depth"])[None]}
        return image, caption(scene), conditions

    def arrays(self, start: int, stop: int, masks: bool = False
               ) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], np.ndarray]:
        """Images uint8 (stop - start, size, size, 3) and captions of scenes start..stop-1 (PIL and numpy only);
        with masks=True also each scene's objects' masks together, bool (stop - start, size, size)."""
        scenes = [self.scene(i) for i in range(start, stop)]
        drawn = [render(s, self.size) for s in scenes]
        images, captions = np.stack([d["image"] for d in drawn]), [caption(s) for s in scenes]
        if not masks:
            return images, captions
        return images, captions, np.stack([d["masks"].any(axis=0) for d in drawn])


def render_scenes(num_images: int, seed: int = 0, size: int = 64, workers: int = 1, masks: bool = False):
    """The base data set as (uint8 (N, 3, size, size), captions), drawn by `workers` processes; with masks=True
    also the union of each scene's object masks, bool (N, 1, size, size) (what a mask ControlNet reads)."""
    ds = ScenesDataset(num_images, seed, size)
    bounds = [(s, min(s + -(-num_images // max(1, workers)), num_images))
              for s in range(0, num_images, -(-num_images // max(1, workers)))]
    if workers <= 1:
        parts = [ds.arrays(*b, masks) for b in bounds]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:  # the workers use PIL and numpy only, never torch
            parts = list(pool.map(ds.arrays, *zip(*bounds), [masks] * len(bounds)))
    images = np.concatenate([p[0] for p in parts])                         # (N, size, size, 3)
    out = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [c for p in parts for c in p[1]]
    if not masks:
        return out
    return out + (torch.from_numpy(np.concatenate([p[2] for p in parts]))[:, None],)   # (N, 1, size, size)
