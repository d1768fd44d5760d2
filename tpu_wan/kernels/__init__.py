"""Layer 1: our exp2 splash attention kernel (Pallas, Mosaic on TPU) and its block sizing. Only
runtime/attention.py calls the kernel; the tuning tools read its tiling."""
