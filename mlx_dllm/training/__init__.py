"""Training DFlash drafters with MLX (`mlx-dllm train-drafter`)."""
