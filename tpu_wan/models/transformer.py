"""Stage 2: the Wan DiT on the mesh and the jitted denoising step (CFG combine + solver update).

One compiled program serves every step of every run with the same shapes: the weights, the timestep, the solver
coefficients and the guidance scale are array inputs, not constants baked into the trace. So Wan 2.2 A14B's two
experts (one architecture, two sets of weights, each with its own guidance scale) run the same program.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan.models import checkpoints, finetune, lora
from tpu_wan.runtime import (
    attention,
    distributed,
    loading,
    parallelism,
    profiling,
    programs,
    torchax_env,
)
from tpu_wan.runtime import mesh as mesh_lib
from tpu_wan.sampling import schedulers, step_cache

log = logging.getLogger("tpu_wan")
BLOCKS = r"blocks\.\d+"  # the transformer blocks, whose hidden-state input and output are pinned to the layout
# The blocks run as one loop over layers, their weights held stacked per family ("blocks.*.attn1.to_q.weight" [L ...],
# tpu_wan.runtime.stacking): the compiler builds one block instead of 40 (14B), so compile time stays flat in depth.
LAYERS = ("blocks",)


def _denoise_step(forward: Callable, dtype, cfg: bool, conditioning: str | None, weights, latents, state, embeds,
                  timestep, coeffs_i, guidance, image, noise=None):
    """latents [B C F H W] f32, embeds [B or 2B, S, D] (cond rows, then uncond rows) -> next latents, state.
    `conditioning`, `image`: image to video (model_input); `image` {} for text to video. `noise` [B C F H W] f32:
    the "distill" solver's fresh noise (None, no input, for the others)."""
    b = latents.shape[0]
    x, t, extra = model_input(latents, image, conditioning, timestep, dtype)
    if cfg:
        # the cond/uncond pair runs as one batch, split over dp; the image inputs are the same for both
        x, t = jnp.concatenate([x, x]), jnp.concatenate([t, t])
        extra = {k: jnp.concatenate([v, v]) for k, v in extra.items()}
    v = forward(weights, x, t, embeds, return_dict=False, **extra)[0]  # [2B or B, C, F, H, W] in the model dtype
    if cfg:
        cond, uncond = v[:b], v[b:]
        v = uncond + guidance.astype(v.dtype) * (cond - uncond)  # as diffusers: combined in the model dtype
    return schedulers.step(coeffs_i, state, v, latents, noise)


def model_input(latents, image: dict, conditioning: str | None, timestep, dtype):
    """(the transformer's input [B C' F H W] in the model dtype, its timestep [B] or per token [B, L] float32, its
    other inputs) as WanImageToVideoPipeline builds them:
      - "concat" (I2V): image["condition"] [B 4+C F H W] (frame mask, first-frame latents) after the channels;
      - "first_frame" (TI2V with an image): latent frame 0 replaced by image["condition"] [B C 1 H W], and a
        timestep per 1x2x2 token: 0 on frame 0's, t elsewhere;
    and CLIP's image_embeds [B, tokens, D] as `encoder_hidden_states_image` where given."""
    b = latents.shape[0]
    x = latents.astype(dtype)
    t = jnp.broadcast_to(timestep, (b,))
    if conditioning == "concat":
        x = jnp.concatenate([x, image["condition"].astype(dtype)], axis=1)  # diffusers: cat in f32, then cast
    elif conditioning == "first_frame":
        x = jnp.concatenate([image["condition"].astype(dtype), x[:, :, 1:]], axis=2)
        per_frame = (latents.shape[3] // 2) * (latents.shape[4] // 2)
        tokens = jnp.where(jnp.arange(latents.shape[2] * per_frame) < per_frame, 0.0, timestep)
        t = jnp.broadcast_to(tokens.astype(jnp.float32), (b, tokens.shape[0]))
    extra = {"encoder_hidden_states_image": image["embeds"].astype(dtype)} if "embeds" in image else {}
    return x, t, extra


@dataclasses.dataclass(frozen=True)
class _HostArray:
    """A global array as host copies of this process's shards (with several hosts no process holds them all)."""

    shape: tuple[int, ...]
    sharding: object
    shards: tuple[tuple[object, np.ndarray], ...]  # (device, its shard's data)

    @classmethod
    def of(cls, array: jax.Array) -> "_HostArray":
        return cls(array.shape, array.sharding, tuple((s.device, np.asarray(s.data)) for s in array.addressable_shards))

    def to_devices(self) -> jax.Array:
        return jax.make_array_from_single_device_arrays(
            self.shape, self.sharding, [jax.device_put(data, device) for device, data in self.shards])


class Denoiser:
    """WanTransformer3DModel (each expert of a two-expert model) loaded once onto a mesh; `denoise` runs a full
    sampling loop in either sharding mode (tpu_wan.runtime.parallelism): both use the same weight shards, so one
    loaded model serves both."""

    def __init__(self, model_path: Path, mesh, dtype: str, attention_options="auto", *,
                 transformer_checkpoint: str | None = None, checkpoint_key: str | None = None,
                 non_strict: bool = False, abstract: bool = False, expert_offload: bool = False, kind=None,
                 loras: dict | None = None):
        """`transformer_checkpoint`: fine-tuned weights applied over the base model's (see tpu_wan.models.finetune).
        `abstract`: no weights read, only their shapes and shardings, to compile the step for a slice that is
        not attached (tpu_wan.run.aot); the attention dispatch follows the mesh's platform either way.
        `expert_offload`: of two experts only the one running stays on the devices, the other in host memory
        (swapped at the boundary step, `swap_seconds`). `kind`: the folder's ModelKind (default: read from its
        config files; a folder holding only transformer/ passes tpu_wan.models.kinds.ModelKind()). `loras`: expert ->
        the LoRAs fused into its weights as they load (tpu_wan.models.lora; not read when `abstract`)."""
        self.kind = kind or checkpoints.model_kind(model_path)
        model = checkpoints.empty_transformer(model_path)
        self.config = model.config
        self.mesh = mesh
        self.dtype = jnp.dtype(dtype)
        expected = checkpoints.expected_weights(model, dtype)
        overrides = None
        if transformer_checkpoint is not None and not abstract:
            if len(self.kind.experts) > 1:
                raise finetune.FinetuneError(
                    f"--transformer_checkpoint: expected a model with one transformer, found {model_path.name} with "
                    f"two experts ({', '.join(self.kind.experts)})")
            tensors = finetune.read_checkpoint(transformer_checkpoint, checkpoint_key)
            overrides = finetune.check_overrides(tensors, expected, non_strict)
        self.attention_options = attention_options
        self._model = model  # parameters on the meta device: only the module's code, traced per sharding mode
        buffers, _ = torchax_env.module_weights(model)
        self.offload = expert_offload and len(self.kind.experts) > 1 and not abstract
        self._host = {}  # expert -> its weights in host memory (expert_offload)
        self.experts = {}  # expert -> its weights on the mesh; with offload, only the one running
        loras = {} if abstract else {name: files for name, files in (loras or {}).items() if files}
        if set(loras) - set(self.kind.experts):
            raise lora.LoraError(f"--lora_2: expected a two-expert model (as Wan 2.2 T2V-A14B), found "
                                 f"{model_path.name} with one transformer")
        fused = {name: lora.fusions(files, expected, lora.FLAGS[name]) for name, files in loras.items()}
        for name, files in loras.items():
            log.info("fusing %s into %s (%d weights)", ", ".join(f"{Path(f.path).name} x {f.scale:g}" for f in files),
                     name, len(fused[name]))
        for name in reversed(self.kind.experts):  # the first expert to run loads last: with offload it stays
            self.experts[name] = loading.place_model(buffers, expected, model_path / name,
                                                     mesh_lib.WAN_TRANSFORMER_RULES, mesh, abstract=abstract,
                                                     overrides=overrides, adjust=fused.get(name), layers=LAYERS)
            if self.offload and name != self.kind.experts[0]:
                self._host[name] = self._to_host(name)
        self._forwards = {}  # sharding mode -> forward
        self._steps = {}  # (cfg, latents sharding, sharding mode) -> jitted step
        self.programs = {}  # what ran, for profiling.temp_bytes
        self.compile_s: dict[str, float] = {}  # program -> seconds jax spent compiling it (profiling.compiling)
        self.step_seconds: list[float] = []  # wall time of every step run, in order; callers may clear it
        self.swap_seconds: list[float] = []  # expert_offload: wall time of every swap, in order
        self.expert_log: list[str] = []  # the expert every step ran, in order; callers may clear it
        self.cache_log: list[dict] = []  # with a step cache: each batch's step_cache.summary; callers may clear it
        self.first_step_end: float | None = None  # time.time() when the first step of this model's life ended

    @property
    def weights(self):
        """The weights on the mesh now: one expert's dict, or {expert: dict} for two experts held together."""
        if len(self.experts) == 1:
            return next(iter(self.experts.values()))
        return self.experts

    def _to_host(self, name: str) -> dict:
        """Moves expert `name`'s weights from the mesh to host memory (their device buffers freed)."""
        host = jax.tree.map(_HostArray.of, self.experts[name])
        for leaf in jax.tree.leaves(self.experts.pop(name)):
            leaf.delete()
        return host

    def _on_mesh(self, name: str) -> dict:
        """Expert `name`'s weights on the mesh; with offload, swapped in for the one there (timed)."""
        if name not in self.experts:
            start = time.perf_counter()
            for other in list(self.experts):
                if other not in self._host:  # its first swap out: a host copy, kept for the swaps back
                    self._host[other] = self._to_host(other)
                else:
                    for leaf in jax.tree.leaves(self.experts.pop(other)):
                        leaf.delete()
            self.experts[name] = jax.tree.map(_HostArray.to_devices, self._host[name])
            jax.block_until_ready(self.experts[name])
            self.swap_seconds.append(time.perf_counter() - start)
        return self.experts[name]

    def forward(self, sharding: str = "megatron", cached: bool = False) -> Callable:
        """The DiT forward (weights, latents, timestep, text embeddings) in sharding mode `sharding`; `cached`: its
        block loop runs through step_cache.run_stack (the step cache's, inside step_cache.cached_step)."""
        key = (sharding, "cached") if cached else sharding
        if key not in self._forwards:
            if sharding == "megatron":  # its attention splits heads over tp
                mesh_lib.check_heads(self.mesh, self.config.num_attention_heads, "transformer")
            layout = parallelism.Layout(sharding, self.mesh)
            fn = attention.make_attention(self.attention_options, self.mesh, layout=layout)
            _, self._forwards[key] = torchax_env.functionalize(
                self._model, fn, constraints={BLOCKS: layout.constrain_hidden},
                stacks={"blocks": step_cache.run_stack} if cached else None, scan=LAYERS)
        return self._forwards[key]

    def _step_fn(self, cfg: bool, latents_sharding, sharding: str, conditioning: str | None = None):
        key = (cfg, latents_sharding, sharding, conditioning)
        if key not in self._steps:
            # A TI2V model (expand_timesteps) takes one timestep per video token, but in text-to-video every token
            # has the same t, and the model computes each token's time embedding and modulation from its own t
            # alone: a scalar timestep gives the same numbers (to float32 rounding: bit for bit on one device, 4e-7
            # relative for a step on 2x4 where XLA fuses the broadcast otherwise; tests/test_wan22.py) without the
            # per-token [B, L, 6, D] float32 modulation tensors. TI2V-5B's step at 1280x704x121 on v6e-1: 2.68 GiB
            # of temporaries instead of 11.01 (compile-only). Image-to-video (frame 0 kept at t = 0) needs them.
            step = functools.partial(_denoise_step, self.forward(sharding), self.dtype, cfg, conditioning)
            # Outputs keep the input latents' sharding, so step i's outputs are step i+1's inputs as they are
            # and the one compiled program serves every step.
            self._steps[key] = jax.jit(step, out_shardings=latents_sharding)
        return self._steps[key]

    def _cached_step_fn(self, cfg: bool, latents_sharding, sharding: str, spec, cache_state,
                        conditioning: str | None = None):
        """The step with a step cache (tpu_wan.sampling.step_cache): (..., cache state) -> (latents, solver state,
        cache state), the cache state keeping its placement (abstract `cache_state`'s) from step to step."""
        placement = jax.tree.map(lambda a: a.sharding, cache_state)
        key = (cfg, latents_sharding, sharding, spec, tuple(jax.tree.leaves(placement)), conditioning)
        if key not in self._steps:
            step = functools.partial(_denoise_step, self.forward(sharding, cached=True), self.dtype, cfg, conditioning)
            self._steps[key] = jax.jit(functools.partial(step_cache.cached_step, step, spec),
                                       out_shardings=(latents_sharding, latents_sharding, placement))
        return self._steps[key]

    def _cache_state(self, spec, branches: int, latents_shape: tuple[int, ...], rows: int, sharding: str,
                     num_steps: int):
        """The abstract step-cache state for `rows` = branches x B rows of latents [B C F H W]: the hidden state's
        residuals [rows L E] in the model dtype, placed as the blocks' hidden state is in mode `sharding` (where the
        token shards divide L: an array cannot be placed unevenly, so otherwise only the rows are split)."""
        from jax.sharding import NamedSharding
        from jax.sharding import PartitionSpec as P

        from tpu_wan.core.config import video_tokens

        hidden = (rows, video_tokens(latents_shape, self.config.patch_size),
                  self.config.num_attention_heads * self.config.attention_head_dim)
        layout = parallelism.Layout(sharding, self.mesh)
        placed = layout.hidden_spec(rows) if hidden[1] % layout.token_shards(rows) == 0 else P(layout.batch_axis(rows))
        return step_cache.abstract_state(spec, branches, hidden, self.dtype, num_steps,
                                         NamedSharding(self.mesh, placed), NamedSharding(self.mesh, P()))

    def conditioning(self, image: dict | None) -> str | None:
        """model_input's mode for a run with these image inputs: "concat" for the I2V models, "first_frame" for TI2V
        given an image, None for text to video."""
        if not image:
            return None
        return "first_frame" if self.kind.expand_timesteps else "concat"

    def _place_image(self, image: dict | None, abstract: bool = False) -> dict:
        """The image inputs ([B, ...] each, B the latents' rows) split over dp as the latents are; `abstract`:
        ShapeDtypeStructs of the given shapes."""
        out = {}
        for key, value in (image or {}).items():
            dtype = jnp.float32 if key == "condition" else self.dtype
            sharding = mesh_lib.batch_sharding(self.mesh, value.shape[0], len(value.shape))
            out[key] = (jax.ShapeDtypeStruct(value.shape, dtype, sharding=sharding) if abstract else
                        jax.device_put(np.asarray(value).astype(dtype), sharding))
        return out

    def step_program(self, latents_shape: tuple[int, ...], text_shape: tuple[int, ...], cfg: bool,
                     sharding: str = "megatron", noise: bool = False, cache: str | None = None, num_steps: int = 1,
                     image: dict | None = None):
        """(jitted step, abstract arguments) of the step `denoise` runs for latents [B C F H W] and text
        embeddings [B or 2B, S, D] (cond rows, then uncond rows with `cfg`), as remember_program records it;
        `noise`: the step takes fresh noise [B C F H W] (Schedule.takes_noise); `cache`: with that step cache (a
        run of `num_steps` steps); `image`: name -> shape of the image inputs (`denoise`'s `image`)."""
        rows = mesh_lib.batch_sharding(self.mesh, latents_shape[0], 5)
        x = jax.ShapeDtypeStruct(latents_shape, jnp.float32, sharding=rows)
        state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rows),
                             jax.eval_shape(schedulers.init_state, x))
        embeds = jax.ShapeDtypeStruct(text_shape, self.dtype,
                                      sharding=mesh_lib.batch_sharding(self.mesh, text_shape[0], 3))
        scalar = jax.ShapeDtypeStruct((), jnp.float32)  # timestep and guidance: uncommitted, as in denoise
        coeffs = jax.ShapeDtypeStruct((schedulers.NUM_COEFFS,), jnp.float32)
        weights = self.experts[self.kind.experts[0]]  # every expert's weights have these shapes and shardings
        shapes = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in (image or {}).items()}
        placed, mode = self._place_image(shapes, abstract=True), self.conditioning(image)
        args = (weights, x, state, embeds, scalar, coeffs, scalar, placed)
        if cache is not None:
            spec = step_cache.parse(cache)
            abstract = self._cache_state(spec, 2 if cfg else 1, latents_shape, text_shape[0], sharding, num_steps)
            return self._cached_step_fn(cfg, x.sharding, sharding, spec, abstract, mode), args + (
                (x,) if noise else ()) + (abstract,)
        return self._step_fn(cfg, x.sharding, sharding, mode), args + ((x,) if noise else ())

    def denoise(
        self,
        latents: np.ndarray,
        prompt_embeds: np.ndarray,
        negative_prompt_embeds: np.ndarray | None,
        schedule: schedulers.Schedule,
        guidance_scale: float,
        *,
        guidance_scale_2: float | None = None,
        expert_steps: tuple[str, ...] | None = None,
        progress: bool = True,
        num_steps: int | None = None,
        sharding: str = "megatron",
        noise: Callable[[int], np.ndarray] | None = None,
        cache: str | None = None,
        image: dict | None = None,
    ) -> np.ndarray:
        """Runs the schedule (or its first `num_steps` steps) from `latents` [B C F H W] in sharding mode
        `sharding` (tpu_wan.runtime.parallelism); returns float32 latents.

        `negative_prompt_embeds` None (or guidance_scale <= 1) skips the unconditional branch, as diffusers does
        (it decides on the first expert's scale for both). Two experts: `expert_steps` names the expert of each
        step (pipeline.expert_steps), `guidance_scale_2` is the second one's guidance (None: guidance_scale).
        `noise`: for a schedule that takes it (Schedule.takes_noise), step i -> fresh N(0, 1) [B C F H W], called in
        step order for the steps that re-noise (Schedule.renoises) just before each runs; the others get zeros.
        `cache`: a step cache (--cache, tpu_wan.sampling.step_cache), its state fresh for this batch; what it ran is
        appended to `cache_log`. `image`: image to video's inputs, one row per latents row: "condition" (stage 1's
        image_condition) and, for a model with an image encoder, "embeds" (model_input); for TI2V the returned
        latents' frame 0 is the condition, as diffusers puts it back after the loop.
        """
        if schedule.takes_noise and noise is None:
            raise ValueError(f"the {schedule.solver!r} schedule re-noises: expected a noise source, found none")
        cfg = negative_prompt_embeds is not None and guidance_scale > 1.0
        embeds = np.concatenate([prompt_embeds, negative_prompt_embeds]) if cfg else prompt_embeds
        embeds = jax.device_put(
            np.asarray(embeds).astype(self.dtype), mesh_lib.batch_sharding(self.mesh, embeds.shape[0], 3)
        )
        rows = mesh_lib.batch_sharding(self.mesh, latents.shape[0], 5)
        x = jax.device_put(np.asarray(latents, np.float32), rows)
        state = jax.device_put(schedulers.init_state(x), rows)
        mode, placed = self.conditioning(image), self._place_image(image)
        step = self._step_fn(cfg, rows, sharding, mode)
        carried, spec = (), None  # the step cache's state, carried from step to step like the solver's
        if cache is not None:
            spec = step_cache.parse(cache)
            abstract = self._cache_state(spec, 2 if cfg else 1, latents.shape, embeds.shape[0], sharding,
                                         schedule.num_inference_steps)
            carried = (step_cache.init_state(spec, abstract),)
            step = self._cached_step_fn(cfg, rows, sharding, spec, abstract, mode)
        experts = self.kind.experts
        expert_steps = expert_steps or (experts[0],) * schedule.num_inference_steps
        scales = (guidance_scale, guidance_scale if guidance_scale_2 is None else guidance_scale_2)
        guidance = {name: jnp.float32(scale) for name, scale in zip(experts, scales)}
        timesteps = jnp.asarray(schedule.timesteps, jnp.float32)
        coeffs = jnp.asarray(schedule.coeffs, jnp.float32)
        total = schedule.num_inference_steps if num_steps is None else num_steps
        first = self._on_mesh(expert_steps[0])
        zeros = (jax.device_put(np.zeros(latents.shape, np.float32), rows),) if schedule.takes_noise else ()
        program = f"step cfg={cfg}" + (f" cache={spec.kind}" if spec else "")
        profiling.remember_program(self.programs, program, step, first, x, state, embeds,
                                   timesteps[0], coeffs[0], guidance[expert_steps[0]], placed, *zeros, *carried)
        for i in distributed.progress(range(total), show=progress, desc="denoising", unit="step", leave=False):
            name = expert_steps[i]
            weights = self._on_mesh(name)
            self.expert_log.append(name)
            fresh = zeros  # the step's noise input: () for the schedules without one
            if zeros and schedule.renoises(i):
                fresh = (jax.device_put(np.asarray(noise(i), np.float32), rows),)
            start = time.perf_counter()
            with profiling.compiling(self.compile_s, program):
                x, state, *carried = programs.call(
                    program, step, weights, x, state, embeds, timesteps[i], coeffs[i], guidance[name], placed, *fresh,
                    *carried, model=self.config, sharding=sharding, attention=self.attention_options, cache=cache,
                    conditioning=mode)
            x.block_until_ready()  # honest step times and progress bar; the step itself is seconds on real sizes
            self.step_seconds.append(time.perf_counter() - start)
            self.first_step_end = self.first_step_end or time.time()
        if carried:
            self.cache_log.append(step_cache.summary(spec, carried[0], distributed.to_host))
            if spec.calibrate:
                ratios = ",".join(repr(r) for r in self.cache_log[-1]["mag_ratios"]["cond"])
                log.info("MagCache calibration: --cache mag:THRESHOLD:%s (the cond branch's ratios; each branch's "
                         "are in metrics.json)", ratios)
        out = distributed.to_host(x)
        if mode == "first_frame":  # diffusers: (1 - mask) * condition + mask * latents, mask 0 on frame 0
            out = np.concatenate([np.asarray(image["condition"], np.float32), out[:, :, 1:]], axis=2)
        return out
