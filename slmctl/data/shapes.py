"""The embedded image-text default: seeded scenes of coloured shapes, with questions.

No network and no download: a scene is a pure function of (seed, split, index). It has one
to four shapes (circle, square, triangle) in six colours, of several sizes (fewer shapes, bigger
ones: a lone shape spans 28-64% of the short side, one of four 14-32%), at random
non-overlapping positions, on a varied background (flat or a two-colour gradient), at one of
several resolutions and aspect ratios (square, wide, tall), so the vision pipeline's
any-resolution tiling sees every case. Each scene comes with one question, drawn from:

    colour   "What color is the triangle?"                   -> "red"     (one shape of that kind)
    shape    "What shape is the red one?"                    -> "circle"  (one shape of that colour)
    count    "How many circles are there?"                   -> "2"       (0-4; half the time about a
             shape the scene has, so "0" is never the cheap answer)
    left     "Which is further left: the red circle or the blue square?" -> "red circle"
             (or "right"; a pair whose centres are well apart)

Answers are short strings scored by exact match; `chance()` gives the accuracy of guessing
the most frequent answer of each question kind, the baseline a trained model must beat.
The split is part of every scene's seed, so train, validation and test never share a scene.

    scenes = ShapeScenes(seed=0)
    example = scenes.example("test", 7)     # {"image": PIL.Image, "prompt": "...", "answer": "..."}
    scenes.write_jsonl("data/shapes", "train", n=2000)   # PNGs + train.jsonl {image, prompt, answer}
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (140, 60, 180), "orange": (240, 130, 20)}
SIZES = ((224, 224), (336, 336), (448, 224), (224, 448), (384, 256), (256, 384), (512, 336))  # (width, height)
KINDS = ("colour", "shape", "count", "left")
SPLITS = ("train", "validation", "test")
IMAGE_PROMPT = "<image>\n{question}"


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    x: float  # centre, pixels
    y: float
    radius: float  # half the side / the circumradius

    @property
    def name(self) -> str:
        return f"{self.color} {self.kind}"


def draw_shapes(draw, shapes: list[Shape], fill) -> None:
    """Draw each shape with the fill `fill(shape)` gives (its colour; in `layout`, its label)."""
    for s in shapes:
        r = s.radius
        if s.kind == "circle":
            draw.ellipse([s.x - r, s.y - r, s.x + r, s.y + r], fill=fill(s))
        elif s.kind == "square":
            side = r * 0.85
            draw.rectangle([s.x - side, s.y - side, s.x + side, s.y + side], fill=fill(s))
        else:
            draw.polygon([(s.x, s.y - r), (s.x - r * 0.87, s.y + r * 0.5), (s.x + r * 0.87, s.y + r * 0.5)], fill=fill(s))


class ShapeScenes:
    """Seeded scenes and questions; see the module docstring."""

    def __init__(self, seed: int = 0, max_shapes: int = 4, sizes: tuple = SIZES):
        self.seed, self.max_shapes, self.sizes = seed, max_shapes, tuple(tuple(s) for s in sizes)

    def _rng(self, split: str, index: int) -> random.Random:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return random.Random(f"shapes-{self.seed}-{split}-{index}")

    def scene(self, split: str, index: int) -> tuple[tuple[int, int], tuple, list[Shape]]:
        """((width, height), background, shapes) of one scene."""
        rng = self._rng(split, index)
        width, height = rng.choice(self.sizes)
        light = lambda: tuple(rng.randint(150, 255) for _ in range(3))
        background = ("flat", light()) if rng.random() < 0.5 else ("gradient", light(), light())
        shapes: list[Shape] = []
        target = rng.randint(1, self.max_shapes)
        for _ in range(200):  # rejection sampling of non-overlapping positions
            if len(shapes) == target:
                break
            radius = rng.uniform(0.07, 0.16) * (4 / target) ** 0.5 * min(width, height)
            x, y = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
            if all((x - s.x) ** 2 + (y - s.y) ** 2 > (radius + s.radius + 4) ** 2 for s in shapes):
                shapes.append(Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), x, y, radius))
        return (width, height), background, shapes

    def render(self, size, background, shapes: list[Shape]):
        from PIL import Image, ImageDraw

        width, height = size
        if background[0] == "flat":
            image = Image.new("RGB", (width, height), background[1])
        else:
            top, bottom = background[1], background[2]
            image = Image.new("RGB", (width, height))
            draw = ImageDraw.Draw(image)
            for row in range(height):
                t = row / max(height - 1, 1)
                draw.line([(0, row), (width, row)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
        draw_shapes(ImageDraw.Draw(image), shapes, lambda s: COLORS[s.color])
        return image

    def question(self, split: str, index: int, shapes: list[Shape]) -> tuple[str, str, str]:
        """(kind, question, answer) for a scene, drawn from the kinds its shapes allow."""
        rng = random.Random(f"shapes-question-{self.seed}-{split}-{index}")
        counts = Counter(s.kind for s in shapes)
        unique = [s for s in shapes if counts[s.kind] == 1]
        colours = Counter(s.color for s in shapes)
        lone_colour = [s for s in shapes if colours[s.color] == 1]
        pairs = [(a, b) for i, a in enumerate(shapes) for b in shapes[i + 1:]
                 if a.name != b.name and abs(a.x - b.x) > 2 * max(a.radius, b.radius)]
        kinds = ["count"] + ["colour"] * bool(unique) + ["shape"] * bool(lone_colour) + ["left"] * bool(pairs)
        kind = rng.choice(kinds)
        if kind == "colour":
            shape = rng.choice(unique)
            return kind, f"What color is the {shape.kind}?", shape.color
        if kind == "shape":
            shape = rng.choice(lone_colour)
            return kind, f"What shape is the {shape.color} one?", shape.kind
        if kind == "count":
            present, absent = sorted(counts), [k for k in SHAPES if k not in counts]
            asked = rng.choice(absent if absent and rng.random() < 0.5 else present)
            return kind, f"How many {asked}s are there?", str(counts[asked])
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        side = rng.choice(("left", "right"))
        winner = min((a, b), key=lambda s: s.x if side == "left" else -s.x)
        return kind, f"Which is further {side}: the {a.name} or the {b.name}?", winner.name

    def questions(self, split: str, n: int) -> list[dict]:
        """{"kind", "answer"} of the first n scenes, without drawing them (e.g. for `chance`)."""
        return [dict(zip(("kind", "question", "answer"), self.question(split, i, self.scene(split, i)[2]))) for i in range(n)]

    def example(self, split: str, index: int) -> dict:
        """{"image": PIL image, "prompt": "<image>\\nquestion", "answer", "kind", "id"}."""
        size, background, shapes = self.scene(split, index)
        kind, question, answer = self.question(split, index, shapes)
        return {"image": self.render(size, background, shapes), "prompt": IMAGE_PROMPT.format(question=question),
                "answer": answer, "kind": kind, "id": f"shapes-{self.seed}-{split}-{index}"}

    def examples(self, split: str, n: int) -> list[dict]:
        return [self.example(split, i) for i in range(n)]

    def write_jsonl(self, directory: str | Path, split: str, n: int) -> Path:
        """PNG files and `<split>.jsonl` rows {image (relative path), prompt, answer} in `directory`."""
        from slmctl.atomic import atomic_write_text

        directory = Path(directory)
        (directory / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            example = self.example(split, i)
            relative = f"{split}/{i:06d}.png"
            example["image"].save(directory / relative)
            rows.append({"image": relative, "prompt": example["prompt"], "answer": example["answer"], "kind": example["kind"]})
        path = directory / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return path


NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")


def caption(shapes: list[Shape]) -> str:
    """What a scene shows, for contrastive tower pretraining: how many shapes, then each
    colour-and-kind with its count, left to right ("three shapes: two red circles, a blue square")."""
    ordered = sorted(shapes, key=lambda s: s.x)
    counts = Counter(s.name for s in ordered)
    parts = [f"{NUMBERS[n]} {name}s" if n > 1 else f"{'an' if name[0] in 'aeiou' else 'a'} {name}" for name, n in counts.items()]
    total = len(shapes)
    return f"{NUMBERS[total]} shape{'s' if total != 1 else ''}: {', '.join(parts)}"


def counts(shapes: list[Shape]) -> dict[str, int]:
    """How many shapes a scene holds, of each kind (what count questions ask), and of each colour
    and kind ("red circles": which colour goes with which shape, what colour and shape questions ask)."""
    kinds, named = Counter(s.kind for s in shapes), Counter(s.name for s in shapes)
    return {"shapes": len(shapes), **{f"{kind}s": kinds[kind] for kind in SHAPES},
            **{f"{color} {kind}s": named[f"{color} {kind}"] for color in COLORS for kind in SHAPES}}


NAMED = tuple(f"{color} {kind}" for color in COLORS for kind in SHAPES)  # layout's labels 1.., in `counts`' order


def layout(size: tuple[int, int], shapes: list[Shape], grid: int, min_cover: float = 0.15) -> list[list[int]]:
    """What covers each cell of the scene squashed to grid x grid (as the tower's global view sees
    it): 1 + the shape's index in NAMED ("red circle" = 1), or 0 for background; a cell is a
    shape's when the shape covers at least `min_cover` of it (the most-covering shape wins; at 0.25
    about 3% of shapes, small triangles across cell borders, got no cell, at 0.15 one in 747)."""
    from PIL import Image, ImageDraw

    width, height = size
    masks = []
    for s in shapes:
        mask = Image.new("L", (width, height), 0)
        draw_shapes(ImageDraw.Draw(mask), [s], lambda _: 255)
        masks.append(mask.resize((grid, grid), Image.BOX))  # the mean over each cell: its coverage
    labels = [[0] * grid for _ in range(grid)]
    for row in range(grid):
        for column in range(grid):
            cover = [mask.getpixel((column, row)) / 255 for mask in masks]
            best = max(range(len(shapes)), key=cover.__getitem__, default=None)
            if best is not None and cover[best] >= min_cover:
                labels[row][column] = 1 + NAMED.index(shapes[best].name)
    return labels


class LabelledScenes:
    """(image, label) pairs of one split's scenes, rendered lazily: tower pretraining data
    (stage 0), the label being what `label(size, shapes)` says of the scene."""

    def __init__(self, seed: int, split: str, n: int, max_shapes: int = 4):
        self.scenes, self.split, self.n = ShapeScenes(seed=seed, max_shapes=max_shapes), split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple:
        if not 0 <= index < self.n:
            raise IndexError(index)
        size, background, shapes = self.scenes.scene(self.split, index)
        return self.scenes.render(size, background, shapes), self.label(size, shapes)

    def label(self, size: tuple[int, int], shapes: list[Shape]):
        raise NotImplementedError


class ShapeCaptions(LabelledScenes):
    """(image, caption): contrastive pretraining data (`vision.pretrain=contrastive`)."""

    def label(self, size, shapes: list[Shape]) -> str:
        return caption(shapes)


class ShapeCounts(LabelledScenes):
    """(image, the values of `counts`): supervised pretraining data (`vision.pretrain=counts`)."""

    def label(self, size, shapes: list[Shape]) -> list[int]:
        return list(counts(shapes).values())


class ShapeLayouts(LabelledScenes):
    """(image, (the values of `counts`, `layout` on the tower's grid x grid feature map)):
    `vision.pretrain=layout`."""

    def __init__(self, seed: int, split: str, n: int, max_shapes: int = 4, grid: int = 8):
        super().__init__(seed, split, n, max_shapes)
        self.grid = grid

    def label(self, size, shapes: list[Shape]) -> tuple[list[int], list[list[int]]]:
        return list(counts(shapes).values()), layout(size, shapes, self.grid)


def chance(examples: list[dict]) -> dict[str, float]:
    """Exact match of always answering each question kind's most frequent answer, per kind and overall."""
    by_kind: dict[str, Counter] = {}
    for e in examples:
        by_kind.setdefault(e["kind"], Counter())[e["answer"]] += 1
    result = {kind: counter.most_common(1)[0][1] / sum(counter.values()) for kind, counter in by_kind.items()}
    result["overall"] = sum(c.most_common(1)[0][1] for c in by_kind.values()) / max(len(examples), 1)
    return result
