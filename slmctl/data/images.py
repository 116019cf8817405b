"""Image-text examples: the embedded shape scenes, or jsonl files of {image, prompt, answer}.

A jsonl row's `image` is a path relative to the jsonl file (or a list of paths, one per
`<image>` placeholder in the prompt). Files are read through `datasets`; a malformed line is
reported as file:line. Every image is opened and decoded up front: an unreadable or corrupt
image is a one-line error naming the file, or with `skip_bad` the row is skipped and counted.
Paths may not leave the jsonl file's directory (`allow_outside_root` lifts that).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slmctl.data.sources import DataError, check_jsonl, quiet_datasets
from slmctl.errors import first_line


class UnreadableImage(DataError):
    """An image file that cannot be opened or decoded (skippable with skip_bad)."""


@dataclass
class ImageExample:
    prompt: str
    answer: str
    images: list = field(default_factory=list)  # PIL images, in placeholder order
    id: str = ""
    kind: str = ""


class ShapeExamples:
    """The shape scenes of one split as a lazily rendered sequence of `ImageExample`s."""

    def __init__(self, seed: int, split: str, n: int, max_shapes: int = 4):
        from slmctl.data.shapes import ShapeScenes

        self.scenes, self.split, self.n = ShapeScenes(seed=seed, max_shapes=max_shapes), split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if not 0 <= index < self.n:
            raise IndexError(index)
        e = self.scenes.example(self.split, index)
        return ImageExample(e["prompt"], e["answer"], [e["image"]], e["id"], e["kind"])


def load_jsonl(path: str | Path, skip_bad: bool = False, allow_outside_root: bool = False,
               limit: int | None = None) -> tuple[list[ImageExample], int]:
    """(examples, number of rows skipped for unreadable images)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such image-text file: {path}")
    rows = _rows(path)
    root = path.parent.resolve()
    examples, skipped = [], 0
    for number, row in enumerate(rows, 1):
        if limit is not None and len(examples) >= limit:
            break
        where = f"{path}:{number}"
        missing = [c for c in ("image", "prompt", "answer") if c not in row]
        if missing:
            raise DataError(f"{where}: missing {', '.join(missing)} (rows need image, prompt, answer)")
        names = row["image"] if isinstance(row["image"], list) else [row["image"]]
        try:
            images = [_open(root, name, allow_outside_root, where) for name in names]
        except UnreadableImage:
            if not skip_bad:
                raise
            skipped += 1
            continue
        examples.append(ImageExample(str(row["prompt"]), str(row["answer"]), images, str(row.get("id", number)),
                                     str(row.get("kind", ""))))
    if not examples:
        raise DataError(f"{path}: no usable examples" + (f" ({skipped} skipped for unreadable images)" if skipped else ""))
    return examples, skipped


def _rows(path: Path) -> list[dict]:
    check_jsonl([str(path)])  # a malformed line is named as file:line before datasets reads the file
    datasets = quiet_datasets()
    try:
        return list(datasets.load_dataset("json", data_files=str(path), split="train"))
    except Exception:  # e.g. rows whose columns disagree in type
        raise DataError(f"{path}: could not be read as jsonl (rows need image, prompt, answer)") from None


def _open(root: Path, name: str, allow_outside_root: bool, where: str):
    from PIL import Image, UnidentifiedImageError

    file = (root / name).resolve()
    if not allow_outside_root and not file.is_relative_to(root):
        raise DataError(f"{where}: image path {name!r} leaves the data directory {root} "
                        f"(set data.allow_outside_root=true to allow it)")
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise UnreadableImage(f"{where}: image {file} cannot be read ({first_line(e)})") from None
