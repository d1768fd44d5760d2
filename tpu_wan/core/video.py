"""Frames to H.264 mp4 and back, through the ffmpeg binary bundled with imageio-ffmpeg."""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import imageio_ffmpeg
import numpy as np

from tpu_wan.core.artifacts import atomic_write

# x264 constant rate factor: 0 is lossless, 51 worst; 18 is commonly called visually lossless. (diffusers'
# export_to_video default quality=5 becomes crf 25 inside imageio-ffmpeg: smaller files, visible blocking.)
DEFAULT_CRF = 18


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8 the way diffusers' ``export_to_video`` does; uint8 passes through.

    diffusers (utils/export_utils.py) does ``(frame * 255).astype(np.uint8)``: multiply in the input's own
    float dtype, then the cast truncates toward zero (0.999 -> 254, not 255), with no rounding and no clipping.
    Its pipelines clamp to [0, 1] beforehand, so values outside are not expected there, and for them a float ->
    uint8 cast is undefined (numpy wraps or warns). We clip the product to [0, 255] before the same cast: equal
    to diffusers wherever diffusers is well defined (-1/255 < x < 256/255), saturating beyond. NaN stays undefined.
    """
    frames = np.asarray(frames)
    if frames.dtype == np.uint8:
        return frames
    if not np.issubdtype(frames.dtype, np.floating) and frames.dtype.name != "bfloat16":
        raise ValueError(f"expected float frames in [0, 1] or uint8, found dtype {frames.dtype.name}")
    return np.clip(frames * 255, 0, 255).astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float | Fraction, *,
                crf: int = DEFAULT_CRF) -> Path:
    """Encode ``frames`` [T, H, W, 3] (float in [0, 1] or uint8) as H.264/yuv420p mp4 at ``fps``, atomically.

    H and W must be even (4:2:0 chroma subsampling halves both); frames are never rescaled.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], found shape {frames.shape}")
    num_frames, height, width, _ = frames.shape
    if num_frames < 1:
        raise ValueError(f"expected at least 1 frame, found shape {frames.shape}")
    if height % 2 or width % 2:
        raise ValueError(f"expected even height and width (yuv420p), found {height}x{width}")
    rate = fps if isinstance(fps, Fraction) else float(fps)  # imageio-ffmpeg accepts only int/float/Fraction
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"expected fps > 0, found {fps}")
    to_uint8(frames[:0])  # dtype check before ffmpeg starts

    def encode(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), (width, height), fps=rate, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
            quality=None, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-crf", str(crf), "-movflags", "+faststart"])
        writer.send(None)  # start the generator (launches ffmpeg)
        try:
            for frame in frames:  # one frame at a time keeps peak memory at one uint8 frame, not the video
                writer.send(np.ascontiguousarray(to_uint8(frame)))
        finally:
            writer.close()  # waits for ffmpeg to finish the file
        # write_frames does not report ffmpeg's exit status; an empty file means it wrote nothing.
        if tmp.stat().st_size == 0:
            raise OSError(f"{path}: expected ffmpeg to write an mp4, found an empty file")

    # ffmpeg picks the container from the suffix, so the temp name must end in .mp4.
    return atomic_write(path, encode, suffix=".tmp.mp4")


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Decode a video to uint8 frames [T, H, W, 3] (RGB) and its frame rate."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a video file at {path}, found no such file")
    reader = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(height, width, 3) for buf in reader]
    finally:
        reader.close()
    video = np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8)
    return video, float(meta["fps"])
