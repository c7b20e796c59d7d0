"""Batched greedy decoding (batch 16) against one-by-one decoding on the demo model and test split.

The demo SpeechLLM (shipped tiny encoder and decoder) needs a trained projector so that hypotheses
stop at EOS like real ones: `--model DIR` takes one saved with `slam.model.save_speech_llm`; without
it, one is trained here first (`--train-steps`, about a minute) and saved under `out/` for the next
run. Then the demo test utterances (different lengths) are decoded both ways, alternately, several
times in one process, and the medians are compared phase by phase: encoding (speech to decoder
inputs: encoder, stacking, projector), prefill (the first decoder pass over speech + prompt), the
token-by-token steps after it, and the whole of `greedy_token_ids`. Tokens per second count the
generated tokens (EOS included). The end-to-end ratio is printed last. Target: at least 8x on 2 cores.

    python benchmarks/decode.py [--model DIR] [--runs 5] [--utterances 48]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from slam.config import (
    DataConfig,
    DecodeConfig,
    DecoderConfig,
    EncoderConfig,
    ProjectorConfig,
    SpeechLLMConfig,
    TrainConfig,
)
from slam.data import load_dataset
from slam.decode import greedy_from_inputs, greedy_token_ids, prefill
from slam.model import build_speech_llm, load_speech_llm, save_speech_llm
from slam.train import train

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo"
TRAINED = Path(__file__).resolve().parents[1] / "out" / "bench-decode-slam"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a saved SpeechLLM (default: train one)")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--runs", type=int, default=5, help="alternating runs of each way")
    parser.add_argument("--utterances", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()
    model = _model(args.model, args.train_steps)
    test = load_dataset(DataConfig(source="manifest", path=str(DEMO / "test.jsonl"), max_samples=args.utterances))
    waves = [s.audio for s in test.samples()]
    eos, limit = model.tokenizer.eos_token_id, args.max_new_tokens
    # The batches greedy_token_ids makes: utterances sorted by length, then cut into chunks.
    order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
    groups = {
        "batched": [[waves[i] for i in order[k : k + args.batch]] for k in range(0, len(order), args.batch)],
        "one_by_one": [[wave] for wave in waves],
    }
    with torch.no_grad():
        inputs = {way: [model.decoder_inputs(g, None, "left") for g in batches] for way, batches in groups.items()}
    configs = {"batched": DecodeConfig(args.batch, limit), "one_by_one": DecodeConfig(1, limit)}

    reference = greedy_token_ids(model, waves, configs["batched"])
    assert reference == [greedy_token_ids(model, [w], configs["one_by_one"])[0] for w in waves], (
        "batched decoding must equal one-by-one decoding"
    )
    tokens = sum(len(ids) + 1 for ids in reference)  # + the EOS (or the step that hit the limit)

    phases: dict[str, Callable[[str], object]] = {
        "encode": lambda way: [model.decoder_inputs(g, None, "left") for g in groups[way]],
        "prefill": lambda way: [prefill(model.decoder, x) for x in inputs[way]],
        "generate": lambda way: [greedy_from_inputs(model.decoder, x, eos, limit) for x in inputs[way]],
        "end_to_end": lambda way: (
            greedy_token_ids(model, waves, configs["batched"])
            if way == "batched"
            else [greedy_token_ids(model, [w], configs["one_by_one"]) for w in waves]
        ),
    }
    seconds = {(phase, way): [] for phase in phases for way in groups}
    with torch.no_grad():
        for _ in range(args.runs):
            for phase, fn in phases.items():
                for way in groups:
                    start = time.perf_counter()
                    fn(way)
                    seconds[phase, way].append(time.perf_counter() - start)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    for way in groups:  # the steps after prefill: what generation adds to it
        median["steps", way] = median["generate", way] - median["prefill", way]

    lengths = [len(ids) for ids in reference]
    audio = [len(w) / 16_000 for w in waves]
    print(f"threads={torch.get_num_threads()} utterances={len(waves)} ({min(audio):.1f}-{max(audio):.1f} s)")
    print(f"hypothesis tokens: {min(lengths)}-{max(lengths)} (limit {limit}), {tokens} in all; median of {args.runs}")
    print(f"{'phase':<34}{'batched':>10}{'one by one':>12}{'ratio':>8}")
    rows = (
        ("encode (encoder + projector)", "encode"),
        ("prefill (speech + prompt)", "prefill"),
        ("steps after prefill", "steps"),
        ("end to end", "end_to_end"),
    )
    for label, phase in rows:
        batched, single = median[phase, "batched"], median[phase, "one_by_one"]
        print(f"{label:<34}{batched:>9.3f}s{single:>11.3f}s{single / batched:>8.2f}")
    for phase, label in (("steps", "token steps"), ("end_to_end", "end to end")):
        print(
            f"{label}: batched {tokens / median[phase, 'batched']:.0f} tokens/s, "
            f"one by one {tokens / median[phase, 'one_by_one']:.0f} tokens/s"
        )
    ratio = median["end_to_end", "one_by_one"] / median["end_to_end", "batched"]
    print(f"ratio batched/one-by-one: {ratio:.2f}")


def _model(path: Path | None, steps: int):
    if path is not None:
        return load_speech_llm(path)[0].eval()
    if (TRAINED / "speechllm.json").is_file():
        return load_speech_llm(TRAINED)[0].eval()
    cfg = SpeechLLMConfig(
        EncoderConfig(str(DEMO / "models" / "encoder")),
        DecoderConfig(str(DEMO / "models" / "decoder")),
        ProjectorConfig(hidden=256),
    )
    torch.manual_seed(0)
    model = build_speech_llm(cfg)
    train_set = load_dataset(DataConfig(source="manifest", path=str(DEMO / "train.jsonl")))
    samples = list(train_set.samples())
    train(model, samples, TrainConfig(steps=steps, batch_size=8, log_every=100, checkpoint_every=steps))
    save_speech_llm(model, cfg, TRAINED)
    return model.eval()


if __name__ == "__main__":
    main()
