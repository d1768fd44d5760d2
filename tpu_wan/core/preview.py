"""A PNG contact sheet of evenly spaced frames of a video, so a seed sweep can be judged at a glance.

Geometry (``contact_sheet``): tiles of ``tile_h x tile_w`` in a grid of ``min(columns, count)`` columns and as
many rows as needed, each tile followed below by a ``LABEL_HEIGHT`` strip reading ``t=<frame index>``. Tile
(row r, column c) has its top-left pixel at ``y = GAP + r * (tile_h + LABEL_HEIGHT + GAP)``,
``x = GAP + c * (tile_w + GAP)``; the rest of the sheet (gaps, border, empty cells) is ``BACKGROUND``.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from tpu_wan.core.artifacts import atomic_write

GAP = 4  # px between tiles and around the border
LABEL_HEIGHT = 16  # px; fits FONT_SCALE text (11 px tall plus baseline)
BACKGROUND = 40  # dark gray, all channels
TEXT = 230
FONT_SCALE = 0.4


def pick_frames(num_frames: int, count: int) -> list[int]:
    """``min(count, num_frames)`` evenly spaced, increasing frame indices: the first and last frame (only the
    first when count is 1) and the rest between.

    Index i of k is ``i * (num_frames - 1) / (k - 1)`` rounded half up (81 frames, 8 -> 0, 11, 23, 34, 46, 57,
    69, 80). The spacing is >= 1 because k <= num_frames, so the rounded indices are distinct.
    """
    if num_frames < 1 or count < 1:
        raise ValueError(f"expected num_frames >= 1 and count >= 1, found {num_frames} and {count}")
    k = min(count, num_frames)
    if k == 1:
        return [0]
    # Integer form of floor(i * (n - 1) / (k - 1) + 1/2): no float rounding at the .5 boundaries.
    return [(2 * i * (num_frames - 1) + k - 1) // (2 * (k - 1)) for i in range(k)]


def contact_sheet(frames: np.ndarray, count: int = 8, columns: int = 4, *, max_tile_width: int = 320
                  ) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> one uint8 RGB image [sheet_h, sheet_w, 3] of ``pick_frames(T, count)``.

    Tiles are the frames' pixels unchanged when W <= ``max_tile_width``, so the sheet is exact. Wider videos
    (Wan's 1280x720) are downscaled with cv2.INTER_AREA to ``tile_w = max_tile_width`` and
    ``tile_h = max(1, round(H * tile_w / W))``, keeping the aspect ratio. Layout: see the module docstring.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T >= 1, found {frames.dtype.name} array "
                         f"of shape {frames.shape}")
    if columns < 1 or max_tile_width < 1:
        raise ValueError(f"expected columns >= 1 and max_tile_width >= 1, found {columns} and {max_tile_width}")
    num_frames, height, width, _ = frames.shape
    indices = pick_frames(num_frames, count)
    tile_w, tile_h = width, height
    if width > max_tile_width:
        tile_w, tile_h = max_tile_width, max(1, round(height * max_tile_width / width))
    cols = min(columns, len(indices))
    rows = -(-len(indices) // cols)
    cell_h, cell_w = tile_h + LABEL_HEIGHT + GAP, tile_w + GAP
    sheet = np.full((GAP + rows * cell_h, GAP + cols * cell_w, 3), BACKGROUND, np.uint8)
    for n, t in enumerate(indices):
        y, x = GAP + (n // cols) * cell_h, GAP + (n % cols) * cell_w
        tile = frames[t]
        if (tile_w, tile_h) != (width, height):
            tile = cv2.resize(tile, (tile_w, tile_h), interpolation=cv2.INTER_AREA)
        sheet[y:y + tile_h, x:x + tile_w] = tile
        # Drawn on its own strip so text wider than a narrow tile is clipped, not spilled onto the neighbour.
        strip = np.full((LABEL_HEIGHT, tile_w, 3), BACKGROUND, np.uint8)
        cv2.putText(strip, f"t={t}", (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, FONT_SCALE,
                    (TEXT, TEXT, TEXT), 1, cv2.LINE_AA)
        sheet[y + tile_h:y + tile_h + LABEL_HEIGHT, x:x + tile_w] = strip
    return sheet


def write_preview(path: str | os.PathLike, frames: np.ndarray, count: int = 8, columns: int = 4, *,
                  max_tile_width: int = 320) -> Path:
    """Write ``contact_sheet(frames, ...)`` to ``path`` as a PNG (lossless), atomically; returns the path."""
    sheet = contact_sheet(frames, count, columns, max_tile_width=max_tile_width)
    ok, png = cv2.imencode(".png", cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))  # OpenCV stores BGR
    if not ok:
        raise OSError(f"{path}: expected cv2 to encode a PNG, found failure")
    payload = png.tobytes()
    return atomic_write(path, lambda tmp: tmp.write_bytes(payload), suffix=".png")


def preview_path(video_path: str | os.PathLike) -> Path:
    """The contact sheet's name for a video: ``<stem>.png`` beside ``<stem>.mp4``."""
    return Path(video_path).with_suffix(".png")
