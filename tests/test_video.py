"""mp4 writing and reading (tpu_wan/core/video.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tpu_wan.core import video

# H.264 is lossy: RGB -> YUV 4:2:0 (chroma at half resolution) plus quantisation at crf 18. On smooth
# gradients the decoded frames stay within a few uint8 levels on average (measured ~2.0 with
# this content); white noise would be far off.
MAX_MEAN_ABS_ERROR = 4.0


def _smooth_frames(t=5, h=32, w=48) -> np.ndarray:
    """Float frames in [0, 1]: a different linear/bilinear gradient per channel, brightening over time."""
    ys, xs = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    first = np.stack([0.2 + 0.6 * xs, 0.2 + 0.6 * ys, 0.3 + 0.4 * xs * ys], axis=-1)
    return np.stack([first + 0.02 * i for i in range(t)]).astype(np.float32)


def _diffusers_conversion(frames: np.ndarray) -> np.ndarray:
    """Verbatim from diffusers.utils.export_utils.export_to_video (importing diffusers takes ~8 s)."""
    video_frames = list(frames)
    video_frames = [(frame * 255).astype(np.uint8) for frame in video_frames]
    return np.stack(video_frames)


def test_round_trip(tmp_path):
    frames = _smooth_frames()
    path = video.write_video(tmp_path / "out.mp4", frames, fps=16)
    assert path == tmp_path / "out.mp4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]  # no temp file left
    decoded, fps = video.read_video(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (5, 32, 48, 3)
    assert fps == 16.0
    error = np.abs(decoded.astype(np.int16) - video.to_uint8(frames).astype(np.int16)).mean()
    assert error < MAX_MEAN_ABS_ERROR


def test_uint8_input_and_str_path(tmp_path):
    frames = video.to_uint8(_smooth_frames(t=3))
    video.write_video(str(tmp_path / "u8.mp4"), frames, fps=24)
    decoded, fps = video.read_video(str(tmp_path / "u8.mp4"))
    assert decoded.shape == frames.shape and fps == 24.0


def test_to_uint8_matches_diffusers():
    rng = np.random.default_rng(0)
    edges = np.array([0.0, 1.0, 0.5, 1 / 255, 254 / 255, -1e-7, -0.5 / 255, 1 + 1e-7, 1 + 0.5 / 255,
                      np.nextafter(np.float32(1), np.float32(0)), np.nextafter(np.float32(0), np.float32(-1))],
                     np.float32)
    # Within (-1/255, 256/255) diffusers' cast is well defined (truncation toward zero).
    values = np.concatenate([edges, rng.uniform(-0.9 / 255, 1 + 0.9 / 255, 3 * 4 * 3 * 8 - edges.size)])
    frames = values.astype(np.float32).reshape(3, 4, 3, 8).transpose(0, 3, 1, 2)  # [T, H, W, 3], strided
    assert frames.shape == (3, 8, 4, 3)
    np.testing.assert_array_equal(video.to_uint8(frames), _diffusers_conversion(frames))
    # diffusers multiplies in the input's own dtype; so do we.
    np.testing.assert_array_equal(video.to_uint8(frames.astype(np.float64)),
                                  _diffusers_conversion(frames.astype(np.float64)))
    # Truncation, not rounding: 0.999 * 255 = 254.7 -> 254.
    np.testing.assert_array_equal(video.to_uint8(np.float32([0.999, 1.0, 0.0])), [254, 255, 0])
    # Far outside [0, 1] diffusers is undefined; we saturate.
    np.testing.assert_array_equal(video.to_uint8(np.float32([-3.0, 7.0])), [0, 255])


def test_diffusers_still_converts_this_way():
    """Guard against drift: the installed diffusers source still holds the expression we copied."""
    spec = importlib.util.find_spec("diffusers")  # locates the package without importing it
    if spec is None or spec.origin is None:
        pytest.skip("diffusers not installed")
    source = (Path(spec.origin).parent / "utils" / "export_utils.py").read_text(encoding="utf-8")
    assert "video_frames = [(frame * 255).astype(np.uint8) for frame in video_frames]" in source


@pytest.mark.parametrize("frames, fps, message", [
    (np.zeros((32, 48, 3), np.float32), 16, r"expected frames \[T, H, W, 3\], found shape \(32, 48, 3\)"),
    (np.zeros((2, 32, 48, 4), np.float32), 16, r"expected frames \[T, H, W, 3\], found shape \(2, 32, 48, 4\)"),
    (np.zeros((0, 32, 48, 3), np.float32), 16, "expected at least 1 frame"),
    (np.zeros((2, 31, 48, 3), np.float32), 16, "expected even height and width .*found 31x48"),
    (np.zeros((2, 32, 47, 3), np.float32), 16, "expected even height and width .*found 32x47"),
    (np.zeros((2, 32, 48, 3), np.float32), 0, "expected fps > 0, found 0"),
    (np.zeros((2, 32, 48, 3), np.float32), -5, "expected fps > 0, found -5"),
    (np.zeros((2, 32, 48, 3), np.float32), float("nan"), "expected fps > 0, found nan"),
    (np.zeros((2, 32, 48, 3), np.int16), 16, "expected float frames in .* or uint8, found dtype int16"),
])
def test_bad_input(tmp_path, frames, fps, message):
    with pytest.raises(ValueError, match=message):
        video.write_video(tmp_path / "bad.mp4", frames, fps)
    assert list(tmp_path.iterdir()) == []


def test_failure_mid_encode_keeps_old_video_and_leaves_no_temp(tmp_path, monkeypatch):
    path = video.write_video(tmp_path / "out.mp4", _smooth_frames(t=2), fps=8)
    before = path.read_bytes()
    calls = []

    def failing_to_uint8(frames):
        calls.append(1)
        if len(calls) > 2:  # first call is the up-front dtype check, then one frame goes through
            raise RuntimeError("interrupted")
        return np.clip(np.asarray(frames) * 255, 0, 255).astype(np.uint8)

    monkeypatch.setattr(video, "to_uint8", failing_to_uint8)
    with pytest.raises(RuntimeError, match="interrupted"):
        video.write_video(path, _smooth_frames(t=4), fps=8)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]


def test_read_missing_video(tmp_path):
    with pytest.raises(FileNotFoundError, match="found no such file"):
        video.read_video(tmp_path / "nope.mp4")
