"""Layer 1: the samplers' steps (flow-matching UniPC and DPM++ schedules, as diffusers computes them). Imports
layer 0 only."""
