"""Round trips and refusals of the stage files (tpu_wan/core/artifacts.py)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from tpu_wan.core import artifacts as A

GOOD_META = {"format": "tpu_wan", "schema_version": "1"}


def _embeds(dtype, n=2, s=8, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, s, d)).astype(np.float32).astype(dtype),
            rng.standard_normal((n, s, d)).astype(np.float32).astype(dtype))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----- round trips -------------------------------------------------------------------------------------------


def test_embeddings_round_trip_float32(tmp_path):
    pos, neg = _embeds(np.float32)
    path = A.save_embeddings(str(tmp_path), pos, neg)  # str paths work too
    assert path == tmp_path / A.EMBEDDINGS_FILE
    got_pos, got_neg = A.load_embeddings(tmp_path)
    assert got_pos.dtype == np.float32 and got_neg.dtype == np.float32
    np.testing.assert_array_equal(got_pos, pos)
    np.testing.assert_array_equal(got_neg, neg)
    assert _leftovers(tmp_path) == []


def test_embeddings_round_trip_bfloat16_bit_exact(tmp_path):
    pos, neg = _embeds(ml_dtypes.bfloat16)
    # Awkward bit patterns: -0, inf, NaN with payload, smallest subnormal, largest finite.
    specials = np.array([0x8000, 0x7F80, 0x7FC1, 0x0001, 0x7F7F], np.uint16).view(ml_dtypes.bfloat16)
    pos[0, 0, :5] = specials
    A.save_embeddings(tmp_path, pos, neg)
    got_pos, got_neg = A.load_embeddings(tmp_path)
    assert got_pos.dtype == ml_dtypes.bfloat16 and got_neg.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got_pos.view(np.uint16), pos.view(np.uint16))
    np.testing.assert_array_equal(got_neg.view(np.uint16), neg.view(np.uint16))


def test_non_contiguous_input_is_saved_in_logical_order(tmp_path):
    base = np.arange(2 * 16 * 3 * 4 * 5, dtype=np.float32).reshape(2, 16, 3, 5, 4)
    view = base.transpose(0, 1, 2, 4, 3)  # strided view: must not be written in memory order
    A.save_latents(tmp_path / A.LATENTS_FILE, view)
    np.testing.assert_array_equal(A.load_latents(tmp_path / A.LATENTS_FILE), view)


def test_latents_round_trip_accepts_any_channel_count(tmp_path):
    for channels in (16, 4):
        latents = np.random.default_rng(1).standard_normal((2, channels, 3, 4, 6)).astype(np.float32)
        path = A.save_latents(tmp_path / A.LATENTS_FILE, latents)
        got = A.load_latents(path)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, latents)


def test_frames_round_trip(tmp_path):
    frames = np.random.default_rng(2).random((1, 5, 4, 6, 3), dtype=np.float32)
    A.save_frames(tmp_path, frames)
    np.testing.assert_array_equal(A.load_frames(tmp_path), frames)


def test_metadata_is_written_with_extras(tmp_path):
    pos, neg = _embeds(np.float32)
    A.save_embeddings(tmp_path, pos, neg, metadata={"model_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"})
    A.save_latents(tmp_path / A.LATENTS_FILE, np.zeros((1, 16, 1, 2, 2), np.float32))
    A.save_frames(tmp_path, np.zeros((1, 1, 2, 2, 3), np.float32), metadata={"fps": "16"})
    assert A.read_metadata(tmp_path / A.EMBEDDINGS_FILE) == {
        "format": "tpu_wan", "schema_version": "1", "kind": "embeddings",
        "model_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"}
    assert A.read_metadata(tmp_path / A.LATENTS_FILE)["kind"] == "latents"
    assert A.read_metadata(tmp_path / A.FRAMES_FILE) == {
        "format": "tpu_wan", "schema_version": "1", "kind": "frames", "fps": "16"}


def test_extra_metadata_may_not_override_reserved_keys_or_be_non_str(tmp_path):
    latents = np.zeros((1, 16, 1, 2, 2), np.float32)
    with pytest.raises(A.ArtifactError, match="expected extra metadata keys other than .* found 'kind'"):
        A.save_latents(tmp_path / A.LATENTS_FILE, latents, metadata={"kind": "frames"})
    with pytest.raises(A.ArtifactError, match="expected str metadata"):
        A.save_latents(tmp_path / A.LATENTS_FILE, latents, metadata={"seed": 3})
    assert list(tmp_path.iterdir()) == []


# ----- refusals: writers ---------------------------------------------------------------------------------------


def test_writers_refuse_bad_arrays_before_touching_the_file(tmp_path):
    pos, neg = _embeds(np.float32)
    with pytest.raises(A.ArtifactError, match=r"expected negative_prompt_embeds shape \(2, 8, 6\) .*found \(2, 7, 6\)"):
        A.save_embeddings(tmp_path, pos, neg[:, :7])
    with pytest.raises(A.ArtifactError, match="expected negative_prompt_embeds dtype float32 .*found bfloat16"):
        A.save_embeddings(tmp_path, pos, neg.astype(ml_dtypes.bfloat16))
    with pytest.raises(A.ArtifactError, match="expected prompt_embeds dtype float32 or bfloat16, found float64"):
        A.save_embeddings(tmp_path, pos.astype(np.float64), neg)
    with pytest.raises(A.ArtifactError, match=r"expected 5 dims \[V, C, F, H, W\], found shape \(1, 16, 2\)"):
        A.save_latents(tmp_path / A.LATENTS_FILE, np.zeros((1, 16, 2), np.float32))
    with pytest.raises(A.ArtifactError, match="expected dtype float32, found bfloat16"):
        A.save_latents(tmp_path / A.LATENTS_FILE, np.zeros((1, 16, 1, 2, 2), ml_dtypes.bfloat16))
    with pytest.raises(A.ArtifactError, match=r"expected last dim 3 \(RGB\), found shape \(1, 1, 2, 2, 4\)"):
        A.save_frames(tmp_path, np.zeros((1, 1, 2, 2, 4), np.float32))
    assert list(tmp_path.iterdir()) == []


# ----- refusals: readers (bad files written with safetensors directly) ------------------------------------------


@pytest.mark.parametrize("load, file, stage", [
    (lambda d: A.load_embeddings(d), A.EMBEDDINGS_FILE, 1),
    (lambda d: A.load_latents(d / A.LATENTS_FILE), A.LATENTS_FILE, 2),
    (lambda d: A.load_frames(d), A.FRAMES_FILE, 3),
    (lambda d: A.load_config(d), A.CONFIG_FILE, 1),
])
def test_missing_file(tmp_path, load, file, stage):
    with pytest.raises(A.ArtifactError) as err:
        load(tmp_path)
    assert str(err.value) == f"expected {file} in {tmp_path} (run stage {stage} first), found no such file"


def test_missing_user_file_has_no_stage_hint(tmp_path):
    with pytest.raises(A.ArtifactError, match=r"^expected init\.safetensors in .*, found no such file$"):
        A.load_latents(tmp_path / "init.safetensors", require_schema=False)
    with pytest.raises(A.ArtifactError, match="found no such file"):
        A.read_metadata(tmp_path / "nope.safetensors")


def test_wrong_key(tmp_path):
    path = tmp_path / A.LATENTS_FILE
    safetensors.numpy.save_file({"foo": np.zeros((1, 16, 1, 2, 2), np.float32)}, path,
                                metadata={**GOOD_META, "kind": "latents"})
    with pytest.raises(A.ArtifactError, match=r"stage2_latents\.safetensors: expected key 'latents', found \['foo'\]"):
        A.load_latents(path)


def test_missing_embedding_key(tmp_path):
    safetensors.numpy.save_file({"prompt_embeds": np.zeros((1, 4, 2), np.float32)}, tmp_path / A.EMBEDDINGS_FILE,
                                metadata={**GOOD_META, "kind": "embeddings"})
    with pytest.raises(A.ArtifactError,
                       match=r"expected keys \['negative_prompt_embeds', 'prompt_embeds'\] \(and optionally "
                             r"\['image_condition', 'image_embeds'\]\), found \['prompt_embeds'\]"):
        A.load_embeddings(tmp_path)


def test_wrong_dtype(tmp_path):
    path = tmp_path / A.LATENTS_FILE
    safetensors.numpy.save_file({"latents": np.zeros((1, 16, 1, 2, 2), ml_dtypes.bfloat16)}, path,
                                metadata={**GOOD_META, "kind": "latents"})
    with pytest.raises(A.ArtifactError, match="stage2_latents.safetensors: expected dtype float32, found bfloat16"):
        A.load_latents(path)


def test_wrong_ndim(tmp_path):
    path = tmp_path / A.LATENTS_FILE
    safetensors.numpy.save_file({"latents": np.zeros((1, 16, 2), np.float32)}, path,
                                metadata={**GOOD_META, "kind": "latents"})
    with pytest.raises(A.ArtifactError, match=r"expected 5 dims \[V, C, F, H, W\], found shape \(1, 16, 2\)"):
        A.load_latents(path)


def test_mismatched_embedding_shapes_and_dtypes(tmp_path):
    meta = {**GOOD_META, "kind": "embeddings"}
    path = tmp_path / A.EMBEDDINGS_FILE
    safetensors.numpy.save_file({"prompt_embeds": np.zeros((2, 8, 4), np.float32),
                                 "negative_prompt_embeds": np.zeros((2, 8, 5), np.float32)}, path, metadata=meta)
    with pytest.raises(A.ArtifactError, match=r"expected negative_prompt_embeds shape \(2, 8, 4\) .*found \(2, 8, 5\)"):
        A.load_embeddings(tmp_path)
    safetensors.numpy.save_file({"prompt_embeds": np.zeros((2, 8, 4), np.float32),
                                 "negative_prompt_embeds": np.zeros((2, 8, 4), ml_dtypes.bfloat16)}, path,
                                metadata=meta)
    with pytest.raises(A.ArtifactError, match="expected negative_prompt_embeds dtype float32 .*found bfloat16"):
        A.load_embeddings(tmp_path)


@pytest.mark.parametrize("metadata, message", [
    ({"format": "tpu_wan", "schema_version": "2", "kind": "latents"}, "expected schema_version 1, found 2"),
    ({"format": "tpu_wan", "kind": "latents"}, "expected schema_version 1, found none"),
    ({"format": "tpu_wan", "schema_version": "1", "kind": "frames"}, "expected kind 'latents', found 'frames'"),
    (None, "expected metadata format 'tpu_wan', found None"),
])
def test_wrong_schema(tmp_path, metadata, message):
    path = tmp_path / A.LATENTS_FILE
    safetensors.numpy.save_file({"latents": np.zeros((1, 16, 1, 2, 2), np.float32)}, path, metadata=metadata)
    with pytest.raises(A.ArtifactError, match=message):
        A.load_latents(path)


def test_garbage_file(tmp_path):
    (tmp_path / A.FRAMES_FILE).write_bytes(b"this is not a safetensors file")
    with pytest.raises(A.ArtifactError, match="expected a safetensors file, found unreadable data"):
        A.load_frames(tmp_path)


# ----- require_schema=False (user-supplied --init_latents) ---------------------------------------------------


def test_plain_torch_file_accepted_without_schema(tmp_path):
    torch = pytest.importorskip("torch")
    import safetensors.torch

    for dtype in (torch.float32, torch.bfloat16):
        tensor = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(0)).to(dtype)
        path = tmp_path / f"init_{dtype}.safetensors"
        safetensors.torch.save_file({"latents": tensor}, path)
        with pytest.raises(A.ArtifactError, match="expected metadata format 'tpu_wan'"):
            A.load_latents(path)  # the schema is required by default
        got = A.load_latents(path, require_schema=False)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tensor.float().numpy())  # bf16 -> f32 is exact

    path = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"latents": torch.zeros(1, 16, 2, 4, dtype=torch.float32)}, path)
    with pytest.raises(A.ArtifactError, match=r"expected 5 dims \[V, C, F, H, W\], found shape \(1, 16, 2, 4\)"):
        A.load_latents(path, require_schema=False)
    safetensors.torch.save_file({"latents": torch.zeros(1, 16, 2, 4, 4, dtype=torch.int32)}, path)
    with pytest.raises(A.ArtifactError, match="expected dtype float16 or bfloat16 or float32 or float64, found int32"):
        A.load_latents(path, require_schema=False)
    safetensors.torch.save_file({"x": torch.zeros(1, 16, 2, 4, 4)}, path)
    with pytest.raises(A.ArtifactError, match=r"expected key 'latents', found \['x'\]"):
        A.load_latents(path, require_schema=False)


# ----- atomic writes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_atomic_write_keeps_old_file_when_write_fails(tmp_path, exc):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old content")
    seen = []

    def write_fn(tmp: Path) -> None:
        seen.append(tmp)
        tmp.write_bytes(b"half of the new")
        raise exc

    with pytest.raises(type(exc)):
        A.atomic_write(target, write_fn)
    assert target.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and tmp.name.endswith(".tmp")


def test_atomic_write_creates_folder_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "file.txt"
    A.atomic_write(target, lambda tmp: tmp.write_text("one"))
    A.atomic_write(target, lambda tmp: tmp.write_text("two"))
    assert target.read_text() == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_failed_save_keeps_previous_artifact(tmp_path):
    latents = np.ones((1, 16, 1, 2, 2), np.float32)
    path = A.save_latents(tmp_path / A.LATENTS_FILE, latents)
    with pytest.raises(A.ArtifactError):
        A.save_latents(path, np.zeros((1, 16, 2), np.float32))
    np.testing.assert_array_equal(A.load_latents(path), latents)
    assert _leftovers(tmp_path) == []


# ----- generation_config.json ----------------------------------------------------------------------------------


def test_config_round_trip_keeps_chinese_readable(tmp_path):
    config = {"model_id": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "prompts": ["一只猫在草地上奔跑"],
              "negative_prompt": "色调艳丽，过曝", "fps": 16, "mesh": None, "schema_version": 99}
    path = A.save_config(tmp_path, config)
    text = path.read_text(encoding="utf-8")
    assert "一只猫在草地上奔跑" in text and "\\u" not in text
    assert text.startswith('{\n  "schema_version": 1,\n  "model_id"')  # version first, then insertion order
    loaded = A.load_config(tmp_path)
    assert loaded == {**config, "schema_version": 1}
    assert list(loaded) == ["schema_version", "model_id", "prompts", "negative_prompt", "fps", "mesh"]
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("text, message", [
    ('{"schema_version": 1, ', "expected valid UTF-8 JSON, found"),
    ('[1, 2]', "expected a JSON object, found list"),
    ('{"schema_version": 2}', "expected schema_version 1, found 2"),
    ('{"schema_version": "1"}', 'expected schema_version 1, found "1"'),
    ('{"schema_version": true}', "expected schema_version 1, found true"),
    ('{"prompts": []}', "expected schema_version 1, found none"),
])
def test_config_refusals(tmp_path, text, message):
    (tmp_path / A.CONFIG_FILE).write_text(text, encoding="utf-8")
    with pytest.raises(A.ArtifactError, match=message) as err:
        A.load_config(tmp_path)
    assert A.CONFIG_FILE in str(err.value) and "\n" not in str(err.value)


def test_config_refuses_unserialisable_values_without_writing(tmp_path):
    with pytest.raises(A.ArtifactError, match="expected JSON-serialisable values"):
        A.save_config(tmp_path, {"seed": np.int64(3)})
    with pytest.raises(A.ArtifactError, match="expected JSON-serialisable values"):
        A.save_config(tmp_path, {"guidance_scale": float("nan")})
    with pytest.raises(A.ArtifactError, match="expected a dict, found list"):
        A.save_config(tmp_path, [1])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_equal_tensors_give_equal_bytes(tmp_path):
    # safetensors writes its metadata map in hash order; ours is canonical, so reruns are byte-identical.
    latents = np.arange(2 * 16 * 2 * 2 * 2, dtype=np.float32).reshape(2, 16, 2, 2, 2)
    a = A.save_latents(tmp_path / "a.safetensors", latents, metadata={"x": "1", "model_id": "m", "y": "2"})
    b = A.save_latents(tmp_path / "b.safetensors", latents, metadata={"y": "2", "model_id": "m", "x": "1"})
    assert a.read_bytes() == b.read_bytes()
