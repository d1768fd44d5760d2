"""Which Wan model a diffusers folder holds, decided from its config files alone (no weights read).

Implemented: Wan 2.1 text-to-video (one transformer, the z16 VAE), Wan 2.2 T2V-A14B (a high-noise `transformer` and
a low-noise `transformer_2`, switched at `boundary_ratio`), Wan 2.2 TI2V-5B (one timestep per token,
`expand_timesteps`, over the z48 VAE; text to video, or from a first frame), and image to video
(WanImageToVideoPipeline): Wan 2.1 I2V-14B (a CLIP image encoder and the first frame's latents and mask as extra
input channels) and Wan 2.2 I2V-A14B (two experts, the latents and mask only). `model_kind` returns what a run needs
to know of them as a ModelKind; the `check_*` functions refuse anything else (a VAE or transformer the decoder and
the step do not implement, parts that do not fit together) with one line naming the file, what was expected and what
was found. tpu_wan.models.checkpoints reads the files and calls them before any entry point loads or compiles.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tpu_wan.core.config import VAE_SPATIAL_BY_KIND, VAE_TEMPORAL
from tpu_wan.core.errors import CheckpointError

COMPONENTS = ("tokenizer", "text_encoder", "transformer", "vae", "scheduler")
IMAGE_COMPONENTS = ("image_encoder", "image_processor")  # Wan 2.1 I2V's CLIP, in a WanImageToVideoPipeline folder
MASK_CHANNELS = 4  # I2V's frame mask: one channel per video frame of a latent frame (the VAE's 4x in time)
EXPERTS = ("transformer", "transformer_2")  # high-noise first: diffusers runs `transformer` while t >= boundary


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """What a model folder decides about a run beyond the transformer's own config.json."""

    experts: tuple[str, ...] = ("transformer",)  # the transformer folders, in the order the steps use them
    boundary_ratio: float | None = None  # two experts: `transformer` runs the steps with t >= ratio x train steps
    expand_timesteps: bool = False  # one timestep per video token (TI2V), as diffusers' WanPipeline builds them
    vae: str = "wan2.1"  # a key of VAE_KINDS
    patch_size: tuple[int, int, int] = (1, 2, 2)  # the transformer's (frames, height, width) patch
    # Image to video (WanImageToVideoPipeline): the first frame's latents and a frame mask join the noise as input
    # channels ("concat"); `image_encoder`: CLIP image embeddings join the text in cross-attention (Wan 2.1 I2V).
    conditioning: str | None = None
    image_encoder: bool = False

    @property
    def family(self) -> str:
        """The model family whose defaults apply (tpu_wan.core.config.FAMILY_PRESETS)."""
        if self.conditioning == "concat":
            return "wan2.2-i2v-a14b" if len(self.experts) > 1 else "wan2.1-i2v"
        return "wan2.2-a14b" if len(self.experts) > 1 else "wan2.2-ti2v" if self.expand_timesteps else "wan2.1"

    @property
    def takes_image(self) -> bool:
        """Generates from a first frame: always (I2V), or when given one (TI2V: it replaces the first latent frame)."""
        return self.conditioning == "concat" or self.expand_timesteps

    @property
    def needs_image(self) -> bool:
        return self.conditioning == "concat"

    @property
    def takes_last_image(self) -> bool:
        """A last frame too, where diffusers' WanImageToVideoPipeline takes one: the mask-and-latents models
        without an image encoder (Wan 2.2 I2V-A14B). With one, it needs a first-last-frame transformer (FLF2V's
        two images' positions), which is not implemented."""
        return self.conditioning == "concat" and not self.image_encoder

    @property
    def z_dim(self) -> int:
        return VAE_KINDS[self.vae]["z_dim"]

    @property
    def vae_spatial(self) -> int:
        return VAE_KINDS[self.vae]["scale_factor_spatial"]

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: the VAE's compression x the transformer's patch (diffusers
        rounds other sizes down; we refuse them)."""
        return self.vae_spatial * max(self.patch_size[1:])

    def boundary_timestep(self, num_train_timesteps: int) -> float | None:
        """The timestep from which (downwards, exclusive) `transformer_2` runs, as WanPipeline computes it."""
        return None if self.boundary_ratio is None else self.boundary_ratio * num_train_timesteps


# The VAEs our decoder (tpu_wan.models.vae_modules) implements: config.json values as diffusers' convert script
# writes them, each also diffusers' default where the file leaves a key out (the Wan 2.1 VAE's).
VAE_KINDS = {
    "wan2.1": {"z_dim": 16, "is_residual": False, "patch_size": None, "out_channels": 3,
               "scale_factor_spatial": VAE_SPATIAL_BY_KIND["wan2.1"], "scale_factor_temporal": VAE_TEMPORAL},
    "wan2.2": {"z_dim": 48, "is_residual": True, "patch_size": 2, "out_channels": 12,
               "scale_factor_spatial": VAE_SPATIAL_BY_KIND["wan2.2"], "scale_factor_temporal": VAE_TEMPORAL},
}
WAN21_VAE = VAE_KINDS["wan2.1"]

# model_index.json entries beyond COMPONENTS that diffusers' Wan pipelines write. diffusers writes an unused one as
# null, [null, null] or false (tiny-random has all three), so only a set one counts. Those in REFUSED_ENTRIES are
# another task; an entry in neither is refused too: its effect on a run is unknown.
WAN22_ENTRIES = ("transformer_2", "boundary_ratio", "expand_timesteps")
REFUSED_ENTRIES = {
    "image_encoder": "image encoders outside WanImageToVideoPipeline",
    "image_processor": "image encoders outside WanImageToVideoPipeline",
}
PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
# diffusers' other Wan pipelines: the same files, another task.
PIPELINE_CLASSES = {
    "WanVideoToVideoPipeline": "video-to-video models",
    "WanVACEPipeline": "VACE models",
    "WanAnimatePipeline": "Wan-Animate models",
}


def is_set(value) -> bool:
    return not (value is None or value is False or value == [None, None])


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def check_pipeline(index_file: Path, index: dict) -> None:
    """A WanPipeline whose entries beyond COMPONENTS are Wan 2.2's (two experts with their boundary, or per-token
    timesteps), or a WanImageToVideoPipeline with those and its CLIP image encoder's, set consistently."""
    cls = index.get("_class_name")
    allowed = COMPONENTS + WAN22_ENTRIES + (IMAGE_COMPONENTS if cls == "WanImageToVideoPipeline" else ())
    extra = [key for key, value in index.items() if not key.startswith("_") and key not in allowed and is_set(value)]
    order = {key: i for i, key in enumerate(REFUSED_ENTRIES)}  # named in this order, whatever the file's
    extra.sort(key=lambda key: order.get(key, len(order)))
    if cls not in PIPELINES and cls not in PIPELINE_CLASSES:
        raise CheckpointError(f"{index_file}: expected _class_name {' or '.join(map(repr, PIPELINES))}, found {cls!r}")
    if cls not in PIPELINES or extra:
        found = ([] if cls in PIPELINES else [f"_class_name {cls!r}"]) + [
            key if isinstance(index[key], list) else f"{key}={_json(index[key])}" for key in extra]
        kinds = ([] if cls in PIPELINES else [PIPELINE_CLASSES[cls]]) + [
            REFUSED_ENTRIES.get(key, f"entries such as {key!r}") for key in extra]
        raise CheckpointError(
            f"{index_file}: expected a Wan text- or image-to-video folder (WanPipeline with {', '.join(COMPONENTS)}, "
            f"and for Wan 2.2 {', '.join(WAN22_ENTRIES)}; WanImageToVideoPipeline also with "
            f"{' and '.join(IMAGE_COMPONENTS)}), found {_and(found)} ({_and(list(dict.fromkeys(kinds)))} are not "
            f"implemented)"
        )
    if cls == "WanImageToVideoPipeline" and is_set(index.get("image_encoder")) != is_set(index.get("image_processor")):
        raise CheckpointError(f"{index_file}: expected image_encoder and image_processor together (CLIP and its "
                              f"preprocessing), found only one of them")
    two, ratio = is_set(index.get("transformer_2")), index.get("boundary_ratio")
    if two and ratio is None:
        raise CheckpointError(f"{index_file}: expected boundary_ratio with transformer_2 (the fraction of the "
                              f"training timesteps where the low-noise expert takes over), found none")
    if ratio is not None and not two:
        raise CheckpointError(f"{index_file}: expected transformer_2 with boundary_ratio={_json(ratio)} (the "
                              f"low-noise expert), found none")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise CheckpointError(f"{index_file}: expected boundary_ratio to be a number in [0, 1], found {_json(ratio)}")
    expand = index.get("expand_timesteps", False)
    if expand not in (None, True, False):
        raise CheckpointError(f"{index_file}: expected expand_timesteps true or false, found {_json(expand)}")


def check_experts(folder: Path, index: dict, configs: dict[str, dict]) -> None:
    """Two experts are one architecture: the same config.json (one compiled step serves both)."""
    if len(configs) < 2:
        return
    first, second = (configs[e] for e in EXPERTS)
    keys = sorted(k for k in set(first) | set(second) if not k.startswith("_") and first.get(k) != second.get(k))
    if keys:
        found = ", ".join(f"{k}={_json(first.get(k))} vs {_json(second.get(k))}" for k in keys)
        raise CheckpointError(f"{folder / 'transformer_2' / 'config.json'}: expected the config of "
                              f"transformer/config.json (both experts run one compiled step), found {found}")


def _list(config_file: Path, config: dict, key: str, default: list) -> list:
    value = config.get(key, default)
    if not isinstance(value, list):
        raise CheckpointError(f"{config_file}: expected {key} to be a list, found {_json(value)}")
    return value


def _vae_mismatches(vae_file: Path, vae: dict, kind: str) -> list[tuple[str, str, str]]:
    """(name, expected, found) of each way `vae` differs from VAE_KINDS[kind]: the table's keys, then the layers
    they imply (one 2x upsampling per dim_mult step after the first, times the pixel patch; one 2x temporal
    upsampling per true temperal_downsample; one latents_mean and latents_std entry per latent channel)."""
    want = VAE_KINDS[kind]
    config = {**WAN21_VAE, **vae}  # diffusers' defaults for the keys the file leaves out
    mismatches = [(key, _json(value), _json(config[key])) for key, value in want.items() if config[key] != value]
    upsamplings = len(_list(vae_file, vae, "dim_mult", [1, 2, 4, 4])) - 1  # diffusers' default dim_mult
    temporal = _list(vae_file, vae, "temperal_downsample", [False, True, True])
    layers = {
        "2**(len(dim_mult)-1)": (want["scale_factor_spatial"] // (want["patch_size"] or 1), 2**upsamplings),
        "len(temperal_downsample)": (upsamplings, len(temporal)),
        "2**sum(temperal_downsample)": (want["scale_factor_temporal"], 2 ** sum(bool(t) for t in temporal)),
        **{f"len({key})": (want["z_dim"], len(_list(vae_file, vae, key, [0.0] * WAN21_VAE["z_dim"])))
           for key in ("latents_mean", "latents_std")},
    }
    return mismatches + [(name, _json(w), _json(h)) for name, (w, h) in layers.items() if w != h]


def check_vae(vae_file: Path, vae: dict) -> str:
    """The VAE kind (a key of VAE_KINDS) `vae` is; refuses a VAE that is neither, against the closer one."""
    mismatches = {kind: _vae_mismatches(vae_file, vae, kind) for kind in VAE_KINDS}
    for kind, wrong in mismatches.items():
        if not wrong:
            return kind
    kind = min(mismatches, key=lambda k: len(mismatches[k]))
    wrong = mismatches[kind]
    other = [k for k in VAE_KINDS if k != kind]
    raise CheckpointError(
        f"{vae_file}: expected the {_vae_name(kind)} VAE our decoder implements "
        f"({', '.join(f'{name}={want}' for name, want, _ in wrong)}), found "
        f"{', '.join(f'{name}={have}' for name, _, have in wrong)} (the {_and([_vae_name(k) for k in other])} "
        f"VAE is the other one implemented)"
    )


def _vae_name(kind: str) -> str:
    return {"wan2.1": "Wan 2.1", "wan2.2": "Wan 2.2"}[kind]


# transformer/config.json keys that add image conditioning (diffusers' I2V and FLF2V transformers); null in
# a text-to-video transformer and in Wan 2.2 I2V-A14B's.
IMAGE_CONDITIONING = ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
EXPANDED_PATCH = [1, 2, 2]  # WanPipeline's per-token timesteps take every 2nd latent row and column


def check_transformer(transformer_file: Path, dit: dict, z_dim: int, expand_timesteps: bool,
                      image_pipeline: bool = False, image_encoder: bool = False) -> None:
    """A transformer denoising the VAE's latents: z_dim channels out, and in z_dim (text to video; TI2V's first
    frame replaces noise in place) or z_dim + MASK_CHANNELS + z_dim (image to video: the noise, the frame mask, the
    first frame's latents); CLIP's image embeddings in cross-attention exactly where the folder has an image encoder;
    with per-token timesteps, the 1x2x2 patches diffusers builds them for."""
    concat = image_pipeline and not expand_timesteps
    image = [f"{key}={_json(dit[key])}" for key in IMAGE_CONDITIONING if dit.get(key) is not None]
    channels = {"in_channels": dit.get("in_channels", 16)}
    channels["out_channels"] = dit.get("out_channels") or channels["in_channels"]  # diffusers' fallback
    want = {"in_channels": 2 * z_dim + MASK_CHANNELS if concat else z_dim, "out_channels": z_dim}
    wrong = [f"{key}={value}" for key, value in channels.items() if value != want[key]]
    if concat and image_encoder:
        image_ok = dit.get("image_dim") is not None and dit.get("added_kv_proj_dim") is not None
        image_ok = image_ok and dit.get("pos_embed_seq_len") is None
    else:
        image_ok = not image
    if not image_ok or wrong:
        if concat:
            expected = (f"an image-to-video transformer (in_channels = 2 x the VAE's z_dim + {MASK_CHANNELS} = "
                        f"{want['in_channels']}, out_channels = {z_dim}, "
                        + ("image_dim and added_kv_proj_dim set for the image encoder's embeddings, "
                           "pos_embed_seq_len=null" if image_encoder else
                           "image_dim, added_kv_proj_dim and pos_embed_seq_len null: the folder has no image encoder")
                        + ")")
            why = ("first-last-frame transformers (FLF2V) are not implemented" if dit.get("pos_embed_seq_len")
                   else "its inputs are the noise, the frame mask and the first frame's latents")
            found = [f"{key}={_json(dit.get(key))}" for key in IMAGE_CONDITIONING] + wrong
        else:
            unset = ", ".join(f"{key}=null" for key in IMAGE_CONDITIONING)
            expected = (f"a text-to-video transformer ({unset}, in_channels and out_channels = the VAE's z_dim "
                        f"{z_dim})")
            why = ("an image-to-video transformer runs in a WanImageToVideoPipeline folder" if image else
                   "a transformer denoises the VAE's latent channels")
            found = image + wrong
        raise CheckpointError(f"{transformer_file}: expected {expected}, found {', '.join(found)} ({why})")
    patch = list(dit.get("patch_size", EXPANDED_PATCH))
    if expand_timesteps and patch != EXPANDED_PATCH:
        raise CheckpointError(f"{transformer_file}: expected patch_size {_json(EXPANDED_PATCH)} with "
                              f"expand_timesteps (one timestep per 1x2x2 token), found {_json(patch)}")


def model_kind(index: dict, vae_kind: str, dit: dict) -> ModelKind:
    """The ModelKind of a folder whose files passed the checks above."""
    two = is_set(index.get("transformer_2"))
    return ModelKind(
        experts=EXPERTS if two else EXPERTS[:1],
        boundary_ratio=float(index["boundary_ratio"]) if two else None,
        expand_timesteps=bool(index.get("expand_timesteps")),
        vae=vae_kind,
        patch_size=tuple(dit.get("patch_size", EXPANDED_PATCH)),
        conditioning="concat" if is_image_pipeline(index) and not index.get("expand_timesteps") else None,
        image_encoder=is_set(index.get("image_encoder")),
    )


def is_image_pipeline(index: dict) -> bool:
    return index.get("_class_name") == "WanImageToVideoPipeline"
