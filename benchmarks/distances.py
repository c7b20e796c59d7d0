"""Distance matrix vs the usual way of getting hidden states (one plain causal-LM forward).

A random Qwen2-shaped model (24 layers, hidden 512, vocabulary 32,000) on CPU and a batch of
8 x 128 tokens. The usual way runs the whole causal LM with `output_hidden_states=True` (LM head
and logits included); `layer_distances` runs the decoder layers only and keeps the last-token
states. Pairs are timed alternately in one process, since this machine is noisy; the ratio of the
medians is printed last. Target: at most 1.0.

    python benchmarks/distances.py [--pairs 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from slam.model import DecoderInputs, position_ids_from_mask
from slam.redundancy import layer_distances


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=9, help="alternating pairs to time (at least 7)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=32_000,
        hidden_size=512,
        intermediate_size=2_752,
        num_hidden_layers=24,
        num_attention_heads=8,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.tokens))
    mask = torch.ones_like(ids)
    mask[1, -17:] = 0  # some right padding, so the last-token lookup has work to do

    def usual() -> None:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == config.num_hidden_layers + 1

    def ours() -> None:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)  # (B, L, D)
        result = layer_distances(model, [DecoderInputs(embeds, mask, position_ids_from_mask(mask))])
        assert result.distance.shape == (config.num_hidden_layers + 1,) * 2

    usual(), ours()  # warm-up
    times = {"usual": [], "ours": []}
    for _ in range(args.pairs):
        for name, fn in (("usual", usual), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    usual_s, ours_s = statistics.median(times["usual"]), statistics.median(times["ours"])
    print(f"threads={torch.get_num_threads()} batch={args.batch}x{args.tokens} pairs={args.pairs}")
    print(f"plain forward with hidden states: {usual_s * 1000:.1f} ms (median)")
    print(f"layer_distances (full matrix):    {ours_s * 1000:.1f} ms (median)")
    print(f"ratio distances/forward: {ours_s / usual_s:.3f}")


if __name__ == "__main__":
    main()
