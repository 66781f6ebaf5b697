"""How much the decode rate moves between identical runs in one process (20b shapes, GPU machine).

For each of three rounds (the sdpa key split as shipped, one split for every key, as shipped again)
and each context, a warm run of that length, then the measured one: 48 decoded tokens, the whole rate
and the rate after the first step. Rounds 1 and 3 are the same code: their difference is the noise.
Numbers: docs/PERFORMANCE.md, "What to know when reading these".

    python benchmarks/probes/decode_noise_probe.py
"""

from __future__ import annotations

from oss_mlx.bench import _prompt, preset_config, random_model, run_oss_mlx
from oss_mlx.kernels import decode_attention


def main() -> None:
    model = random_model(preset_config("20b"))
    vocab = model.config.vocab_size
    run_oss_mlx(model, _prompt(300, vocab, 0), 4)
    shipped = decode_attention.SDPA_KEYS_PER_SPLIT
    for keys_per_split in (shipped, 1 << 20, shipped):
        decode_attention.SDPA_KEYS_PER_SPLIT = keys_per_split
        for n in (128, 2048, 8192):
            run_oss_mlx(model, _prompt(n, vocab, 1), 4)
            _, decode, _, _, steady = run_oss_mlx(model, _prompt(n, vocab, 1), 48)
            rates = f"decode {decode:6.1f} tok/s, steady {steady:6.1f}"
            print(f"keys/split {keys_per_split:>8} context {n:>5}: {rates}", flush=True)
    decode_attention.SDPA_KEYS_PER_SPLIT = shipped


if __name__ == "__main__":
    main()
