"""Stage 2: the Wan DiT on the mesh and the jitted denoising step (CFG combine + solver update).

One compiled program serves every step of every run with the same shapes: the timestep, the solver
coefficients and the guidance scale are array inputs, not constants baked into the trace.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan.models import checkpoints, finetune
from tpu_wan.runtime import attention, distributed, loading, parallelism, profiling, torchax_env
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.sampling import schedulers

BLOCKS = r"blocks\.\d+"  # the transformer blocks, whose hidden-state input and output are pinned to the layout


def _denoise_step(forward: Callable, dtype, cfg: bool, weights, latents, state, embeds, timestep, coeffs_i, guidance):
    """latents [B C F H W] f32, embeds [B or 2B, S, D] (cond rows, then uncond rows) -> next latents, state."""
    b = latents.shape[0]
    x = latents.astype(dtype)
    if cfg:
        x = jnp.concatenate([x, x])  # [2B C F H W]: the cond/uncond pair runs as one batch, split over dp
    t = jnp.broadcast_to(timestep, (x.shape[0],))
    v = forward(weights, x, t, embeds, return_dict=False)[0]  # [2B or B, C, F, H, W] in the model dtype
    if cfg:
        cond, uncond = v[:b], v[b:]
        v = uncond + guidance.astype(v.dtype) * (cond - uncond)  # as diffusers: combined in the model dtype
    return schedulers.step(coeffs_i, state, v, latents)


class Denoiser:
    """WanTransformer3DModel loaded once onto a mesh; `denoise` runs a full sampling loop in either sharding mode
    (tpu_wan.runtime.parallelism): both use the same weight shards, so one loaded model serves both."""

    def __init__(self, model_path: Path, mesh, dtype: str, attention_options="auto", *,
                 transformer_checkpoint: str | None = None, checkpoint_key: str | None = None,
                 non_strict: bool = False, abstract: bool = False):
        """`transformer_checkpoint`: fine-tuned weights applied over the base model's (see tpu_wan.models.finetune).
        `abstract`: no weights read, only their shapes and shardings, to compile the step for a slice that is
        not attached (tpu_wan.run.aot); the attention dispatch follows the mesh's platform either way."""
        model = checkpoints.empty_transformer(model_path)
        self.config = model.config
        self.mesh = mesh
        self.dtype = jnp.dtype(dtype)
        expected = checkpoints.expected_weights(model, dtype)
        overrides = None
        if transformer_checkpoint is not None and not abstract:
            tensors = finetune.read_checkpoint(transformer_checkpoint, checkpoint_key)
            overrides = finetune.check_overrides(tensors, expected, non_strict)
        self.attention_options = attention_options
        self._model = model  # parameters on the meta device: only the module's code, traced per sharding mode
        buffers, _ = torchax_env.module_weights(model)
        self.weights = loading.place_model(buffers, expected, model_path / "transformer",
                                           mesh_lib.WAN_TRANSFORMER_RULES, mesh, abstract=abstract,
                                           overrides=overrides)
        self._forwards = {}  # sharding mode -> forward
        self._steps = {}  # (cfg, latents sharding, sharding mode) -> jitted step
        self.programs = {}  # what ran, for profiling.temp_bytes
        self.step_seconds: list[float] = []  # wall time of every step run, in order; callers may clear it

    def forward(self, sharding: str = "megatron") -> Callable:
        """The DiT forward (weights, latents, timestep, text embeddings) in sharding mode `sharding`."""
        if sharding not in self._forwards:
            if sharding == "megatron":  # its attention splits heads over tp
                mesh_lib.check_heads(self.mesh, self.config.num_attention_heads, "transformer")
            layout = parallelism.Layout(sharding, self.mesh)
            fn = attention.make_attention(self.attention_options, self.mesh, layout=layout)
            _, self._forwards[sharding] = torchax_env.functionalize(
                self._model, fn, constraints={BLOCKS: layout.constrain_hidden})
        return self._forwards[sharding]

    def _step_fn(self, cfg: bool, latents_sharding, sharding: str):
        key = (cfg, latents_sharding, sharding)
        if key not in self._steps:
            step = functools.partial(_denoise_step, self.forward(sharding), self.dtype, cfg)
            # Outputs keep the input latents' sharding, so step i's outputs are step i+1's inputs as they are
            # and the one compiled program serves every step.
            self._steps[key] = jax.jit(step, out_shardings=latents_sharding)
        return self._steps[key]

    def step_program(self, latents_shape: tuple[int, ...], text_shape: tuple[int, ...], cfg: bool,
                     sharding: str = "megatron"):
        """(jitted step, abstract arguments) of the step `denoise` runs for latents [B C F H W] and text
        embeddings [B or 2B, S, D] (cond rows, then uncond rows with `cfg`), as remember_program records it."""
        rows = mesh_lib.batch_sharding(self.mesh, latents_shape[0], 5)
        x = jax.ShapeDtypeStruct(latents_shape, jnp.float32, sharding=rows)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows),
                             jax.eval_shape(schedulers.init_state, x))
        embeds = jax.ShapeDtypeStruct(text_shape, self.dtype,
                                      sharding=mesh_lib.batch_sharding(self.mesh, text_shape[0], 3))
        scalar = jax.ShapeDtypeStruct((), jnp.float32)  # timestep and guidance: uncommitted, as in denoise
        coeffs = jax.ShapeDtypeStruct((schedulers.NUM_COEFFS,), jnp.float32)
        return self._step_fn(cfg, x.sharding, sharding), (self.weights, x, state, embeds, scalar, coeffs, scalar)

    def denoise(
        self,
        latents: np.ndarray,
        prompt_embeds: np.ndarray,
        negative_prompt_embeds: np.ndarray | None,
        schedule: schedulers.Schedule,
        guidance_scale: float,
        *,
        progress: bool = True,
        num_steps: int | None = None,
        sharding: str = "megatron",
    ) -> np.ndarray:
        """Runs the schedule (or its first `num_steps` steps) from `latents` [B C F H W] in sharding mode
        `sharding` (tpu_wan.runtime.parallelism); returns float32 latents.

        `negative_prompt_embeds` None (or guidance_scale <= 1) skips the unconditional branch, as diffusers does.
        """
        cfg = negative_prompt_embeds is not None and guidance_scale > 1.0
        embeds = np.concatenate([prompt_embeds, negative_prompt_embeds]) if cfg else prompt_embeds
        embeds = jax.device_put(
            np.asarray(embeds).astype(self.dtype), mesh_lib.batch_sharding(self.mesh, embeds.shape[0], 3)
        )
        rows = mesh_lib.batch_sharding(self.mesh, latents.shape[0], 5)
        x = jax.device_put(np.asarray(latents, np.float32), rows)
        state = jax.device_put(schedulers.init_state(x), rows)
        step = self._step_fn(cfg, rows, sharding)
        guidance = jnp.float32(guidance_scale)
        timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
        coeffs = jnp.asarray(schedule.coeffs, jnp.float32)
        total = schedule.num_inference_steps if num_steps is None else num_steps
        profiling.remember_program(self.programs, f"step cfg={cfg}", step, self.weights, x, state, embeds,
                                   timesteps[0], coeffs[0], guidance)
        for i in distributed.progress(range(total), show=progress, desc="denoising", unit="step", leave=False):
            start = time.perf_counter()
            x, state = step(self.weights, x, state, embeds, timesteps[i], coeffs[i], guidance)
            x.block_until_ready()  # honest step times and progress bar; the step itself is seconds on real sizes
            self.step_seconds.append(time.perf_counter() - start)
        return distributed.to_host(x)
