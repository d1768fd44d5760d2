"""The exp2 kernel compiled by the TPU compiler (Mosaic) for v5e, v6e and v5p chips, on this CPU host, at the
per-chip shapes the attention dispatch gives the Wan runs (libtpu, deviceless: compiled, not run)."""

import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from scripts import ROOT, run
from wan_shapes import GENERATIONS, VIDEO_TOKENS, dispatch_shapes

from tpu_wan.kernels import kernel_tiling, splash_exp2
from tpu_wan.run import attention_tuning as tuning
from tpu_wan.runtime import attention
from tpu_wan.runtime.attention import AttentionOptions
from tpu_wan.tpu import topology

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed: nothing can compile for a TPU on this host")

# Lengths no Wan run has, a prime and a few around block edges, so the estimate is not tuned to the named ones.
OTHER_SHAPES = {(1000, 1000), (5003, 5003), (12345, 512), (49999, 49999), (100, 100)}


def _compile_at(generation: str, q_len: int, kv_len: int, blocks, vmem_limit: int):
    """The kernel for one head compiled for one chip of `generation` at a scoped VMEM limit of `vmem_limit`."""
    device = topology.parse_target(f"{generation}-8").devices()[0]
    mesh = Mesh(np.array([device]), ("x",))
    args = [jax.ShapeDtypeStruct((1, n, 128), jnp.bfloat16, sharding=NamedSharding(mesh, P())) for n in
            (q_len, kv_len, kv_len)]
    fn = jax.jit(lambda q, k, v: splash_exp2.splash_attention(q, k, v, block_sizes=blocks, vmem_limit_bytes=vmem_limit))
    return fn.lower(*args).compile()


def _vmem_cases():
    cases = [("v5e", *shape) for shape in sorted(dispatch_shapes() | OTHER_SHAPES)]  # v5e needs the most VMEM
    return cases + [(g, tokens, tokens) for g in ("v6e", "v5p") for tokens in VIDEO_TOKENS]


@pytest.mark.parametrize("generation, q_len, kv_len", _vmem_cases())
def test_default_blocks_compile_within_the_vmem_estimate(generation, q_len, kv_len):
    # Mosaic gets exactly ceil(vmem_bytes) of scoped VMEM: the estimate must be an upper bound of what the
    # compiled kernel uses, and the default blocks must fit the chip's limit.
    limit = kernel_tiling.vmem_limit_for(GENERATIONS[generation])
    blocks = kernel_tiling.default_block_sizes(q_len, kv_len, 128, jnp.bfloat16, limit)
    need = kernel_tiling.vmem_bytes(kernel_tiling.effective_block_sizes(blocks, q_len, kv_len), 128, jnp.bfloat16)
    assert need <= limit
    compiled = _compile_at(generation, q_len, kv_len, blocks, need)
    assert "tpu_custom_call" in compiled.as_text()


def test_the_dispatch_covers_the_named_shapes():
    shapes = dispatch_shapes()
    for shape in [(75600, 75600), (75600, 512), (37800, 75600), (32760, 32760), (4095, 32760), (9450, 512)]:
        assert shape in shapes, shape


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_few_grid_steps_at_720p(generation):
    # 14B 720p self-attention, 10 heads per chip: ~0.5 us of MXU work per 512 x 512 tile against ~0.35 us of
    # overhead per grid step, so the blocks must be large in both directions.
    blocks = kernel_tiling.default_block_sizes(75600, 75600, 128, jnp.bfloat16,
                                             kernel_tiling.vmem_limit_for(GENERATIONS[generation]))
    print(generation, blocks, kernel_tiling.grid_steps(blocks, 75600, 75600), "grid steps per head")
    assert kernel_tiling.grid_steps(blocks, 75600, 75600) <= 1000


def test_the_dispatch_splits_the_query_sequence_where_the_batch_does_not_divide_dp():
    """One batch row on dp=2 puts half of L on each shard (the sequence-split shapes above)."""
    from tpu_wan.runtime.mesh import make_mesh

    mesh = make_mesh(2, 4, topology.parse_target("v6e-8").devices())
    q_spec, _, seq_axes = attention._shard_specs(mesh, batch=1, heads=40)
    assert seq_axes == ("dp",) and tuple(q_spec) == (None, "tp", "dp", None)


@pytest.mark.parametrize("topology_name", ["v5e-8", "v6e-8", "v5p-8"])
def test_the_models_call_compiles_at_14b_720p(topology_name):
    # Through make_attention, as the models call it: 10 heads per chip (tp = 4).
    result = tuning.compile_for(tuning.Shape(10, 75600, 75600, 128, "bfloat16"), AttentionOptions(choice="custom"),
                                topology_name)
    assert result["accepted"], result["error"]
    assert result["custom_calls"]["tpu_custom_call"] == 1  # the Mosaic kernel, once
    assert result["vmem_bytes"] <= result["vmem_limit_bytes"] and result["grid_steps_per_head"] <= 1000
    assert result["output_bytes"] == 10 * 75600 * 128 * 2  # [1 N L D] bf16
    # No padded copies of q, k, v or the output: the ragged last blocks are handled inside the kernel. The one
    # temp is q scaled by the base-2 fold (in a model the multiply fuses into the ops that produce q).
    assert result["temp_bytes"] <= 1.01 * result["output_bytes"]  # q and the output are both [1 N L D] bf16
    print(topology_name, {k: result[k] for k in ("block_sizes", "vmem_bytes", "grid_steps_per_head",
                                                  "argument_bytes", "temp_bytes")})


def test_compile_command(tmp_path):
    cli = ROOT / "custom_splash_attention.py"
    proc = run(cli, "compile", "--topology", "v6e-8", "--heads", "2", "--q_len", "4096", "--kv_len", "4096",
               "--head_dim", "128", "--block_q", "1024", "--block_kv", "1024", "--block_kv_compute", "512", "--json")
    result = json.loads(proc.stdout)
    assert result["accepted"] and result["block_sizes"] == [1024, 1024, 512] and result["device_kind"] == "TPU v6 lite"
    assert result["compile_s"] > 0 and result["flops"] > 0
    bad = run(cli, "compile", "--topology", "v6e-8", "--heads", "2", "--q_len", "1024", "--kv_len", "1024",
              "--block_q", "64", "--block_kv", "64", "--block_kv_compute", "64", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "v6e-8 refused the custom kernel" in bad.stderr and "bkv_compute a multiple of 128" in bad.stderr


def _llo_per_grid_step(kernel: str) -> dict:
    """Mosaic's LLO op counts for one bf16 1024 x 1024 grid step of `kernel` (custom or splash) on v6e."""
    proc = run(ROOT / "custom_splash_attention.py", "compile", "--topology", "v6e-8", "--heads", "1", "--q_len",
               "1024", "--kv_len", "1024", "--block_q", "1024", "--block_kv", "1024", "--block_kv_compute", "1024",
               "--attention", kernel, "--llo_stats", "--json")
    return json.loads(proc.stdout)["llo_per_grid_step"]


def test_fewer_vector_multiplies_than_upstream_splash():
    ours, upstream = _llo_per_grid_step("custom"), _llo_per_grid_step("splash")
    print("LLO ops per bf16 1024 x 1024 grid step on v6e: ours", ours, "upstream splash", upstream)
    # The [1024, 1024] float32 logits are 1,024 vregs (8 x 128 each) and the row statistics [1024, 128] 128 more:
    # one exponential per vreg of each, exp2 (vpow2) in ours, Mosaic's native exp (vexp) in upstream's.
    vregs = 1024 * 1024 // 1024 + 1024 * 128 // 1024
    assert (ours["vpow2"], ours["vexp"]) == (vregs, 0)
    assert (upstream["vpow2"], upstream["vexp"]) == (0, vregs)
    # The scale folded into q: no multiply per logit left (before the fold: 1,408 here).
    assert ours["vmul"] <= upstream["vmul"] < vregs
    # P.V on the MXU in bf16 (ours) takes fewer matmul pushes than upstream's float32 P.V.
    assert ours["vmatmul"] < upstream["vmatmul"]
