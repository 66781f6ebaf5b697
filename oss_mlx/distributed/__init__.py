"""gpt-oss over several machines (or processes) with mx.distributed: docs/DISTRIBUTED.md.

plan.py            the split (pipeline: layers by memory; tensor: heads, experts, vocabulary) and its memory
group.py           the MLX group, the control link (heartbeats, error reports), DistributedError
protocol.py        rank 0's commands to the others (tokens, cache operations, stop); the workers' loop
pipeline.py        a pipeline stage: a range of layers, the hidden state sent on
tensor_parallel.py a tensor/expert-parallel rank: head, expert and vocabulary shards, all_sums
shard_load.py      loading a rank's part, reading only that part
runtime.py         start-up on every rank, rank roles, fault handling on rank 0
hosts.py           hosts.json, starting the other ranks (`--hosts`)
cli.py             --hosts / --distributed for chat, serve, generate; `oss-mlx plan --hosts`
worker.py          the entry point of a rank started by `--hosts`
"""
