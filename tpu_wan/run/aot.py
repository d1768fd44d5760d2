"""Compile-only runs (`--topology NAME --compile_only`): every program a generation runs, compiled by the TPU
compiler for a slice that need not be attached, and what the compiled programs say of it. Without a topology, for the
process's own devices (LocalTarget); with `export`, each compiled program is also written to a program directory
that runs load instead of compiling (tpu_wan.runtime.programs).

The models are built as in a real run (same classes, sharding rules and attention dispatch: the compiled Pallas
kernel on TPU, never interpret mode) with weights that are shapes and shardings only (`abstract=True`): no
weight file is read, and a local folder's or the packaged configs (checkpoints.resolve_configs) give the shapes.
Each program is lowered with the abstract arguments a real run would pass and compiled; its memory analysis,
cost analysis and optimized HLO (tpu_wan.tpu.hlo) give one entry of metrics.json (docs/FORMATS.md). The compiler's
numbers are estimates of one call of each program, not measurements of a run.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import time

import jax

from tpu_wan.core import artifacts
from tpu_wan.core import config as config_lib
from tpu_wan.core.config import GenerationConfig, Stage2Settings
from tpu_wan.models import checkpoints
from tpu_wan.run import preflight
from tpu_wan.runtime import programs
from tpu_wan.runtime.mesh import check_heads, make_mesh
from tpu_wan.runtime.parallelism import MODES
from tpu_wan.runtime.profiling import STAGES
from tpu_wan.sampling import schedulers, step_cache
from tpu_wan.tpu import arithmetic, hlo
from tpu_wan.tpu.topology import TpuTarget

log = logging.getLogger("tpu_wan")


def weights_bytes_per_device(weights) -> int:
    """Bytes of one device's shards of abstract (or real) weights; every shard of a NamedSharding is one size."""
    total = 0
    for leaf in jax.tree.leaves(weights):
        total += math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


def compile_program(name: str, jitted, args, *, ideal_flops: int, devices: int, held_bytes: int,
                    usable: int, export=None, settings: dict | None = None) -> dict:
    """One metrics.json "compiled" entry: compiles `jitted` at the abstract `args` and reads what XLA says. A
    program the TPU compiler refuses for want of HBM is an entry too (not compiled, what it said it needs).

    held_bytes: other models' weights the same process keeps on each device while this program runs. `export`: a
    program directory the compiled program is written to (tpu_wan.runtime.programs), keyed with `settings`."""
    log.info("compiling %s (%d devices)", name, devices)
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as err:  # noqa: BLE001  only the compiler's out-of-memory refusal is an answer; the rest raise
        if (oom := hlo.out_of_memory(err)) is None:
            raise
        log.info("the TPU compiler refused %s: %s", name, oom.message)
        return _refused(name, oom, held_bytes, ideal_flops / devices, time.perf_counter() - start)
    compile_s = time.perf_counter() - start
    log.info("compiled %s in %.1f s", name, compile_s)
    if export is not None:
        programs.export(export, name, compiled, args, **(settings or {}))
    summary = hlo.summarize(compiled.as_text())
    numbers = hlo.program_numbers(compiled, summary)
    own = (numbers["argument_bytes"] + numbers["output_bytes"] - numbers["alias_bytes"] + numbers["temp_bytes"]
           + numbers["generated_code_bytes"])
    peak = own + held_bytes
    return {
        "name": name, "compile_s": compile_s, **{k: v for k, v in numbers.items() if k != "flops"},
        "held_bytes": held_bytes, "peak_bytes": peak, "flops": numbers["flops"], "ideal_flops": ideal_flops / devices,
        "collectives": summary["collectives"], "custom_calls": summary["custom_calls"], "fits": peak <= usable,
        "skipped": None,
    }


_UNCOMPILED = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "generated_code_bytes", "flops")


def _refused(name: str, oom: hlo.OutOfMemory, held: int, ideal_flops: float, compile_s: float) -> dict:
    """The entry of a program the TPU compiler refused as larger than the chip's HBM: peak_bytes is what it said
    the program needs (plus the other models' weights held beside it)."""
    return {"name": name, "compile_s": compile_s, **dict.fromkeys(_UNCOMPILED), "held_bytes": held,
            "peak_bytes": oom.required_bytes + held, "ideal_flops": ideal_flops, "collectives": {},
            "custom_calls": {}, "fits": False,
            "skipped": f"the compiler refused it: it needs {_bytes(oom.required_bytes)}"}


def _weights_exceed(name: str, weights: int, held: int, ideal_flops: float) -> dict:
    """The entry of a program left uncompiled because the weights on each device already exceed what the
    compiler allows: peak_bytes is then that lower bound."""
    return {"name": name, "compile_s": None, **dict.fromkeys(_UNCOMPILED), "held_bytes": held,
            "peak_bytes": weights + held, "ideal_flops": ideal_flops,
            "collectives": {}, "custom_calls": {}, "fits": False,
            "skipped": f"{_bytes(weights)} of its model's weights per device before any activation (not compiled)"}


@dataclasses.dataclass(frozen=True)
class LocalTarget:
    """The devices this process sees, as a target to compile for (compile-only without --topology: what a run on
    this host compiles, e.g. to export its programs). Memory per device: the backend's limit where it keeps stats
    (TPU, GPU), else the host's memory shared by its devices (the CPU and its virtual devices)."""

    attached_devices: tuple
    bytes_per_device: int

    @classmethod
    def attached(cls) -> "LocalTarget":
        devices = tuple(jax.devices())
        stats = devices[0].memory_stats() or {}
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(devices, stats.get("bytes_limit") or host // len(devices))

    @property
    def chips(self) -> int:
        return len(self.attached_devices)

    @property
    def usable_hbm_bytes(self) -> int:
        return self.bytes_per_device

    def devices(self) -> list:
        return list(self.attached_devices)

    def describe(self) -> dict:
        """The metrics.json "target" entry (the fields of TpuTarget.describe)."""
        device = self.attached_devices[0]
        return {"topology": f"local {device.platform}", "device_kind": device.device_kind, "devices": self.chips,
                "hosts": 1, "hbm_bytes_per_device": self.bytes_per_device,
                "usable_hbm_bytes_per_device": self.bytes_per_device}


@dataclasses.dataclass
class Programs:
    """One stage's programs: name -> (jitted, abstract args, total ideal FLOPs), the weights they take, the
    weights the stage keeps on the chips beside them (a two-expert model's idle expert), and the settings its
    programs are keyed with in a program directory (as the model's own calls of tpu_wan.runtime.programs pass them)."""

    weights: object
    programs: dict
    idle: object = None
    settings: dict = dataclasses.field(default_factory=dict)
    program_settings: dict = dataclasses.field(default_factory=dict)  # name -> its own settings, where not `settings`


def image_conditioner(model_path, mesh, cfg: GenerationConfig, conv: str = "auto"):
    """The abstract image models of an image-to-video run (image_encoder.ImageConditioner), None for text to video."""
    if cfg.images is None:
        return None
    from tpu_wan.models.image_encoder import ImageConditioner

    return ImageConditioner(model_path, checkpoints.model_kind(model_path), mesh, cfg.text_dtype, abstract=True,
                            conv=conv)


def text_encoder_programs(model_path, mesh, cfg: GenerationConfig) -> Programs:
    """UMT5's programs, and for image to video CLIP's (where the model has it) and the VAE encoder's (one image per
    prompt, each its own: the most a run encodes)."""
    from tpu_wan.models.text_encoder import TextEncoder

    encoder = TextEncoder(model_path, mesh, cfg.text_dtype, abstract=True)
    config = encoder.config.to_dict()
    texts = len(cfg.prompts) + 1  # the prompts and the negative prompt
    programs = {name: (jitted, args, arithmetic.umt5_encoder_flops(config, rows, cfg.max_sequence_length))
                for name, (jitted, args, rows) in encoder.programs_for(texts, cfg.max_sequence_length).items()}
    conditioner, weights, own = image_conditioner(model_path, mesh, cfg), encoder.weights, {}
    if conditioner is not None:
        # the models' FLOPs from their XLA convolutions' trace: traced_flops does not see into a Pallas kernel
        xla = image_conditioner(model_path, mesh, cfg, conv="xla").programs_for(len(cfg.prompts), *cfg.image_size)
        for name, (jitted, args, model) in conditioner.programs_for(len(cfg.prompts), *cfg.image_size).items():
            programs[name] = (jitted, args, arithmetic.traced_flops(xla[name][0], *xla[name][1]))
            own[name] = {"model": model, **({"conv": conditioner.models["vae_encoder"].conv_for(args[-1].shape)}
                                            if name == "vae_encode" else {})}
        weights = {"text_encoder": encoder.weights, **conditioner.weights}
    return Programs(weights, programs, settings={"model": encoder.config}, program_settings=own)


def transformer_programs(model_path, mesh, cfg: GenerationConfig, expert_offload: bool = False) -> Programs:
    """The denoising step; a two-expert model's one step program serves both experts, and the idle expert stays on
    the chips beside it unless `expert_offload`."""
    from tpu_wan.models.transformer import Denoiser

    denoiser = Denoiser(model_path, mesh, cfg.stage2.dtype, cfg.stage2.attention, abstract=True)
    dit = dict(denoiser.config)
    latents = cfg.stage2.latent_shape(cfg.stage2.batch_size, config_lib.latent_channels(dit))
    guided = cfg.do_classifier_free_guidance
    rows = cfg.stage2.batch_size * (2 if guided else 1)
    noise = cfg.stage2.sample_solver in schedulers.NOISE_SOLVERS  # the "distill" step takes fresh noise
    conditioner = image_conditioner(model_path, mesh, cfg)
    image = None if conditioner is None else conditioner.input_shapes(cfg.stage2.batch_size, latents)
    jitted, args = denoiser.step_program(latents, (rows, cfg.max_sequence_length, dit["text_dim"]), guided,
                                         cfg.stage2.sharding_mode, noise=noise, cache=cfg.stage2.cache,
                                         num_steps=cfg.stage2.num_inference_steps, image=image)
    tokens = config_lib.video_tokens(latents, dit["patch_size"])
    image_tokens = image["embeds"][1] if image and "embeds" in image else 0
    ideal = arithmetic.dit_forward_flops(dit, rows, tokens, cfg.max_sequence_length, image_tokens)
    first, *idle = denoiser.kind.experts
    program = f"step cfg={guided}" + (f" cache={step_cache.parse(cfg.stage2.cache).kind}" if cfg.stage2.cache else "")
    settings = {"model": denoiser.config, "sharding": cfg.stage2.sharding_mode,
                "attention": denoiser.attention_options, "cache": cfg.stage2.cache,
                "conditioning": denoiser.conditioning(image)}
    return Programs(denoiser.experts[first], {program: (jitted, args, ideal)},
                    idle=None if expert_offload or not idle else [denoiser.experts[e] for e in idle], settings=settings)


def vae_programs(model_path, mesh, cfg: GenerationConfig, uint8: bool, conv: str = "auto") -> Programs:
    from tpu_wan.models.vae import VaeDecoder

    decoder = VaeDecoder(model_path, mesh, cfg.vae_dtype, abstract=True, conv=conv)
    latents = cfg.stage2.latent_shape(1, decoder.config.z_dim)
    # The model's FLOPs from its XLA convolutions' trace: traced_flops does not see into a Pallas kernel.
    xla = VaeDecoder(model_path, mesh, cfg.vae_dtype, abstract=True, conv="xla").programs_for(latents, uint8=uint8)
    programs = {name: (jitted, args, arithmetic.traced_flops(xla[name][0], *xla[name][1]))
                for name, (jitted, args) in decoder.programs_for(latents, uint8=uint8).items()}
    return Programs(decoder.params, programs, settings={"model": decoder.config, "conv": decoder.conv_for(latents)})


def compile_run(cfg: GenerationConfig, target: TpuTarget, devices, *, stages=STAGES,
                compile_stages=None, uint8: bool = True, one_process: bool = False, reuse: dict | None = None,
                expert_offload: bool = False, export=None, vae_conv: str = "auto") -> dict:
    """Compiles the programs of `compile_stages` (default: all of `stages`) for a run of `cfg` (its mesh
    decided) on `target`; returns the metrics.json document. `one_process`: `stages` share a process
    (generate_flax.py), so each program's peak includes the other stages' weights, compiled or not. `reuse`: a
    dict kept across calls, so the text encoder's and the VAE's programs, which the DiT's sharding mode does not
    change, are compiled once per mesh. `expert_offload`: a two-expert model's idle expert is in host memory, not
    beside the step. `export`: a program directory every compiled program is written to (tpu_wan.runtime.programs)."""
    dp, tp = cfg.stage2.mesh
    mesh = make_mesh(dp, tp, devices)
    model_path = checkpoints.resolve_configs(cfg.model_id)
    if "text_encoder" in stages:
        te = checkpoints.read_config(model_path, "text_encoder", ("num_heads",))
        check_heads(mesh, te["num_heads"], "text encoder")
    if "transformer" in stages:
        preflight.check_transformer_run(model_path, cfg, mesh)
    build = {
        "text_encoder": lambda: text_encoder_programs(model_path, mesh, cfg),
        "transformer": lambda: transformer_programs(model_path, mesh, cfg, expert_offload),
        "vae": lambda: vae_programs(model_path, mesh, cfg, uint8, vae_conv),
    }
    built = {stage: build[stage]() for stage in stages}
    idle = {stage: weights_bytes_per_device(b.idle) for stage, b in built.items()}  # beside the stage's programs
    weights = {stage: weights_bytes_per_device(b.weights) + idle[stage] for stage, b in built.items()}
    usable = target.usable_hbm_bytes
    out = {}
    for stage, b in built.items():
        if compile_stages is not None and stage not in compile_stages:
            continue
        others = sum(w for s, w in weights.items() if s != stage) if one_process else 0
        held = others + idle[stage]
        key = (stage, dp, tp, held)
        if reuse is not None and stage != "transformer" and key in reuse:
            compiled = reuse[key]
        elif weights[stage] + others > usable:  # no program of this stage can fit: not worth minutes of compiling
            compiled = [_weights_exceed(name, weights[stage] - idle[stage], held, ideal / mesh.size)
                        for name, (_, _, ideal) in b.programs.items()]
        else:
            compiled = [compile_program(name, jitted, args, ideal_flops=ideal, devices=mesh.size, held_bytes=held,
                                        usable=usable, export=export,
                                        settings=b.program_settings.get(name, b.settings))
                        for name, (jitted, args, ideal) in b.programs.items()]
        if reuse is not None:
            reuse[key] = compiled
        out[stage] = {"weights_bytes_per_device": weights[stage], "compiled": compiled,
                      "fits": all(p["fits"] for p in compiled)}
        if b.idle is not None:
            out[stage]["idle_expert_bytes_per_device"] = idle[stage]
    return {
        "schema": artifacts.METRICS_SCHEMA,
        "script": "compile_only",
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "target": target.describe(),
        "usable_bytes_per_device": usable,
        "mesh": {"dp": dp, "tp": tp},
        "one_process": one_process,
        "resident_stages": {stage: weights[stage] for stage in stages},
        "config": cfg.to_json_dict(),
        "stages": out,
        "fits": all(s["fits"] for s in out.values()),
    }


def candidate_runs(target: TpuTarget, text_heads: int | None, dit_heads: int | None,
                   sharding: str | None) -> list[tuple[int, int, str | None]]:
    """Every (dp, tp, DiT sharding mode) with dp * tp = the slice's chips that the models allow: tp divides the
    text encoder's heads (it always splits them), and Megatron's DiT needs tp to divide its heads while sequence
    sharding takes any. `sharding` None/auto tries both modes (on one chip they are one program: the mode is
    then None, decided as a run decides it), a mode only itself; without the DiT (`dit_heads` None) the mode is
    None."""
    n = target.chips
    auto = sharding in (None, "auto")
    modes = (None,) if dit_heads is None or (auto and n == 1) else MODES if auto else (sharding,)
    runs = []
    for tp in (t for t in range(1, n + 1) if n % t == 0 and (text_heads is None or text_heads % t == 0)):
        runs += [(n // tp, tp, mode) for mode in modes if mode != "megatron" or dit_heads % tp == 0]
    return runs


def step_collective_bytes(metrics: dict, count: str = "bytes") -> int | None:
    """Bytes each device moves in one denoising step (`count`: "bytes", the collectives' sizes, or
    "traffic_bytes", what it sends; tpu_wan.tpu.hlo); None when the step was not compiled."""
    steps = metrics["stages"].get("transformer", {}).get("compiled", [])
    if not steps or any(p["skipped"] for p in steps):
        return None
    return sum(c[count] for p in steps for c in p["collectives"].values())


def compile_seconds(metrics: dict) -> float:
    return sum(p["compile_s"] or 0.0 for s in metrics["stages"].values() for p in s["compiled"])


def peak_bytes(metrics: dict) -> int:
    return max(p["peak_bytes"] for s in metrics["stages"].values() for p in s["compiled"])


def rank(documents: list[dict]) -> list[dict]:
    """Meshes (and sharding modes) ranked: fits first, then fewer bytes sent per device per denoising step, then
    lower peak bytes."""
    def key(m):
        moved = step_collective_bytes(m, "traffic_bytes")
        return not m["fits"], moved is None, moved or 0, peak_bytes(m)

    return sorted(documents, key=key)


def not_fitting(metrics: dict) -> str | None:
    """One line naming the first program that does not fit, or None."""
    t, mesh = metrics["target"], metrics["mesh"]
    for stage, s in metrics["stages"].items():
        for p in s["compiled"]:
            if p["fits"]:
                continue
            held = f" with {_bytes(p['held_bytes'])} of the other models' weights beside it" if p["held_bytes"] else ""
            idle = s.get("idle_expert_bytes_per_device")
            offload = (f" (the idle expert's {_bytes(idle)} included: --expert_offload keeps it in host memory)"
                       if idle else "")
            return (f"{stage} program {p['name']!r} on one {t['device_kind']} chip (dp={mesh['dp']} tp={mesh['tp']} on "
                    f"{t['topology']}): expected at most the TPU compiler's limit of "
                    f"{_bytes(metrics['usable_bytes_per_device'])} (HBM {_bytes(t['hbm_bytes_per_device'])}), found "
                    + (p["skipped"] if p["skipped"] else f"it needs {_bytes(p['peak_bytes'])}") + held + offload)
    return None


def compile_only(base: GenerationConfig, settings: Stage2Settings, topology_name: str | None, *,
                 dp: int | None = None, tp: int | None = None, stages=STAGES, compile_stages=None,
                 one_process: bool = False, uint8: bool = True, search_mesh: bool = False, expert_offload: bool = False,
                 export=None, vae_conv: str = "auto", images: bool = False) -> dict:
    """The compile-only run of a script: `base` holds what stage 1 decides (model, prompts, text dtype; with
    `one_process` the model dtype, as generate_flax.py decides it), `settings` the stage-2 flags. With `search_mesh`,
    every (dp, tp, DiT sharding mode) the slice and the models allow is compiled (candidate_runs: both modes when
    `settings.sharding` is auto, so also the meshes only sequence sharding takes); without it, `--sharding auto`
    compiles both modes on the one mesh. Of several, the best document (rank: fits, then bytes sent, then peak)
    is returned, with the ranking under "mesh_search". `expert_offload`: a two-expert model's idle expert in host
    memory. `topology_name` None: for this process's own devices (LocalTarget). `export`: a program directory every
    compiled program is written to, for runs to load (`--programs DIR`, tpu_wan.runtime.programs). `vae_conv`: the
    VAE's convolutions (tpu_wan.models.vae_conv). `images`: an image per prompt (TI2V from a first frame; the I2V
    models always take one)."""
    from tpu_wan.run.pipeline import check_offload, resolve_stage2
    from tpu_wan.tpu.topology import parse_target

    base = with_stand_in_images(base, settings, images)
    target = LocalTarget.attached() if topology_name is None else parse_target(topology_name)
    devices = target.devices()
    model_path = checkpoints.resolve_configs(base.model_id)
    heads = {c: checkpoints.read_config(model_path, c, (key,))[key] if c in stages else None for c, key in
             (("text_encoder", "num_heads"), ("transformer", "num_attention_heads"))}
    if search_mesh:
        runs = candidate_runs(target, heads["text_encoder"], heads["transformer"], settings.sharding)
    else:  # --sharding auto: both modes on this mesh, and the compiler's own numbers decide (rank)
        mesh = make_mesh(dp, tp, devices)
        dp, tp = mesh.shape["dp"], mesh.shape["tp"]
        auto = settings.sharding in (None, "auto") and heads["transformer"] is not None and mesh.size > 1
        runs = [(dp, tp, mode) for mode in MODES if mode != "megatron" or heads["transformer"] % tp == 0] if auto \
            else [(dp, tp, None)]
    documents, reuse = [], {}
    for mesh_dp, mesh_tp, mode in runs:
        cfg = resolve_stage2(base, settings, make_mesh(mesh_dp, mesh_tp, devices))
        check_offload(cfg, expert_offload)
        cfg = cfg.replace(sharding=mode or cfg.stage2.sharding)
        if one_process:  # generate_flax.py encodes in the model dtype (oneshot.generate)
            cfg = cfg.replace(text_dtype=cfg.stage2.dtype)
        documents.append(compile_run(cfg, target, devices, stages=stages, uint8=uint8,
                                     compile_stages=compile_stages, one_process=one_process, reuse=reuse,
                                     expert_offload=expert_offload, export=export, vae_conv=vae_conv))
    ranked = rank(documents)
    best = ranked[0]
    if len(ranked) > 1:
        best["mesh_search"] = [{**m["mesh"], "sharding": m["config"]["sharding"], "fits": m["fits"],
                                "step_collective_bytes": step_collective_bytes(m),
                                "step_traffic_bytes": step_collective_bytes(m, "traffic_bytes"),
                                "peak_bytes": peak_bytes(m), "compile_s": compile_seconds(m)} for m in ranked]
    return best


def _bytes(n) -> str:
    from tpu_wan.core.report import human_bytes

    return "-" if n is None else human_bytes(n)


def table(metrics: dict) -> str:
    """What a compile-only run prints: one row per program, then the verdict."""
    t = metrics["target"]
    lines = [f"compiled for {t['topology']}: {t['devices']} x {t['device_kind']} on {t['hosts']} host(s)"
             + (" (more chips than one host: a multi-host slice, run with --distributed)" if t["hosts"] > 1 else "")
             + (f", {_bytes(t['hbm_bytes_per_device'])} of memory each; " if t["topology"].startswith("local") else
                f", {_bytes(t['hbm_bytes_per_device'])} HBM each ({_bytes(metrics['usable_bytes_per_device'])} for a "
                "program, the compiler's limit); ")
             + f"mesh dp={metrics['mesh']['dp']} tp={metrics['mesh']['tp']}"
             + (f", DiT sharding {metrics['config']['sharding']}" if metrics["config"].get("sharding") else "")]
    rows = [("stage", "program", "compile s", "weights/dev", "peak/dev", "fits", "flops/ideal", "collectives/call",
             "sent/call")]
    for stage, s in metrics["stages"].items():
        for p in s["compiled"]:
            moved = sum(c["bytes"] for c in p["collectives"].values())
            sent = sum(c.get("traffic_bytes", 0) for c in p["collectives"].values())
            ratio = "-" if not p["flops"] or not p["ideal_flops"] else f"{p['flops'] / p['ideal_flops']:.2f}"
            rows.append((stage, p["name"], "-" if p["compile_s"] is None else f"{p['compile_s']:.1f}",
                         _bytes(s["weights_bytes_per_device"]), _bytes(p["peak_bytes"]), "yes" if p["fits"] else "NO",
                         ratio, "-" if p["skipped"] else _bytes(moved), "-" if p["skipped"] else _bytes(sent)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    for stage, held in metrics["resident_stages"].items():
        if stage not in metrics["stages"]:
            lines.append(f"{stage}: not compiled (--compile_stages); its {_bytes(held)} of weights per device are "
                         "counted in the others' peaks")
    for m in metrics.get("mesh_search", []):
        moved = "step not compiled" if m["step_collective_bytes"] is None else \
            f"{_bytes(m['step_traffic_bytes'])} sent per device per step ({_bytes(m['step_collective_bytes'])} " \
            "as the collectives' sizes)"
        lines.append(f"mesh dp={m['dp']} tp={m['tp']} sharding {m['sharding']}: fits {'yes' if m['fits'] else 'no'}, "
                     f"{moved}, peak {_bytes(m['peak_bytes'])}")
    lines.append("fits: yes" if metrics["fits"] else f"fits: no ({not_fitting(metrics)})")
    return "\n".join(lines)


STAND_IN_IMAGE = "(none read: compile-only)"


def with_stand_in_images(cfg: GenerationConfig, settings: Stage2Settings, images: bool) -> GenerationConfig:
    """`cfg` with a stand-in image per prompt at the run's size (the flags', else the model's) where the model needs
    one, or `images` and it takes one: the image programs depend on the shapes alone, so none is read."""
    from tpu_wan.run.pipeline import model_preset

    kind = checkpoints.model_kind(checkpoints.config_folder(cfg.model_id))
    if cfg.images is not None or not (kind.needs_image or (images and kind.takes_image)):
        return cfg
    preset = model_preset(cfg.model_id)
    size = tuple(p if v is None else v for v, p in zip((settings.height, settings.width, settings.frames),
                                                        (preset.height, preset.width, preset.frames)))
    return cfg.replace(images=(STAND_IN_IMAGE,) * len(cfg.prompts), image_size=size)


def stage2_base(input_dir, num_prompts: int | None, model_id: str | None) -> GenerationConfig:
    """What stage 1 decided, for a stage-2 compile-only run: the folder's config, or `num_prompts` stand-in
    prompts of `model_id` (their text does not change a program)."""
    from tpu_wan.core.config import DEFAULT_MODEL_ID, DEFAULT_NEGATIVE_PROMPT

    if num_prompts is None:
        cfg = GenerationConfig.from_json_dict(artifacts.load_config(input_dir))
        prompt_embeds, negative_embeds = artifacts.load_embeddings(input_dir)
        preflight.check_embeddings_file(input_dir, cfg, prompt_embeds, negative_embeds)
        return cfg
    return GenerationConfig(model_id=model_id or DEFAULT_MODEL_ID, prompts=tuple(f"prompt {i}" for i in range(num_prompts)),
                            negative_prompt=DEFAULT_NEGATIVE_PROMPT, max_sequence_length=512)
