"""Batched greedy decoding (batch 16) against one-by-one decoding on the demo model and test split.

The demo SpeechLLM (shipped tiny encoder and decoder) needs a trained projector so that hypotheses
stop at EOS like real ones: `--model DIR` takes one saved with `slam.model.save_speech_llm`; without
it, one is trained here first (`--train-steps`, about a minute) and saved under `out/` for the next
run. Then the demo test utterances (different lengths) are decoded both ways, alternately, several
times in one process; tokens per second of each and the ratio of the medians are printed, the
ratio last. Target: at least 8x on 2 cores.

    python benchmarks/decode.py [--model DIR] [--runs 5] [--utterances 48]
"""

from __future__ import annotations

import argparse
import statistics
import time
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
from slam.decode import greedy_token_ids
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
    batched_cfg = DecodeConfig(batch_size=args.batch, max_new_tokens=args.max_new_tokens)
    single_cfg = DecodeConfig(batch_size=1, max_new_tokens=args.max_new_tokens)

    def batched() -> list[list[int]]:
        return greedy_token_ids(model, waves, batched_cfg)

    def one_by_one() -> list[list[int]]:
        return [greedy_token_ids(model, [w], single_cfg)[0] for w in waves]

    reference = batched()
    assert reference == one_by_one(), "batched decoding must equal one-by-one decoding"
    tokens = sum(len(ids) + 1 for ids in reference)  # + the EOS (or the step that hit the limit)
    rates = {"batched": [], "one_by_one": []}
    for _ in range(args.runs):
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            start = time.perf_counter()
            fn()
            rates[name].append(tokens / (time.perf_counter() - start))
    lengths = [len(ids) for ids in reference]
    seconds = [len(w) / 16_000 for w in waves]
    print(f"threads={torch.get_num_threads()} utterances={len(waves)} ({min(seconds):.1f}-{max(seconds):.1f} s)")
    print(f"hypothesis tokens: {min(lengths)}-{max(lengths)} (limit {args.max_new_tokens}), {tokens} in all")
    batched_rate, single_rate = statistics.median(rates["batched"]), statistics.median(rates["one_by_one"])
    print(f"batched (batch {args.batch}): {batched_rate:.0f} tokens/s (median of {args.runs})")
    print(f"one by one:        {single_rate:.0f} tokens/s (median of {args.runs})")
    print(f"ratio batched/one-by-one: {batched_rate / single_rate:.2f}")


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
