"""Weights straight into sharded arrays: values, dtypes, shardings, and fine-tuned checkpoint overrides."""

import re

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
from conftest import FRAMES, HEIGHT, LATENT_RTOL, NEGATIVE, PROMPTS, SEED, STEPS, WIDTH, diffusers_run, rel_err
from jax.sharding import PartitionSpec as P
from safetensors.torch import save_file

from tpu_wan.core.config import latent_shape
from tpu_wan.models import checkpoints, finetune
from tpu_wan.models.finetune import FinetuneError
from tpu_wan.models.transformer import LAYERS, Denoiser
from tpu_wan.run import sweep
from tpu_wan.runtime import loading, stacking
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.runtime.mesh import make_mesh
from tpu_wan.sampling import schedulers

LARGE = 1024  # as in test_sharding: every projection of the tiny model is at least this big


def _torch_to_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_equal_diffusers_and_are_sharded(tiny_path, dtype):
    # Values and dtypes as diffusers' from_pretrained(torch_dtype=...) has them (float32 kept where diffusers
    # keeps it), identical on a 1x1 and a 2x4 mesh, and every large weight split on the 2x4 mesh.
    # The blocks' weights are held stacked per family: each is checked as its row there, with its family's spec
    # less the (unsplit) layer axis.
    ref = checkpoints.load_transformer(tiny_path, dtype).state_dict()
    single = Denoiser(tiny_path, make_mesh(1, 1, devices=jax.devices()[:1]), dtype).weights
    sharded = Denoiser(tiny_path, make_mesh(2, 4), dtype).weights
    assert set(single) == set(sharded)
    assert not [name for name in sharded if stacking.family(name, LAYERS)]  # no block weight left per layer
    replicated = []
    for name, tensor in ref.items():
        want = _torch_to_numpy(tensor.detach())
        for weights in (single, sharded):
            got, _ = _weight(weights, name)
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
        _, spec = _weight(sharded, name)
        if tensor.numel() >= LARGE:
            print(f"{name:55s} {str(tuple(tensor.shape)):20s} {spec}")
            if all(axis is None for axis in spec) and not name.startswith("rope."):
                replicated.append(name)
    assert not replicated, f"large weights left replicated: {replicated}"


def _weight(weights, name):
    """(values, PartitionSpec) of the weight a checkpoint names `name`: a block weight's row of its stacked family."""
    array, row = stacking.lookup(weights, name, LAYERS)
    if row is None:
        return np.asarray(array), array.sharding.spec
    assert array.sharding.spec[:1] in ((), (None,)), name  # the layer axis is never split
    return np.asarray(array)[row], P(*array.sharding.spec[1:])


def test_missing_weight_file_is_refused(tmp_path):
    with pytest.raises(loading.LoadError, match="expected diffusion_pytorch_model.safetensors or an index json"):
        loading.weight_files(tmp_path)


@pytest.fixture(scope="module")
def finetuned(tiny_path, tmp_path_factory):
    """The tiny transformer with every weight perturbed, saved as .safetensors and as a research-style .pt."""
    model = checkpoints.load_transformer(tiny_path, "float32")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    out = tmp_path_factory.mktemp("finetuned")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "finetuned.safetensors")
    decoy = {f"model.{k}": torch.zeros_like(v) for k, v in state.items()}
    torch.save({"generator": decoy, "generator_ema": {f"model.{k}": v for k, v in state.items()}}, out / "ft.pt")
    return model, out


def _denoise(tiny_path, embeds, **finetune):
    denoiser = Denoiser(tiny_path, make_mesh(1, 1, devices=jax.devices()[:1]), "float32", **finetune)
    noise = sweep.initial_noise(SEED, latent_shape(1, HEIGHT, WIDTH, FRAMES))
    schedule = schedulers.make_schedule("unipc", STEPS, 3.0)
    return denoiser.denoise(noise, *embeds, schedule, 5.0, progress=False)


@pytest.mark.parametrize("source", ["safetensors", "pt-generator_ema"])
def test_finetuned_checkpoint_matches_diffusers(tiny_path, diffusers_pipe, finetuned, source):
    model, folder = finetuned
    with torch.no_grad():
        embeds = [e.numpy() for e in diffusers_pipe.encode_prompt(PROMPTS[0], NEGATIVE, max_sequence_length=512)]
    base_transformer = diffusers_pipe.transformer
    diffusers_pipe.transformer = model
    try:
        ref = diffusers_run(diffusers_pipe, PROMPTS[0], 5.0, "latent")
    finally:
        diffusers_pipe.transformer = base_transformer
    if source == "safetensors":
        ours = _denoise(tiny_path, embeds, transformer_checkpoint=str(folder / "finetuned.safetensors"))
    else:
        ours = _denoise(tiny_path, embeds, transformer_checkpoint=str(folder / "ft.pt"), checkpoint_key="generator_ema")
    assert rel_err(ours, ref) <= LATENT_RTOL
    base = _denoise(tiny_path, embeds)
    assert rel_err(base, ref) > 100 * LATENT_RTOL  # the fine-tune is really applied


def test_mismatched_checkpoint_is_refused(tiny_path, finetuned, tmp_path):
    model, _ = finetuned
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    first = next(iter(state))
    partial = {k: v for k, v in state.items() if k != first} | {"extra.weight": torch.zeros(3)}
    save_file(partial, tmp_path / "partial.safetensors")
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    with pytest.raises(FinetuneError, match=r"1 missing \(e.g. " + first.replace(".", r"\.") + r"\); 1 unexpected"):
        Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(tmp_path / "partial.safetensors"))
    Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(tmp_path / "partial.safetensors"), non_strict=True)
    with pytest.raises(FinetuneError, match=r"expected key 'ema', found \['generator', 'generator_ema'\]"):
        Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(finetuned[1] / "ft.pt"), checkpoint_key="ema")
    with pytest.raises(FinetuneError, match="found nested dicts .*pass --checkpoint_key"):
        Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(finetuned[1] / "ft.pt"))


def _load(component_dir, module, mesh, rules, dtype="float32"):
    expected = checkpoints.expected_weights(module, dtype)
    return expected, loading.load_sharded(expected, loading.weight_files(component_dir), rules, mesh)


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_each_distinct_slice_is_read_once(tiny_path, monkeypatch, component):
    # On a 2x4 mesh every tensor is on 8 devices but has at most 4 distinct slices (dp replicas), and a
    # row-parallel one ([out, in] split on in) is cut from whole rows: each byte of each tensor is read exactly
    # once. A small CHUNK_BYTES makes the row-parallel reads go chunk by chunk, with a ragged last chunk.
    reads = []
    read_into = loading._Readers._read_into

    def counted(path, offset, out):
        reads.append((str(path), offset, out.nbytes))
        return read_into(path, offset, out)

    monkeypatch.setattr(loading._Readers, "_read_into", staticmethod(counted))
    monkeypatch.setattr(loading, "CHUNK_BYTES", 1000)
    if component == "transformer":
        module, rules = checkpoints.empty_transformer(tiny_path), mesh_lib.WAN_TRANSFORMER_RULES
    else:
        module, rules = checkpoints.empty_text_encoder(tiny_path), mesh_lib.UMT5_RULES
    expected, placed = _load(tiny_path / component, module, make_mesh(2, 4), rules)
    (path,) = set(loading.weight_files(tiny_path / component).values())
    stored = safetensors.numpy.load_file(path)
    spans = sorted((offset, offset + nbytes) for _, offset, nbytes in reads)
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert not overlaps, f"bytes read more than once: {overlaps[:3]}"
    assert sum(n for _, _, n in reads) == sum(stored[name].nbytes for name in expected)
    assert len(reads) > len(expected)  # the chunked path ran
    for name in expected:
        got = np.asarray(placed[name])
        np.testing.assert_array_equal(got.view(np.uint8), stored[name].view(np.uint8), err_msg=name)


def test_sharded_checkpoint_with_index_matches_single_file(tiny_path, tmp_path):
    # diffusers' save_pretrained(max_shard_size=...) writes several files and an index json naming each
    # tensor's file; our loader gives the same bytes as from the single file.
    checkpoints.load_transformer(tiny_path, "float32").save_pretrained(tmp_path, max_shard_size="200KB")
    files = loading.weight_files(tmp_path)
    assert (tmp_path / loading.INDEX_FILES[0]).is_file() and len(set(files.values())) >= 2, sorted(set(files.values()))
    mesh, module, rules = make_mesh(2, 4), checkpoints.empty_transformer(tiny_path), mesh_lib.WAN_TRANSFORMER_RULES
    _, single = _load(tiny_path / "transformer", module, mesh, rules)
    expected, sharded = _load(tmp_path, module, mesh, rules)
    for name in expected:
        assert sharded[name].sharding == single[name].sharding, name
        np.testing.assert_array_equal(np.asarray(sharded[name]).view(np.uint8), np.asarray(single[name]).view(np.uint8),
                                      err_msg=name)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_pth_wrapper_prefixes_are_stripped(tmp_path, prefix):
    # DDP saves names under `module.`, torch.compile under `_orig_mod.`, both nested when combined.
    state = {"blocks.0.ffn.net.2.weight": torch.randn(4, 6), "proj_out.bias": torch.randn(3).bfloat16()}
    torch.save({f"{prefix}{k}": v for k, v in state.items()}, tmp_path / "ft.pth")
    tensors = finetune.read_checkpoint(tmp_path / "ft.pth")
    assert sorted(tensors) == sorted(state)
    for name, tensor in state.items():
        got = tensors[name][(slice(None),) * tensor.ndim]
        np.testing.assert_array_equal(got, tensor.float().numpy(), err_msg=name)  # bf16 -> float32 is exact
        assert tensors[name].shape == tuple(tensor.shape)


def test_misshaped_key_is_refused_or_skipped(tiny_path, tmp_path, caplog):
    # A .pth with one weight of the wrong shape and one fitting weight changed: refused naming the key with
    # expected vs found shape; under non_strict the mis-shaped one is skipped (the base weight stays) and the
    # fitting one applied.
    state = {k: v.contiguous() for k, v in checkpoints.load_transformer(tiny_path, "float32").state_dict().items()}
    bad = next(k for k, v in state.items() if v.ndim == 2 and k.startswith("blocks."))
    changed = next(k for k, v in state.items() if v.ndim == 2 and k != bad)
    want_shape = tuple(state[bad].shape)
    state[bad] = torch.zeros(want_shape[0] + 1, want_shape[1])
    state[changed] = state[changed] + 1.0
    torch.save({"generator_ema": state}, tmp_path / "ft.pth")
    mesh = make_mesh(2, 4)
    found_shape = (want_shape[0] + 1, want_shape[1])
    message = f"1 mis-shaped (e.g. {bad}: expected shape {want_shape}, found {found_shape})"
    with pytest.raises(FinetuneError, match=re.escape(message)):
        Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(tmp_path / "ft.pth"),
                 checkpoint_key="generator_ema")
    base = Denoiser(tiny_path, mesh, "float32").weights
    with caplog.at_level("WARNING", logger="tpu_wan"):
        tuned = Denoiser(tiny_path, mesh, "float32", transformer_checkpoint=str(tmp_path / "ft.pth"),
                         checkpoint_key="generator_ema", non_strict=True).weights
    assert f"{bad}: expected shape {want_shape}" in caplog.text
    np.testing.assert_array_equal(_weight(tuned, bad)[0], _weight(base, bad)[0])
    np.testing.assert_array_equal(_weight(tuned, changed)[0], state[changed].numpy())
    assert stacking.lookup(tuned, changed, LAYERS)[0].sharding == stacking.lookup(base, changed, LAYERS)[0].sharding
