"""Captioned synthetic shapes: the data set the bundled tiny checkpoints are trained on.

Every image holds one flat-coloured shape on a plain background, and its caption says what was drawn:

    "a red circle"
    "a small blue square at the top left"
    "a large yellow triangle on a black background"

Nothing is downloaded: images are drawn with PIL, 4x supersampled and shrunk for smooth (antialiased)
edges. Example `i` of a data set with seed `s` is drawn from a random generator seeded with (s, i), so
the same seed always gives the same images, in any order, and on any machine.

The caption grammar (every word is one token of the tiny tokenizer, see `tokenizer.py`):

    a [small | large] COLOUR SHAPE [POSITION] [on a (white | gray | black) background]

Shapes are axis-aligned (no rotation) so that a rule-based classifier (`evaluate.py`) can tell them
apart from their fill ratio alone. Some colour x shape pairs are held out of training
(`HELD_OUT`): the evaluation asks the model for them to see whether it composes words it saw apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# name -> RGB. Hues are about 60 degrees apart, so a dominant colour is never ambiguous.
COLORS = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 30),
    "green": (40, 170, 60),
    "cyan": (30, 185, 205),
    "blue": (45, 75, 220),
    "purple": (150, 55, 205),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": (16, 26), "large": (34, 46)}  # side of the shape's bounding box, pixels at 64x64
ANY_SIZE = (16, 46)
# position phrase -> (column, row) third of the canvas (0 left/top, 1 middle, 2 right/bottom)
POSITIONS = {
    "at the top left": (0, 0), "at the top": (1, 0), "at the top right": (2, 0),
    "on the left": (0, 1), "in the center": (1, 1), "on the right": (2, 1),
    "at the bottom left": (0, 2), "at the bottom": (1, 2), "at the bottom right": (2, 2),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
# Colour x shape pairs never drawn in training: a test of composition.
HELD_OUT = (("purple", "square"), ("cyan", "triangle"))

SUPERSAMPLE = 4  # draw at 4x the size, then shrink: antialiased edges


@dataclass(frozen=True)
class ShapeExample:
    """What was drawn. `box` is (left, top, right, bottom) in pixels of a 64x64 canvas."""

    color: str
    shape: str
    size: str | None        # "small", "large" or None (unsaid, any size)
    position: str | None    # a key of POSITIONS, or None (unsaid, anywhere)
    background: str         # a key of BACKGROUNDS
    box: tuple[float, float, float, float]
    caption: str


def caption_words() -> list[str]:
    """Every word that a caption (or an evaluation prompt) can contain."""
    phrases = ["a", "background", *COLORS, *SHAPES, *SIZES, *POSITIONS, *BACKGROUNDS, "on a"]
    return sorted({word for phrase in phrases for word in phrase.split()})


def sample_example(rng: random.Random, held_out=HELD_OUT) -> ShapeExample:
    """Choose what to draw and write its caption. Each optional phrase appears half the time or less."""
    while True:
        color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if (color, shape) not in held_out:
            break
    size = rng.choice(list(SIZES)) if rng.random() < 0.5 else None
    position = rng.choice(list(POSITIONS)) if rng.random() < 0.5 else None
    # 70% white and unsaid; 10% each "on a white / gray / black background"
    said = rng.choices([None, "white", "gray", "black"], weights=[7, 1, 1, 1])[0]
    background = said or "white"

    lo, hi = SIZES[size] if size else ANY_SIZE
    side = rng.uniform(lo, hi)
    centre = []
    for axis in (0, 1):  # x then y: the box stays inside the canvas, in the named third if any
        c_lo, c_hi = side / 2 + 1, 63 - side / 2
        if position is not None:
            third = POSITIONS[position][axis]
            width = (c_hi - c_lo) / 3
            c_lo, c_hi = c_lo + third * width, c_lo + (third + 1) * width
        centre.append(rng.uniform(c_lo, c_hi))
    box = (centre[0] - side / 2, centre[1] - side / 2, centre[0] + side / 2, centre[1] + side / 2)

    words = ["a"] + ([size] if size else []) + [color, shape]
    if position:
        words.append(position)
    if said:
        words += ["on a", said, "background"]
    return ShapeExample(color, shape, size, position, background, box, " ".join(words))


def draw(example: ShapeExample, rng: random.Random, resolution: int = 64) -> Image.Image:
    """Render `example` as a `resolution` x `resolution` RGB image (the box is scaled from 64x64)."""
    big = resolution * SUPERSAMPLE
    scale = big / 64
    image = Image.new("RGB", (big, big), BACKGROUNDS[example.background])
    # A little colour jitter, so the models see a colour as a region of RGB space, not one point.
    fill = tuple(int(min(255, max(0, v + rng.randint(-12, 12)))) for v in COLORS[example.color])
    x0, y0, x1, y1 = (v * scale for v in example.box)
    pen = ImageDraw.Draw(image)
    if example.shape == "circle":
        pen.ellipse((x0, y0, x1, y1), fill=fill)
    elif example.shape == "square":
        pen.rectangle((x0, y0, x1, y1), fill=fill)
    elif example.shape == "triangle":  # pointing up
        pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif example.shape == "diamond":  # a square standing on a corner
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        pen.polygon([(xm, y0), (x1, ym), (xm, y1), (x0, ym)], fill=fill)
    else:
        raise ValueError(f"Unknown shape {example.shape!r}; expected one of {SHAPES}.")
    return image.resize((resolution, resolution), Image.Resampling.BOX)


class ShapesDataset:
    """`len(ds)` captioned shape images; `ds[i]` is (uint8 image tensor (3, R, R), caption).

    `ds.example(i)` gives the full description of what was drawn (for tests and the classifier).
    """

    def __init__(self, num_images: int, seed: int = 0, resolution: int = 64, held_out=HELD_OUT):
        if num_images < 1:
            raise ValueError(f"num_images must be at least 1, found {num_images}.")
        self.num_images, self.seed, self.resolution, self.held_out = num_images, seed, resolution, tuple(held_out)

    def __len__(self) -> int:
        return self.num_images

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"minidiff-shapes/{self.seed}/{i}")  # a string seed: stable across versions

    def example(self, i: int) -> ShapeExample:
        if not 0 <= i < self.num_images:
            raise IndexError(f"Index {i} out of range for a data set of {self.num_images} images.")
        return sample_example(self._rng(i), self.held_out)

    def array(self, i: int) -> tuple[np.ndarray, str]:
        """Image i as a uint8 array (R, R, 3), and its caption."""
        rng = self._rng(i)
        example = sample_example(rng, self.held_out)
        return np.asarray(draw(example, rng, self.resolution)), example.caption

    def arrays(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, list[str]]:
        """Images start..stop-1 as uint8 (N, R, R, 3), and their captions (numpy only: safe in a forked worker)."""
        stop = self.num_images if stop is None else stop
        images, captions = zip(*(self.array(i) for i in range(start, stop)))
        return np.stack(images), list(captions)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        image, caption = self.array(i)
        return torch.from_numpy(image.copy()).permute(2, 0, 1), caption             # (R, R, 3) -> (3, R, R)

    def tensors(self, start: int = 0, stop: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Images start..stop-1 stacked: uint8 (N, 3, R, R), and their captions."""
        images, captions = self.arrays(start, stop)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions  # (N, R, R, 3) -> (N, 3, R, R)


def render_all(num_images: int, seed: int = 0, resolution: int = 64, workers: int = 1):
    """The whole data set as (uint8 (N, 3, R, R), captions), drawn by `workers` processes."""
    ds = ShapesDataset(num_images, seed, resolution)
    if workers <= 1:
        return ds.tensors()
    from concurrent.futures import ProcessPoolExecutor

    chunk = -(-num_images // workers)
    bounds = [(s, min(s + chunk, num_images)) for s in range(0, num_images, chunk)]
    with ProcessPoolExecutor(workers) as pool:  # the workers use PIL and numpy only, never torch
        parts = list(pool.map(ds.arrays, *zip(*bounds)))
    images = np.concatenate([p[0] for p in parts])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), [c for p in parts for c in p[1]]


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range every diffusers / minidiff model works in."""
    return images.float() / 127.5 - 1.0
