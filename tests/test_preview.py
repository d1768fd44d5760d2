"""Contact sheets of a video's frames (tpu_wan/core/preview.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tpu_wan.core import preview


def _indexed_frames(t=81, h=24, w=40) -> np.ndarray:
    """uint8 frames whose pixels encode where they come from: R = frame index, G = 8 * row, B = 4 * column."""
    frames = np.empty((t, h, w, 3), np.uint8)
    frames[..., 0] = np.arange(t)[:, None, None]
    frames[..., 1] = 8 * np.arange(h)[None, :, None]
    frames[..., 2] = 4 * np.arange(w)[None, None, :]
    return frames


def _tile(sheet, n, cols, tile_h, tile_w):
    """Tile n of the sheet, located from the geometry in preview's module docstring."""
    y = preview.GAP + (n // cols) * (tile_h + preview.LABEL_HEIGHT + preview.GAP)
    x = preview.GAP + (n % cols) * (tile_w + preview.GAP)
    return sheet[y:y + tile_h, x:x + tile_w], sheet[y + tile_h:y + tile_h + preview.LABEL_HEIGHT, x:x + tile_w]


@pytest.mark.parametrize("num_frames, count, expected", [
    (81, 8, [0, 11, 23, 34, 46, 57, 69, 80]),  # i * 80 / 7: 0, 11.43, 22.86, 34.29, 45.71, 57.14, 68.57, 80
    (5, 8, [0, 1, 2, 3, 4]),
    (1, 8, [0]),
    (2, 8, [0, 1]),
    (2, 1, [0]),
    (10, 4, [0, 3, 6, 9]),
    (4, 3, [0, 2, 3]),  # i * 3 / 2 = 1.5 rounds half up
    (81, 2, [0, 80]),
])
def test_pick_frames(num_frames, count, expected):
    assert preview.pick_frames(num_frames, count) == expected


def test_pick_frames_always_spans_distinct_and_increasing():
    for num_frames in range(1, 90):
        for count in range(1, num_frames + 3):
            picked = preview.pick_frames(num_frames, count)
            assert len(picked) == min(count, num_frames)
            assert picked[0] == 0
            assert picked[-1] == (num_frames - 1 if count > 1 else 0)
            assert all(a < b for a, b in zip(picked, picked[1:]))


def test_sheet_written_and_read_back_holds_the_exact_frames(tmp_path):
    frames = _indexed_frames()
    path = preview.write_preview(tmp_path / "seed_0.png", frames)
    assert path == tmp_path / "seed_0.png"
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    sheet = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    # 8 tiles of 24x40 in 4 columns: 2 rows of (24 + 16 + 4) px plus the top border; 4 columns of 44 px plus 4.
    assert sheet.shape == (4 + 2 * 44, 4 + 4 * 44, 3)
    labels = []
    for n, t in enumerate([0, 11, 23, 34, 46, 57, 69, 80]):
        tile, label = _tile(sheet, n, 4, 24, 40)
        np.testing.assert_array_equal(tile, frames[t])
        assert (label != preview.BACKGROUND).any()  # text was drawn
        labels.append(label.tobytes())
    assert len(set(labels)) == 8  # each strip reads a different index
    # Gaps and border are plain background: first and last columns/rows, and the gap between tiles 0 and 1.
    for strip in (sheet[:4], sheet[-4:], sheet[:, :4], sheet[:, -4:], sheet[:, 44:48]):
        assert (strip == preview.BACKGROUND).all()


def test_grid_for_fewer_frames_than_columns_times_rows():
    frames = _indexed_frames(t=5)
    sheet = preview.contact_sheet(frames, count=8, columns=4)
    assert sheet.shape == (4 + 2 * 44, 4 + 4 * 44, 3)  # 5 tiles, 4 columns -> 2 rows
    for n in range(5):
        np.testing.assert_array_equal(_tile(sheet, n, 4, 24, 40)[0], frames[n])
    assert (sheet[48:, 48:] == preview.BACKGROUND).all()  # the three empty cells of row 2


def test_columns_shrink_to_the_number_of_tiles():
    sheet = preview.contact_sheet(_indexed_frames(t=2), count=8, columns=4)
    assert sheet.shape == (4 + 44, 4 + 2 * 44, 3)


def test_wide_video_is_downscaled_keeping_the_aspect():
    frames = np.zeros((2, 720, 1280, 3), np.uint8)
    frames[:, :, 640:] = 255  # right half white: 1280 -> 320 averages whole 4x4 blocks, so the edge stays exact
    frames[1, :, :, 1] = 100
    frames[:, :, 3::4, 2] = 255  # blue: one lit column in every 4, so INTER_AREA's mean is 255 / 4 = 63.75 -> 64
    sheet = preview.contact_sheet(frames)
    assert sheet.shape == (4 + 180 + 16 + 4, 4 + 2 * (320 + 4), 3)  # 720 * 320 / 1280 = 180
    for n in range(2):
        tile, _ = _tile(sheet, n, 2, 180, 320)
        expected = np.zeros((180, 320, 3), np.uint8)
        expected[:, 160:] = 255
        if n == 1:
            expected[..., 1] = 100
        expected[:, :160, 2] = 64
        np.testing.assert_array_equal(tile, expected)
    # Non-integer scale: 333 * 320 / 1000 = 106.56 -> 107 rows.
    odd = preview.contact_sheet(np.zeros((1, 333, 1000, 3), np.uint8))
    assert odd.shape == (4 + 107 + 16 + 4, 4 + 320 + 4, 3)
    small = preview.contact_sheet(np.zeros((1, 90, 160, 3), np.uint8), max_tile_width=80)
    assert small.shape == (4 + 45 + 16 + 4, 4 + 80 + 4, 3)


@pytest.mark.parametrize("frames, kwargs, message", [
    (np.zeros((24, 40, 3), np.uint8), {}, r"expected uint8 frames \[T, H, W, 3\].*found uint8 array of shape "
                                          r"\(24, 40, 3\)"),
    (np.zeros((2, 24, 40, 4), np.uint8), {}, r"found uint8 array of shape \(2, 24, 40, 4\)"),
    (np.zeros((0, 24, 40, 3), np.uint8), {}, r"T >= 1, found uint8 array of shape \(0, 24, 40, 3\)"),
    (np.zeros((2, 24, 40, 3), np.float32), {}, r"expected uint8 .*found float32 array"),
    (np.zeros((2, 24, 40, 3), np.uint8), {"count": 0}, "expected num_frames >= 1 and count >= 1, found 2 and 0"),
    (np.zeros((2, 24, 40, 3), np.uint8), {"columns": 0}, "expected columns >= 1"),
])
def test_bad_input(tmp_path, frames, kwargs, message):
    with pytest.raises(ValueError, match=message):
        preview.write_preview(tmp_path / "bad.png", frames, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_write_replaces_existing_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "seed_1.png"
    path.write_bytes(b"old")
    frames = _indexed_frames(t=3)
    preview.write_preview(path, frames, count=3, columns=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed_1.png"]
    sheet = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert sheet.shape == (4 + 44, 4 + 3 * 44, 3)
    np.testing.assert_array_equal(_tile(sheet, 2, 3, 24, 40)[0], frames[2])


def test_preview_path():
    assert preview.preview_path("runs/sweep/seed_3.mp4") == Path("runs/sweep/seed_3.png")
    assert preview.preview_path(Path("/out/output_video.mp4")) == Path("/out/output_video.png")
