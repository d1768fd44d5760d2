"""Layer 3, what a run does: the three stages as library calls (pipeline), the one-process run (oneshot), seed
sweeps and resuming, the checks made before any work (preflight), compiling every program for a TPU slice (aot),
the kernel's check/bench/sweep/compile tools. Imports layers 0 to 2."""
