"""Batched greedy decoding (batch 16) against one-by-one decoding on the demo model and test split.

The demo SpeechLLM (shipped tiny encoder and decoder) needs a trained projector so that hypotheses
stop at EOS like real ones: `--model DIR` takes one saved with `slam.model.save_speech_llm`; without
it, one is trained here first (`--train-steps`, about a minute) and saved under `out/` for the next
run. Then the demo test utterances (different lengths) are decoded both ways, alternately, several
times in one process, and the medians are compared phase by phase: encoding (speech to decoder
inputs: encoder, stacking, projector), prefill (the first decoder pass over speech + prompt), the
token-by-token steps after it, decoding (prefill and steps: `greedy_from_inputs`, what `generate`
does), and the whole of `greedy_token_ids`. Tokens per second count the generated tokens (EOS
included). For reference, the same run times a plain transformers `generate` on the demo decoder,
batched against one by one: on the same decoder inputs (padding, stopping at EOS; it must give the
same tokens), and on equal-length inputs without EOS (random embeddings of the test batches' mean
input length, generating their mean hypothesis length: generate's best case). It also prints the
most the end-to-end ratio could reach if decoding took no time (the whole one-by-one run against the
batched encoding alone), and how our batched decoding compares with `generate` batched on the same inputs
(target: at least 1.0, never slower than the library). With the encoder's outputs cached, a grid cell's evaluation
is decoding alone, so the decoding ratio (prefill and steps, batch 16 against one by one, on precomputed decoder
inputs) is printed last; the end-to-end ratio before it, for reference. Target: at least 8x on 2 cores.

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
from slam.model import DecoderInputs, build_speech_llm, load_speech_llm, save_speech_llm
from slam.train import train

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "demo"
TRAINED = Path(__file__).resolve().parents[1] / "out" / "bench-decode-slam"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="a saved SpeechLLM (default: train one)")
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--runs", type=int, default=7, help="alternating runs of each way")
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
    generated = [row for x in inputs["batched"] for row in _generate(model.decoder, x, eos, limit).tolist()]
    by_length = [reference[i] for i in order]
    assert [[t for t in row if t != eos] for row in generated] == by_length, "generate must give the same tokens"
    tokens = sum(len(ids) + 1 for ids in reference)  # + the EOS (or the step that hit the limit)

    plain = _plain_generate_inputs(inputs["batched"], reference)
    phases: dict[str, Callable[[str], object]] = {
        "encode": lambda way: [model.decoder_inputs(g, None, "left") for g in groups[way]],
        "prefill": lambda way: [prefill(model.decoder, x, limit) for x in inputs[way]],
        "decoding": lambda way: [greedy_from_inputs(model.decoder, x, eos, limit) for x in inputs[way]],
        "end_to_end": lambda way: (
            greedy_token_ids(model, waves, configs["batched"])
            if way == "batched"
            else [greedy_token_ids(model, [w], configs["one_by_one"]) for w in waves]
        ),
        "generate_same": lambda way: [_generate(model.decoder, x, eos, limit) for x in inputs[way]],
        "generate_equal": lambda way: (
            _generate(model.decoder, plain["inputs"], None, plain["new_tokens"])
            if way == "batched"
            else [_generate(model.decoder, row, None, plain["new_tokens"]) for row in plain["rows"]]
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
        median["steps", way] = median["decoding", way] - median["prefill", way]

    lengths = [len(ids) for ids in reference]
    audio = [len(w) / 16_000 for w in waves]
    print(f"threads={torch.get_num_threads()} utterances={len(waves)} ({min(audio):.1f}-{max(audio):.1f} s)")
    print(f"hypothesis tokens: {min(lengths)}-{max(lengths)} (limit {limit}), {tokens} in all; median of {args.runs}")
    print(f"{'phase':<34}{'batched':>10}{'one by one':>12}{'ratio':>8}")
    rows = (
        ("encode (encoder + projector)", "encode"),
        ("prefill (speech + prompt)", "prefill"),
        ("steps after prefill", "steps"),
        ("decoding (prefill + steps)", "decoding"),
        ("end to end", "end_to_end"),
    )
    for label, phase in rows:
        batched, single = median[phase, "batched"], median[phase, "one_by_one"]
        print(f"{label:<34}{batched:>9.3f}s{single:>11.3f}s{single / batched:>8.2f}")
    for phase, label in (("decoding", "decoding"), ("end_to_end", "end to end")):
        print(
            f"{label}: batched {tokens / median[phase, 'batched']:.0f} tokens/s, "
            f"one by one {tokens / median[phase, 'one_by_one']:.0f} tokens/s"
        )
    equal_tokens = plain["new_tokens"] * len(plain["rows"])
    shape = f"{len(plain['rows'])} x {plain['inputs'].inputs_embeds.shape[1]} embeddings"
    equal = f"equal lengths, no EOS ({shape}, {plain['new_tokens']} tokens)"
    print("reference, plain transformers generate:")
    for phase, label, count in (("generate_same", "the same inputs", tokens), ("generate_equal", equal, equal_tokens)):
        batched, single = median[phase, "batched"], median[phase, "one_by_one"]
        print(
            f"  {label}: batched {count / batched:.0f} tokens/s, one by one {count / single:.0f} tokens/s, "
            f"ratio {single / batched:.2f}"
        )
    bound = median["end_to_end", "one_by_one"] / median["encode", "batched"]
    print(f"end to end, if decoding took no time (one-by-one run / batched encoding): at most {bound:.2f}")
    ours = median["generate_same", "batched"] / median["decoding", "batched"]
    print(f"ours against plain generate, both batched on the same inputs (tokens/s ratio, target >= 1.0): {ours:.2f}")
    end_to_end = median["end_to_end", "one_by_one"] / median["end_to_end", "batched"]
    print(f"end to end batched/one-by-one (for reference): {end_to_end:.2f}")
    decoding = median["decoding", "one_by_one"] / median["decoding", "batched"]
    print(f"decoding ratio batched/one-by-one (prefill and steps, encoder outputs precomputed): {decoding:.2f}")


def _plain_generate_inputs(batches: list[DecoderInputs], reference: list[list[int]]) -> dict:
    length = round(statistics.mean(x.inputs_embeds.shape[1] for x in batches))
    scale = statistics.mean(float(x.inputs_embeds.std()) for x in batches)
    rows, dim = len(batches[0].inputs_embeds), batches[0].inputs_embeds.shape[2]
    embeds = scale * torch.randn(rows, length, dim, generator=torch.Generator().manual_seed(0))
    ones = torch.ones(rows, length, dtype=torch.long)
    positions = torch.arange(length).expand(rows, length)
    inputs = DecoderInputs(embeds, ones, positions)
    return {
        "inputs": inputs,
        "rows": [DecoderInputs(embeds[i : i + 1], ones[i : i + 1], positions[i : i + 1]) for i in range(rows)],
        "new_tokens": round(statistics.mean(len(ids) + 1 for ids in reference)),
    }


def _generate(decoder, inputs: DecoderInputs, eos: int | None, new_tokens: int) -> torch.Tensor:
    return decoder.generate(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=1 if eos is not None else new_tokens,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else decoder.config.pad_token_id,
    )


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
