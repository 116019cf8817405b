"""Any-resolution images (LLaVA-NeXT's "anyres"): tiles on a grid fitted to the image.

A tower sees fixed S x S crops. A high-resolution image is resized (aspect kept) and padded
onto the allowed tile grid (columns x rows of S x S tiles) that keeps the most of its
resolution with the least padding, cut into tiles, and joined by one global view (the whole
image resized to S x S). The tiles' feature maps are re-assembled into one map and the rows
or columns that only saw padding are removed, so a wide image gives a wide map.

    grid = best_grid((width, height), cfg.grids, S)      # (columns, rows)
    tiles, global_view = tile_image(image, grid, S)      # [cols*rows, 3, S, S], [1, 3, S, S]
    feature_map = assemble(tile_features, grid, (width, height))   # [H', W', C]
"""

from __future__ import annotations

import math

import torch


def best_grid(size: tuple[int, int], grids, tile: int) -> tuple[int, int]:
    """The (columns, rows) whose canvas keeps the most of the image's pixels after a fitting
    resize (capped at the original resolution), ties broken by the least padding."""
    width, height = size
    best, best_key = None, None
    for columns, rows in grids:
        canvas_w, canvas_h = columns * tile, rows * tile
        scale = min(canvas_w / width, canvas_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - kept
        key = (kept, -wasted)
        if best_key is None or key > best_key:
            best, best_key = (columns, rows), key
    return best


def fitted_size(size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of `size` resized to fit `canvas` with its aspect ratio kept."""
    width, height = size
    scale = min(canvas[0] / width, canvas[1] / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_tensor(image) -> torch.Tensor:
    """A PIL image -> [3, H, W] float in [0, 1]."""
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tile_image(image, grid: tuple[int, int], tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles [columns * rows, 3, tile, tile] in row-major order, the global view [1, 3, tile, tile])."""
    from PIL import Image

    columns, rows = grid
    canvas_size = (columns * tile, rows * tile)
    resized = image.convert("RGB").resize(fitted_size(image.size, canvas_size), Image.BICUBIC)
    canvas = Image.new("RGB", canvas_size, (0, 0, 0))
    canvas.paste(resized, ((canvas_size[0] - resized.size[0]) // 2, (canvas_size[1] - resized.size[1]) // 2))
    pixels = to_tensor(canvas)
    tiles = pixels.unfold(1, tile, tile).unfold(2, tile, tile)  # [3, rows, columns, tile, tile]
    tiles = tiles.permute(1, 2, 0, 3, 4).reshape(rows * columns, 3, tile, tile)
    global_view = to_tensor(image.convert("RGB").resize((tile, tile), Image.BICUBIC))[None]
    return tiles, global_view


def assemble(tile_features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Tile feature maps [columns * rows, g, g, C] (row-major) -> one map [rows * g, columns * g, C]
    with the padded border rows / columns removed (the image was centred on the canvas)."""
    columns, rows = grid
    n, g, _, channels = tile_features.shape
    if n != columns * rows:
        raise ValueError(f"{n} tile feature maps for a {columns}x{rows} grid")
    full = tile_features.reshape(rows, columns, g, g, channels).permute(0, 2, 1, 3, 4).reshape(rows * g, columns * g, channels)
    map_h, map_w = rows * g, columns * g
    content_w, content_h = fitted_size(size, (map_w, map_h))
    top, left = (map_h - content_h) // 2, (map_w - content_w) // 2
    return full[top:top + content_h, left:left + content_w]


def cap_shape(height: int, width: int, cap: int) -> tuple[int, int]:
    """The largest (h, w) with h * w <= cap and the aspect ratio of (height, width) kept."""
    if height * width <= cap:
        return height, width
    scale = math.sqrt(cap / (height * width))
    return max(1, int(height * scale)), max(1, int(width * scale))
