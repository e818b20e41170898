"""The distillation trainer: models, losses, data, parallelism, checkpoints, quantization."""
