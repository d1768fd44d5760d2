"""Layer 2, the models: model folders and their configs (checkpoints, the packaged configs, the tiny random
checkpoints), fine-tuned weights, the UMT5 text encoder and the Wan DiT (diffusers/transformers code through
torchax), our Flax NNX Wan VAE decoder. Imports layers 0 and 1."""
