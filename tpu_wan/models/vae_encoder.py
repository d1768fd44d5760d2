"""Stage 1 for image to video: Wan VAE encode, video [V, 3, T, H, W] in [-1, 1] -> latents [V, C, F, h, w].

A native Flax NNX port of diffusers' AutoencoderKLWan encoder, both kinds (modules in
tpu_wan/models/vae_encoder_modules.py), reading only encoder.* and quant_conv.* of the VAE weights file. diffusers'
image-to-video pipelines condition on the latent distribution's mode (`retrieve_latents(..., "argmax")`): its
mean, the first C of the encoder's 2C output channels; `moments` gives all 2C (mean, log-variance).

F = (T - 1) / 4 + 1: one program, a `lax.scan` over chunks of four video frames (frame 0's chunk padded,
vae_encoder_modules explains how it stays diffusers' one-frame first call) whose carry is the causal caches, one
latent frame per trip. Activations are laid out as the decoder's (vae.activation_sharding, decided by the latent
grid: every layer's H and W are multiples of it).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tpu_wan.core.errors import UserError
from tpu_wan.models.vae import ENCODER_PREFIXES, VaeHalf, layer_constraint, layer_conv
from tpu_wan.models.vae_encoder_modules import FRAMES_PER_CALL, WanVaeEncoder
from tpu_wan.runtime import distributed, profiling, programs
from tpu_wan.runtime import mesh as mesh_lib


class VaeEncoder(VaeHalf):
    """AutoencoderKLWan's encoder on a mesh (VaeHalf)."""

    def __init__(self, model_path: Path, mesh, dtype: str = "float32", *, abstract: bool = False, conv: str = "auto"):
        super().__init__(model_path, mesh, dtype, module=WanVaeEncoder, prefixes=ENCODER_PREFIXES, abstract=abstract,
                         conv=conv)
        self.spatial = 8 * (self.config.patch_size or 1)  # pixels per latent along H and W
        self._moments = jax.jit(self._encode_chunks)

    def latent_shape(self, video_shape: tuple[int, ...]) -> tuple[int, ...]:
        """[V, C, F, h, w] of the latents of a video [V, 3, T, H, W]; refuses a shape the VAE cannot encode."""
        if len(video_shape) != 5 or video_shape[1] != 3:
            raise UserError(f"vae encoder input: expected a video [V, 3, T, H, W], found {list(video_shape)}")
        v, _, t, h, w = video_shape
        s = self.spatial
        if (t - 1) % FRAMES_PER_CALL or h % s or w % s:
            raise UserError(
                f"vae encoder input: expected {FRAMES_PER_CALL}k + 1 frames and height and width multiples of {s}, "
                f"found {t} frames of {h}x{w}"
            )
        return (v, self.config.z_dim, (t - 1) // FRAMES_PER_CALL + 1, h // s, w // s)

    def _encode_chunks(self, params: nnx.State, video: jax.Array) -> jax.Array:
        """Moments [V 2C F h w] of a video [V 3 T H W]: chunk f (frame 0 and padding, then frames 4f-3 .. 4f) as
        trip f of a scan whose carry is the causal caches (from zeros)."""
        model = nnx.merge(self._graphdef, params)
        grid = self.latent_shape(video.shape)[-2:]
        constrain, conv = layer_constraint(self.mesh, grid), layer_conv(self.mesh, self.conv_for(video.shape), grid)
        x = video.transpose(0, 2, 3, 4, 1).astype(self.dtype)  # [V T H W 3]
        n, _, h, w, c = x.shape
        padding = jnp.zeros((n, FRAMES_PER_CALL - 1, h, w, c), x.dtype)
        x = jnp.concatenate([x[:, :1], padding, x[:, 1:]], axis=1)
        chunks = x.reshape(n, -1, FRAMES_PER_CALL, h, w, c).swapaxes(0, 1)  # [F V 4 H W 3]

        def encode(caches, chunk, first):
            return model(constrain(chunk), caches, first=first, constrain=constrain, conv=conv)

        _, before_first = jax.eval_shape(encode, None, chunks[0], True)  # the caches' shapes
        caches = jax.tree.map(lambda c: constrain(jnp.zeros(c.shape, c.dtype)), before_first)

        def step(caches, xs):
            moments, caches = encode(caches, *xs)
            return caches, moments[:, 0].astype(jnp.float32)  # [V h w 2C]

        _, moments = jax.lax.scan(step, caches, (chunks, jnp.arange(chunks.shape[0]) == 0))  # [F V h w 2C]
        return moments.transpose(1, 4, 0, 2, 3)  # [V 2C F h w]

    def programs_for(self, video_shape: tuple[int, ...]) -> dict:
        """name -> (jitted, abstract arguments) of the program `moments` runs for a video [V, 3, T, H, W]."""
        self.latent_shape(video_shape)
        sharding = mesh_lib.batch_sharding(self.mesh, video_shape[0], len(video_shape))
        video = jax.ShapeDtypeStruct(video_shape, jnp.float32, sharding=sharding)
        self.settle_conv(self._encode_chunks, self.params, video)
        return {"vae_encode": (self._moments, (self.params, video))}

    def moments(self, video: np.ndarray) -> np.ndarray:
        """The encoder's output [V, 2C, F, h, w] (mean, then log-variance before diffusers' clamp) for a video
        [V, 3, T, H, W] in [-1, 1]."""
        video = np.asarray(video, np.float32)
        self.latent_shape(video.shape)
        video = jax.device_put(video, mesh_lib.batch_sharding(self.mesh, video.shape[0], video.ndim))
        self.settle_conv(self._encode_chunks, self.params, video)
        with profiling.compiling(self.compile_s, "vae_encode"):
            out = programs.call("vae_encode", self._moments, self.params, video, model=self.config,
                                conv=self.conv_for(video.shape))
        profiling.remember_program(self.programs, "vae_encode", self._moments, self.params, video)
        return distributed.to_host(out)

    def encode(self, video: np.ndarray) -> np.ndarray:
        """The latent distribution's mode [V, C, F, h, w] (diffusers' `retrieve_latents(encode(video), "argmax")`)."""
        return self.moments(video)[:, : self.config.z_dim]
