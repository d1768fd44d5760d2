"""Layer 0: what is known about TPUs without one. The chips and slices (topology), reading compiled programs
(hlo: memory, FLOPs, collectives), the model's own FLOPs and bytes (arithmetic). Imports only core/."""
