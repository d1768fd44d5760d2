"""tpu_wan: Wan video generation on TPUs with JAX. One folder per layer (docs/ARCHITECTURE.md, section 3); a module
imports only from its own layer or the ones below, as tests/test_layering.py checks:

    0  core/      errors, settings, artifacts on disk, videos, reports       tpu/  the chips and the compiler's numbers
    1  runtime/   meshes, sharding, attention dispatch, torchax, loading      kernels/  sampling/
    2  models/    the text encoder, the DiT, the VAE, checkpoint folders
    3  run/       the stages as library calls, one-process runs, sweeps, checks before work, compiling for a slice
    4  cli.py     the scripts' flags and process setup
"""
