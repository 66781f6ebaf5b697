"""Test and benchmark helpers, apart from the product: nothing here runs in `oss-mlx chat`, `serve` or
`oss_mlx.load` unless a test asks for it.

synthetic   random gpt-oss checkpoints in every on-disk layout (`oss-mlx synthetic`, the suite's fixtures)
random_model  a random-weight gpt-oss built in memory (`oss-mlx bench --config`), kernel-vs-reference checks
scripted    scripted replies: the model runs every step, a script picks the tokens (OSS_MLX_SCRIPTED_REPLIES)
"""
