"""Greedy decoding of a pruned decoder against the unpruned one: throughput against the ideal m/(m-removed), and
peak memory.

The paper's practical claim (section 4) is that a pruned model is faster and smaller in proportion to the layers
removed (40% removed: 35% faster, 15.72 -> 10.37 GiB on an H100). Here a random Llama-shaped decoder (by default
24 layers, hidden 512, vocabulary 1,024, so that the layers dominate the cost as they do in a 7B model) decodes
greedily through `slam.decode.greedy_from_inputs` (prefill over a prompt, then one token per step, no EOS, so every
row makes all its tokens) with 0, 25% and 40% of its layers removed (`slam.pruning.drop_layers`, a contiguous
block before the last layer, as a pruning path removes), at batch 1 and batch 16. The three decoders run
alternately, several rounds in one process, and the medians are compared: the speedup of each pruned decoder over
the unpruned one, and that speedup over the ideal m/(m-removed) (1.0: every removed layer's time saved).

Peak memory: on CUDA, `torch.cuda.max_memory_allocated` over one decoding; on CPU, each decoder is built and
decodes once more in a process of its own, which samples its resident size every millisecond and reports the peak
above what it held before (weights, KV cache, activations and allocator slack).

The last line is the worse of the 25% and 40% speedups over the ideal at batch 16 (target: at least 0.9).

    python benchmarks/pruned_speed.py [--rounds 5] [--new-tokens 32] [--prompt 64]
    python benchmarks/pruned_speed.py --device cuda --shape 8b    # on a GPU: an 8B-shaped random model, bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from slam.decode import greedy_from_inputs
from slam.model import DecoderInputs
from slam.pruning import drop_layers

SHAPES = {
    "mid": {"num_hidden_layers": 24, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8,
            "num_key_value_heads": 8, "vocab_size": 1024},
    "8b": {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip
"""`mid`: the CPU benchmark's decoder; `8b`: Llama-3.1-8B's shape (random weights), for a GPU."""
FRACTIONS = (0.0, 0.25, 0.40)
PAPER = "paper (Llama-3.1-8B, H100): 40% removed, 35% faster, peak memory 15.72 -> 10.37 GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mid")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are compared")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens (the speech and prompt of a sample)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--memory-of", type=float, default=None, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of is not None:
        print(json.dumps(_cpu_peak_mb(args, args.memory_of, args.batch)))
        return
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    m = SHAPES[args.shape]["num_hidden_layers"]
    decoders = {fraction: _decoder(args.shape, fraction, device, dtype) for fraction in FRACTIONS}
    print(f"shape={args.shape} ({m} layers) device={device} dtype={dtype} threads={torch.get_num_threads()} "
          f"prompt={args.prompt} new tokens={args.new_tokens}; median of {args.rounds} rounds")  # fmt: skip
    print(f"{'batch':>5} {'removed':>9} {'tokens/s':>10} {'speedup':>8} {'ideal':>6} {'/ideal':>7} {'peak MiB':>9}")
    worst = {}
    for batch in args.batches:
        inputs = _inputs(decoders[0.0], batch, args.prompt, device, dtype)
        times: dict[float, list[float]] = {fraction: [] for fraction in FRACTIONS}
        for decoder in decoders.values():  # warm-up
            _decode(decoder, inputs, args.new_tokens)
        for _ in range(args.rounds):
            for fraction, decoder in decoders.items():
                times[fraction].append(_decode(decoder, inputs, args.new_tokens))
        base = statistics.median(times[0.0])
        for fraction in FRACTIONS:
            removed = _removed(m, fraction)
            seconds = statistics.median(times[fraction])
            speedup, ideal = base / seconds, m / (m - removed)
            peak = _peak_mb(args, decoders[fraction], inputs, fraction, batch)
            print(f"{batch:>5} {removed:>3} ({removed / m:4.0%}) {batch * args.new_tokens / seconds:>10.1f} "
                  f"{speedup:>8.3f} {ideal:>6.3f} {speedup / ideal:>7.3f} {peak:>9.1f}")  # fmt: skip
            if fraction and batch == max(args.batches):
                worst[fraction] = speedup / ideal
    if args.shape == "8b":
        print(PAPER)
    print(f"pruned speedup over the ideal m/(m-removed), the worse of 25% and 40% at batch {max(args.batches)}: "
          f"{min(worst.values()):.3f}")  # fmt: skip


def _decoder(shape: str, fraction: float, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The random decoder of `shape` (the same weights for every fraction), with `fraction` of its layers removed."""
    config = _config(shape)
    torch.manual_seed(0)
    decoder = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    m = config.num_hidden_layers
    removed = _removed(m, fraction)
    if removed:
        # A block before the last layer, 1-based layer numbers as a pruning path gives them.
        drop_layers(decoder, list(range(m - removed, m)))
    return decoder


def _config(shape: str, layers: int | None = None) -> LlamaConfig:
    fields = {**SHAPES[shape], **({"num_hidden_layers": layers} if layers is not None else {})}
    return LlamaConfig(**fields, max_position_embeddings=4096, tie_word_embeddings=False)


def _removed(m: int, fraction: float) -> int:
    return round(m * fraction)


def _inputs(decoder, batch: int, prompt: int, device: torch.device, dtype: torch.dtype) -> DecoderInputs:
    """`batch` rows of `prompt` random token embeddings, no padding (every row decodes every step)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, decoder.config.vocab_size, (batch, prompt), generator=generator).to(device)
    with torch.no_grad():
        embeds = decoder.get_input_embeddings()(ids).to(dtype)  # (b, L, D)
    mask = torch.ones(batch, prompt, dtype=torch.long, device=device)
    positions = torch.arange(prompt, device=device).expand(batch, prompt)
    return DecoderInputs(inputs_embeds=embeds, attention_mask=mask, position_ids=positions)


def _decode(decoder, inputs: DecoderInputs, new_tokens: int) -> float:
    """Seconds of one greedy decoding of `new_tokens` per row (an EOS id no row produces: -1)."""
    if inputs.inputs_embeds.device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    outputs = greedy_from_inputs(decoder, inputs, -1, new_tokens)
    if inputs.inputs_embeds.device.type == "cuda":
        torch.cuda.synchronize()
    assert all(len(row) == new_tokens for row in outputs)
    return time.perf_counter() - began


def _peak_mb(args, decoder, inputs: DecoderInputs, fraction: float, batch: int) -> float:
    """Peak memory of one decoding: CUDA's allocator peak, or a child process's peak resident size on CPU."""
    if inputs.inputs_embeds.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        _decode(decoder, inputs, args.new_tokens)
        return torch.cuda.max_memory_allocated() / 2**20
    command = [sys.executable, __file__, "--shape", args.shape, "--prompt", str(args.prompt), "--new-tokens",
               str(args.new_tokens), "--memory-of", str(fraction), "--batch", str(batch)]  # fmt: skip
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


def _cpu_peak_mb(args, fraction: float, batch: int) -> float:
    """In a fresh process: the peak resident size a decoder and one decoding add (MiB), sampled every millisecond.

    The decoder is built with m - removed layers: what `drop_layers` leaves, without the unpruned model's weights
    passing through the peak first.
    """
    process = psutil.Process()
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.001):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    shape = SHAPES[args.shape]
    kept = shape["num_hidden_layers"] - _removed(shape["num_hidden_layers"], fraction)
    decoder = LlamaForCausalLM(_config(args.shape, kept)).eval()
    _decode(decoder, _inputs(decoder, batch, args.prompt, torch.device("cpu"), torch.float32), args.new_tokens)
    done.set()
    sampler.join()
    return (max(peak, process.memory_info().rss) - before) / 2**20


if __name__ == "__main__":
    main()
