"""Stage 3: Wan VAE decode, normalised latents [N, C, F, H, W] -> frames [N, T, H*8, W*8, 3] in [0, 1].

De-normalisation and post-processing follow diffusers' WanPipeline (latents / (1 / std) + mean, decode,
(x / 2 + 0.5) clamped to [0, 1]) op for op, so frames match diffusers to float32 rounding. The decoder runs
diffusers' AutoencoderKLWan through torchax, jitted; the VAE stays float32 as in diffusers.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan import checkpoints, mesh as mesh_lib, torchax_env


class VaeDecoder:
    """AutoencoderKLWan's decoder loaded once onto a mesh (weights replicated, videos split over dp)."""

    def __init__(self, model_path: Path, mesh):
        vae = checkpoints.load_vae(model_path)
        self.config = vae.config
        self.mesh = mesh
        weights, decode = torchax_env.functionalize(vae, method="decode")
        del vae
        self.weights = mesh_lib.shard_weights(weights, (), mesh)
        mean = jnp.asarray(self.config.latents_mean, jnp.float32).reshape(1, -1, 1, 1, 1)
        inv_std = 1.0 / jnp.asarray(self.config.latents_std, jnp.float32).reshape(1, -1, 1, 1, 1)

        def run(weights, latents):  # [N C F H W] -> [N T H W 3]
            z = latents / inv_std + mean
            video = decode(weights, z, return_dict=False)[0]  # [N 3 T H W] in [-1, 1]
            frames = jnp.clip(video * 0.5 + 0.5, 0.0, 1.0)
            return frames.transpose(0, 2, 3, 4, 1)

        self._run = jax.jit(run)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """float32 frames [N, T, H, W, 3] in [0, 1] for normalised latents [N, C, F, h, w]."""
        x = jax.device_put(np.asarray(latents, np.float32), mesh_lib.batch_sharding(self.mesh, latents.shape[0], 5))
        return np.asarray(self._run(self.weights, x))
