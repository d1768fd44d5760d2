"""The exp2 kernel compiled by the TPU compiler (Mosaic) for v5e, v6e and v5p chips, on this CPU host, at the
per-chip shapes the attention dispatch gives the Wan runs (libtpu, deviceless: compiled, not run)."""

import importlib.util
import json

import pytest
from scripts import ROOT, run

from tpu_wan import attention_tuning as tuning
from tpu_wan.attention import AttentionOptions
from tpu_wan.kernels.splash_exp2 import VMEM_LIMIT_BYTES

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed: nothing can compile for a TPU on this host")

# (heads, q_len, kv_len) per chip, head dim 128. L = F * H/16 * W/16 video tokens: 21 * 45 * 80 = 75,600 at
# 720p x 81 frames, 21 * 30 * 52 = 32,760 at 480p; S = 512 text tokens.
WAN_SHAPES = {
    "14B 720p self-attention, tp=4": (10, 75600, 75600),
    "14B 720p cross-attention, tp=4 (--attention custom)": (10, 75600, 512),
    "14B 720p without CFG on dp=2: the query sequence split over dp": (10, 37800, 75600),
    "1.3B 480p self-attention, tp=1": (12, 32760, 32760),
    "1.3B 480p self-attention, tp=4": (3, 32760, 32760),
}


@pytest.mark.parametrize("topology", ["v5e-8", "v6e-8", "v5p-8"])
@pytest.mark.parametrize("case", list(WAN_SHAPES))
def test_kernel_compiles_at_the_wan_shapes(topology, case):
    heads, q_len, kv_len = WAN_SHAPES[case]
    result = tuning.compile_for(tuning.Shape(heads, q_len, kv_len, 128, "bfloat16"), AttentionOptions(choice="custom"),
                                topology)
    assert result["accepted"], result["error"]
    assert result["custom_calls"]["tpu_custom_call"] == 1  # the Mosaic kernel, once
    assert result["vmem_bytes"] <= VMEM_LIMIT_BYTES
    assert result["output_bytes"] == heads * q_len * 128 * 2  # [1 N L D] bf16


def test_the_dispatch_splits_the_query_sequence_where_the_batch_does_not_divide_dp():
    """The sequence-split case above is the dispatch's own: one batch row on dp=2 puts half of L on each shard."""
    from tpu_wan import attention, topology
    from tpu_wan.mesh import make_mesh

    mesh = make_mesh(2, 4, topology.parse_target("v6e-8").devices())
    q_spec, _, seq_axes = attention._shard_specs(mesh, batch=1, heads=40)
    assert seq_axes == ("dp",) and tuple(q_spec) == (None, "tp", "dp", None)


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
    assert "v6e-8 refused the kernel" in bad.stderr and "bkv_compute a multiple of 128" in bad.stderr
