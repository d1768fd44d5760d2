"""Layer 0, the base: errors, the settings of a run (config, batch), the artifact files and their atomic writes,
videos and previews, metrics reports, the entry-point wrapper. Plain Python and numpy: imports nothing of tpu_wan
outside this folder except tpu/ (its own layer)."""
