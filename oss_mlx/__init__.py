"""oss-mlx: gpt-oss on MLX."""
