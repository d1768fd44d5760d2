"""Stage 1: prompts -> UMT5 embeddings [P, S, Et], identical to diffusers' WanPipeline.encode_prompt.

The tokenizer runs on the host; the UMT5 encoder runs on the mesh through torchax, weights sharded by
mesh.UMT5_RULES and prompts split over dp.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tpu_wan.models import checkpoints
from tpu_wan.runtime import distributed, loading, profiling, programs, torchax_env
from tpu_wan.runtime import mesh as mesh_lib

log = logging.getLogger("tpu_wan")
ENCODE_BATCH = 16  # prompts per encoder call: a prompt file of any length runs in bounded memory
# UMT5's layers run as one loop over layers with stacked weights (tpu_wan.runtime.stacking): one layer compiled, not 24.
LAYERS = ("encoder.block",)


def clean_prompt(text: str) -> str:
    """diffusers' Wan prompt cleaning (ftfy, HTML unescape, whitespace collapse), so tokens match."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    return prompt_clean(text)


class TextEncoder:
    """UMT5 encoder loaded once onto a mesh; `encode` may be called for any number of prompts."""

    def __init__(self, model_path: Path, mesh, dtype: str, *, abstract: bool = False):
        """`abstract`: no tokenizer and no weights read, only their shapes and shardings, to compile the encoder
        for a slice that is not attached (tpu_wan.run.aot)."""
        model = checkpoints.empty_text_encoder(model_path)
        mesh_lib.check_heads(mesh, model.config.num_heads, "text encoder")
        self.config = model.config
        self.tokenizer = None if abstract else checkpoints.load_tokenizer(model_path)
        self.mesh = mesh
        self.dtype = dtype
        expected = checkpoints.expected_weights(model, dtype)
        buffers, forward = torchax_env.functionalize(model, scan=LAYERS)
        del model
        self.weights = loading.place_model(buffers, expected, model_path / "text_encoder", mesh_lib.UMT5_RULES, mesh,
                                           abstract=abstract, layers=LAYERS)

        def encode(weights, input_ids, mask):  # [B S] int32 each -> [B S D]
            hidden = forward(weights, input_ids, attention_mask=mask, return_dict=False)[0]
            # diffusers trims each row to its true token count and zero-pads back to S; the mask is a
            # prefix of ones, so that is exactly zeroing the masked positions.
            return jnp.where(mask[..., None] > 0, hidden, jnp.zeros((), hidden.dtype))

        self._encode = jax.jit(encode)
        self.programs = {}  # what ran, for profiling.temp_bytes
        self.compile_s: dict[str, float] = {}  # program -> seconds jax spent compiling it (profiling.compiling)

    def tokenize(self, prompts: Sequence[str], max_sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
        cleaned = [clean_prompt(p) for p in prompts]
        for i, ids in enumerate(self.tokenizer(cleaned, add_special_tokens=True)["input_ids"]):
            if len(ids) > max_sequence_length:
                log.warning(
                    "prompt %d has %d tokens: truncated to max_sequence_length=%d, as diffusers does: %.60s...",
                    i, len(ids), max_sequence_length, cleaned[i],
                )
        tokens = self.tokenizer(
            cleaned,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        return tokens["input_ids"].astype(np.int32), tokens["attention_mask"].astype(np.int32)

    def encode(self, prompts: Sequence[str], max_sequence_length: int = 512) -> np.ndarray:
        """[P, S, Et] embeddings in the encoder's dtype, zero past each prompt's token count."""
        chunks = [prompts[i : i + ENCODE_BATCH] for i in range(0, len(prompts), ENCODE_BATCH)]
        return np.concatenate([self._encode_batch(c, max_sequence_length) for c in chunks])

    def _encode_batch(self, prompts: Sequence[str], max_sequence_length: int) -> np.ndarray:
        ids, mask = self.tokenize(prompts, max_sequence_length)
        n = len(prompts)
        rows = self._rows(n)
        ids = np.pad(ids, ((0, rows - n), (0, 0)))
        mask = np.pad(mask, ((0, rows - n), (0, 0)))
        sharding = mesh_lib.batch_sharding(self.mesh, rows, 2)
        ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
        name = f"encode {ids.shape}"
        profiling.remember_program(self.programs, name, self._encode, self.weights, ids, mask)
        with profiling.compiling(self.compile_s, name):
            out = programs.call(name, self._encode, self.weights, ids, mask, model=self.config)
        return distributed.to_host(out)[:n]


    def _rows(self, n: int) -> int:
        dp = self.mesh.shape["dp"]
        return -(-n // dp) * dp  # the batch padded to a multiple of dp with empty rows, dropped after the call

    def programs_for(self, num_texts: int, max_sequence_length: int) -> dict:
        """name -> (jitted encode, abstract arguments, texts) of each distinct call `encode` makes for
        `num_texts` texts (prompts and the negative prompt), as profiling.remember_program records them; texts:
        how many real texts the call encodes (the first call of that program: only the last chunk is short)."""
        programs = {}
        for start in range(0, num_texts, ENCODE_BATCH):
            texts = min(ENCODE_BATCH, num_texts - start)
            rows = self._rows(texts)
            ids = jax.ShapeDtypeStruct((rows, max_sequence_length), jnp.int32,
                                       sharding=mesh_lib.batch_sharding(self.mesh, rows, 2))
            programs.setdefault(f"encode {ids.shape}", (self._encode, (self.weights, ids, ids), texts))
        return programs


def encode_prompts(
    encoder: TextEncoder, prompts: Sequence[str], negative_prompt: str, max_sequence_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_embeds [P, S, Et], negative_prompt_embeds [P, S, Et]) in one encoder call."""
    embeds = encoder.encode([*prompts, negative_prompt], max_sequence_length)
    n = len(prompts)
    negative = np.repeat(embeds[n:], n, axis=0)  # diffusers repeats the negative prompt per prompt
    return embeds[:n], negative
