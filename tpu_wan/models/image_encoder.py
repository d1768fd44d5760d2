"""Stage 1 for image to video: an image (and a last one, where the model takes it) -> what the transformer is
conditioned on, exactly as diffusers' WanImageToVideoPipeline computes it.

  - CLIP image embeddings (Wan 2.1 I2V): transformers' CLIP vision model through torchax on the mesh, as UMT5
    runs, on the image as the folder's own image processor prepares it. diffusers takes the vision model's
    second-to-last hidden states, the output of all its layers but the last: only those layers run here.
  - The conditioning latents: the image resized to the video's size by diffusers' VideoProcessor, as the first
    frame of a video whose other frames are zeros (and whose last is the last image), through our VAE encoder
    (tpu_wan.models.vae_encoder), its mode normalised as the pipeline does. For the I2V models the frame mask goes
    in front (`condition`: [4 + C, F, h, w], the transformer's extra input channels); TI2V encodes the image
    alone, one latent frame [C, 1, h, w] that replaces the first frame of the latents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from pathlib import Path

import jax
import numpy as np

from tpu_wan.core.config import VAE_TEMPORAL
from tpu_wan.core.errors import ConfigError, UserError
from tpu_wan.models.kinds import MASK_CHANNELS, ModelKind
from tpu_wan.runtime import distributed, profiling, programs
from tpu_wan.runtime import mesh as mesh_lib

log = logging.getLogger("tpu_wan")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image(path: str | Path, flag: str = "--image"):
    """The image file as diffusers' `load_image` reads it (EXIF orientation applied, RGB); refuses a missing,
    unreadable or non-image file in one line."""
    import PIL.Image
    import PIL.ImageOps

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{flag} {path}: expected a PNG, JPEG or WebP file ({', '.join(IMAGE_SUFFIXES)}), found "
                        f"{path.suffix or 'no suffix'}")
    if not path.is_file():
        raise UserError(f"{flag} {path}: expected an image file, found no such file")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, PIL.UnidentifiedImageError, ValueError) as err:
        raise UserError(f"{flag} {path}: expected a readable image, found {type(err).__name__}: {err}") from None


class ClipImageEncoder:
    """The folder's CLIP vision model (image_encoder/, preprocessing from image_processor/) loaded once onto a mesh
    (weights by mesh.CLIP_RULES, images split over dp)."""

    def __init__(self, model_path: Path, mesh, dtype: str, *, abstract: bool = False):
        from tpu_wan.models import checkpoints
        from tpu_wan.runtime import loading, torchax_env

        model = checkpoints.empty_image_encoder(model_path)
        mesh_lib.check_heads(mesh, model.config.num_attention_heads, "image encoder")
        self.config = model.config
        self.processor = None if abstract else checkpoints.load_image_processor(model_path)
        self.mesh = mesh
        expected = checkpoints.expected_weights(model, dtype)
        buffers, forward = torchax_env.functionalize(model, scan=checkpoints.CLIP_LAYERS)
        del model
        folder = model_path / "image_encoder"
        self.weights = loading.place_model(buffers, expected, folder, mesh_lib.CLIP_RULES, mesh, abstract=abstract,
                                           layers=checkpoints.CLIP_LAYERS,
                                           key_prefix="" if abstract else checkpoints.clip_key_prefix(folder))
        # all layers but the last ran: the last hidden state is diffusers' hidden_states[-2]
        self._encode = jax.jit(lambda weights, pixels: forward(weights, pixel_values=pixels, return_dict=False)[0])
        self.programs = {}
        self.compile_s: dict[str, float] = {}

    @property
    def tokens(self) -> int:
        """Image tokens per image: the class token and one per patch."""
        return (self.config.image_size // self.config.patch_size) ** 2 + 1

    def _rows(self, n: int) -> int:
        dp = self.mesh.shape["dp"]
        return -(-n // dp) * dp  # padded to a multiple of dp with blank images, dropped after the call

    def programs_for(self, num_images: int) -> dict:
        """name -> (jitted, abstract arguments) of the program `encode` runs for `num_images` images."""
        rows, size = self._rows(num_images), self.config.image_size
        pixels = jax.ShapeDtypeStruct((rows, 3, size, size), np.float32,
                                      sharding=mesh_lib.batch_sharding(self.mesh, rows, 4))
        return {f"clip {pixels.shape}": (self._encode, (self.weights, pixels))}

    def pixels(self, images) -> np.ndarray:
        """[N, 3, S, S] float32: the images as the folder's image processor prepares them for CLIP."""
        return self.processor(images=list(images), return_tensors="np")["pixel_values"].astype(np.float32)

    def encode(self, images) -> np.ndarray:
        """[N, tokens, D] image embeddings in the encoder's dtype (N images, one call)."""
        pixels = self.pixels(images)
        n, rows = len(pixels), self._rows(len(pixels))
        pixels = jax.device_put(np.pad(pixels, ((0, rows - n), (0, 0), (0, 0), (0, 0))),
                                mesh_lib.batch_sharding(self.mesh, rows, 4))
        name = f"clip {pixels.shape}"
        profiling.remember_program(self.programs, name, self._encode, self.weights, pixels)
        with profiling.compiling(self.compile_s, name):
            out = programs.call(name, self._encode, self.weights, pixels, model=self.config)
        return distributed.to_host(out)[:n]


def pixel_video(image, last_image, height: int, width: int, frames: int, kind: ModelKind, spatial: int) -> np.ndarray:
    """[1, 3, T, height, width] float32 in [-1, 1]: the video diffusers' prepare_latents encodes: the image alone
    (TI2V, T = 1), else the image, zeros and (where given) the last image, T = frames."""
    from diffusers.video_processor import VideoProcessor

    processor = VideoProcessor(vae_scale_factor=spatial)
    first = processor.preprocess(image, height=height, width=width).numpy().astype(np.float32)[:, :, None]
    if kind.expand_timesteps:
        return first
    video = np.zeros((1, 3, frames, height, width), np.float32)
    video[:, :, :1] = first
    if last_image is not None:
        video[:, :, -1:] = processor.preprocess(last_image, height=height, width=width).numpy()[:, :, None]
    return video


def frame_mask(frames: int, latent_hw: tuple[int, int], last_image: bool, temporal: int = 4) -> np.ndarray:
    """[MASK_CHANNELS, F, h, w] float32, WanImageToVideoPipeline's mask: 1 on the given video frames (the first,
    and the last with a last image), 0 elsewhere; frame 0 repeated `temporal` times so the frames group into
    latent frames of `temporal` channels each."""
    given = np.zeros(frames, np.float32)
    given[0] = 1
    if last_image:
        given[-1] = 1
    per_frame = np.concatenate([np.repeat(given[:1], temporal), given[1:]])  # [4 + T - 1] = [4F]
    mask = per_frame.reshape(-1, temporal).T  # [temporal, F]: latent frame f's video frames as channels
    assert mask.shape[0] == MASK_CHANNELS
    return np.broadcast_to(mask[:, :, None, None], (*mask.shape, *latent_hw)).astype(np.float32)


def condition(vae_encoder, video: np.ndarray, kind: ModelKind, last_image: bool) -> np.ndarray:
    """The conditioning of one video [Cc, F, h, w] float32 from its pixel video (pixel_video): the VAE latents'
    mode, normalised as the pipeline does ((x - mean) * (1 / std) in float32), after the frame mask for the I2V
    models."""
    config = vae_encoder.config
    mean = np.asarray(config.latents_mean, np.float32).reshape(-1, 1, 1, 1)
    inv_std = 1.0 / np.asarray(config.latents_std, np.float32).reshape(-1, 1, 1, 1)
    latents = (vae_encoder.encode(video)[0] - mean) * inv_std  # [C F h w]
    if kind.expand_timesteps:
        return latents
    return np.concatenate([frame_mask(video.shape[2], latents.shape[-2:], last_image), latents])


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """What stage 1 encodes for image to video: an image per prompt (and a last image per prompt, or None), at the
    video size stage 2 then generates."""

    images: tuple[str, ...]
    last_images: tuple[str, ...] | None
    height: int
    width: int
    frames: int


def check_request(model_id: str, kind: ModelKind, request: ImageRequest | None) -> None:
    """Refuses an image for a text-only model, none for an image-only one, a last image where the model takes
    none, and a size the model cannot generate."""
    if request is None:
        if kind.needs_image:
            raise ConfigError(f"--image: expected an image for {model_id} (an image-to-video model), found none")
        return
    if not kind.takes_image:
        raise ConfigError(f"--image: expected an image-to-video model (WanImageToVideoPipeline, or TI2V-5B), found "
                          f"{model_id}, a text-to-video model")
    if request.last_images and not kind.takes_last_image:
        why = ("its CLIP embeddings would need a first-last-frame transformer (FLF2V)" if kind.image_encoder else
               "TI2V conditions on the first frame only")
        raise ConfigError(f"--last_image: expected a model that takes a last frame (Wan 2.2 I2V-A14B), found "
                          f"{model_id} ({why})")
    for flag, value in (("--height", request.height), ("--width", request.width)):
        if value <= 0 or value % kind.size_multiple:
            raise ConfigError(f"{flag} must be a multiple of {kind.size_multiple} for {model_id}, found {value}")
    if request.frames < 1 or (request.frames - 1) % VAE_TEMPORAL:
        raise ConfigError(f"--frames must be 4n+1 (1, 5, 9, ..., 81), found {request.frames}")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_images(request: ImageRequest) -> dict[str, object]:
    """path -> image, every distinct file of the request read (a bad one refused before any model loads)."""
    paths = {path: "--image" for path in request.images}
    paths.update({path: "--last_image" for path in request.last_images or ()})
    return {path: load_image(path, flag) for path, flag in paths.items()}


class ImageConditioner:
    """The image models of an image-to-video model loaded once onto a mesh: CLIP where the model has an image encoder,
    and the VAE encoder (float32, as the pipelines' VAE). `timed(component, part)`: a context manager around each
    load and run (profiling.Recorder.section's parts)."""

    def __init__(self, model_path: Path, kind: ModelKind, mesh, dtype: str, *, timed=None, abstract: bool = False,
                 conv: str = "auto"):
        """`conv`: the VAE encoder's convolutions (tpu_wan.models.vae_conv)."""
        from tpu_wan.models.vae_encoder import VaeEncoder

        self.kind = kind
        self._timed = timed or (lambda part: contextlib.nullcontext())
        self.models = {}  # component -> the model, for its metrics
        with self._timed("load"):
            if kind.image_encoder:
                self.models["image_encoder"] = ClipImageEncoder(model_path, mesh, dtype, abstract=abstract)
            self.models["vae_encoder"] = VaeEncoder(model_path, mesh, abstract=abstract, conv=conv)

    @property
    def weights(self) -> dict:
        """component -> its weights on the mesh."""
        return {name: getattr(m, "weights", None) or m.params for name, m in self.models.items()}

    def programs_for(self, num_images: int, height: int, width: int, frames: int) -> dict:
        """name -> (jitted, abstract arguments, the model config its calls key it with) of each program `encode` runs
        for `num_images` distinct images at that video size."""
        out = {}
        if "image_encoder" in self.models:
            clip = self.models["image_encoder"]
            out.update({n: (*p, clip.config) for n, p in clip.programs_for(num_images).items()})
        vae = self.models["vae_encoder"]
        video = (1, 3, 1 if self.kind.expand_timesteps else frames, height, width)
        out.update({n: (*p, vae.config) for n, p in vae.programs_for(video).items()})
        return out

    def input_shapes(self, rows: int, latents_shape: tuple[int, ...]) -> dict:
        """name -> shape of the Denoiser's image inputs (transformer.model_input) for `rows` latents rows of shape
        [.., C, F, h, w]."""
        _, z, f, h, w = latents_shape
        shapes = {"condition": (rows, z, 1, h, w) if self.kind.expand_timesteps else (rows, MASK_CHANNELS + z, f, h, w)}
        if "image_encoder" in self.models:
            clip = self.models["image_encoder"]
            shapes["embeds"] = (rows, clip.tokens, clip.config.hidden_size)
        return shapes

    def encode(self, request: ImageRequest, images: dict) -> dict[str, np.ndarray]:
        """The image tensors of stage 1's file (artifacts.IMAGE_TENSORS), one row per prompt: image_condition
        [P, Cc, F, h, w] float32 and, with an image encoder, image_embeds [P, tokens, D]. `images`: path -> image
        (read_images). Each distinct image (and pair with its last image) is encoded once."""
        lasts = request.last_images or (None,) * len(request.images)
        out = {}
        with self._timed("run"):
            if "image_encoder" in self.models:
                firsts = list(dict.fromkeys(request.images))
                embeds = dict(zip(firsts, self.models["image_encoder"].encode([images[p] for p in firsts])))
                out["image_embeds"] = np.stack([embeds[p] for p in request.images])
            vae, encoded = self.models["vae_encoder"], {}
            for first, last in dict.fromkeys(zip(request.images, lasts)):
                video = pixel_video(images[first], None if last is None else images[last], request.height,
                                    request.width, request.frames, self.kind, vae.spatial)
                encoded[first, last] = condition(vae, video, self.kind, last is not None)
            out["image_condition"] = np.stack([encoded[pair] for pair in zip(request.images, lasts)])
        return out
