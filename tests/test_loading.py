"""Weights straight into sharded arrays: values, dtypes, shardings, and fine-tuned checkpoint overrides."""

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import FRAMES, HEIGHT, LATENT_RTOL, NEGATIVE, PROMPTS, SEED, STEPS, WIDTH, diffusers_run, rel_err
from safetensors.torch import save_file

from tpu_wan import checkpoints, loading, pipeline, schedulers
from tpu_wan.config import latent_shape
from tpu_wan.finetune import FinetuneError
from tpu_wan.mesh import make_mesh
from tpu_wan.transformer import Denoiser

LARGE = 1024  # as in test_sharding: every projection of the tiny model is at least this big


def _torch_to_numpy(t):
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loaded_weights_equal_diffusers_and_are_sharded(tiny_path, dtype):
    # Values and dtypes as diffusers' from_pretrained(torch_dtype=...) has them (float32 kept where diffusers
    # keeps it), identical on a 1x1 and a 2x4 mesh, and every large weight split on the 2x4 mesh.
    ref = checkpoints.load_transformer(tiny_path, dtype).state_dict()
    single = Denoiser(tiny_path, make_mesh(1, 1, devices=jax.devices()[:1]), dtype).weights
    sharded = Denoiser(tiny_path, make_mesh(2, 4), dtype).weights
    assert set(ref) <= set(sharded) and set(single) == set(sharded)
    replicated = []
    for name, tensor in ref.items():
        want = _torch_to_numpy(tensor.detach())
        for weights in (single, sharded):
            got = np.asarray(weights[name])
            assert got.dtype == want.dtype, name
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)
        spec = sharded[name].sharding.spec
        if tensor.numel() >= LARGE:
            print(f"{name:55s} {str(tuple(tensor.shape)):20s} {spec}")
            if all(axis is None for axis in spec) and not name.startswith("rope."):
                replicated.append(name)
    assert not replicated, f"large weights left replicated: {replicated}"


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
    noise = pipeline.initial_noise(SEED, latent_shape(1, HEIGHT, WIDTH, FRAMES))
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
