"""Layer 1, running on devices: meshes and the two DiT sharding modes, the attention dispatch (the one importer of
our kernel), the torchax bridge to diffusers/transformers model code, weights loaded straight into sharded
arrays, multi-process runs, profiling. Imports layer 0 and its layer's other folders (kernels/, sampling/)."""
