"""Tiny randomly initialised backbones, saved like hub models, for tests and hub-free runs.

No model hub is reachable from CI or a laptop without downloads, so the real loading code
(`from_pretrained` on a directory) is exercised on these: a byte-level BPE tokenizer trained on
the given text, a Qwen2- or Llama-shaped causal LM, and WavLM- or Whisper-shaped speech encoders
with their feature extractors.

    python -m slam.tiny lm --family qwen2 --layers 8 --text experiments/data/sentences.txt --out /tmp/tiny-qwen2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Wav2Vec2FeatureExtractor,
    WavLMConfig,
    WavLMModel,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperModel,
)

FAMILIES = ("qwen2", "llama")


def build_tokenizer(texts: Sequence[str], family: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`, with the family's special-token habits.

    Llama-style tokenizers prepend BOS by default; Qwen2-style ones add no special token.
    """
    _check_family(family)
    bos, eos = ("<s>", "</s>") if family == "llama" else ("<|im_start|>", "<|endoftext|>")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if family == "llama":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos if family == "llama" else None, eos_token=eos, pad_token=eos
    )


def build_tiny_lm(
    out_dir: str | Path,
    texts: Sequence[str],
    family: str = "qwen2",
    layers: int = 4,
    hidden: int = 64,
    seed: int = 0,
) -> Path:
    """Save a random causal LM and its tokenizer to `out_dir`; returns the directory."""
    tokenizer = build_tokenizer(texts, family)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    config = LlamaConfig(**common) if family == "llama" else Qwen2Config(**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return _save(out_dir, model, tokenizer)


def build_tiny_wavlm(out_dir: str | Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a random WavLM encoder (50 Hz frames, like WavLM Large) and its feature extractor."""
    config = WavLMConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        conv_dim=(32,) * 7,
        feat_extract_norm="layer",
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        num_buckets=16,
        max_bucket_distance=64,
    )
    torch.manual_seed(seed)
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    return _save(out_dir, WavLMModel(config), extractor)


def build_tiny_whisper(out_dir: str | Path, d_model: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """Save a random Whisper model (only its encoder is used) and its feature extractor."""
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=2,
        encoder_ffn_dim=2 * d_model,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=2 * d_model,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    torch.manual_seed(seed)
    return _save(out_dir, WhisperModel(config), WhisperFeatureExtractor(feature_size=80))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m slam.tiny {lm,wavlm,whisper} --out DIR ...`."""
    parser = argparse.ArgumentParser(prog="python -m slam.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("lm", "wavlm", "whisper"))
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument("--family", choices=FAMILIES, default="qwen2", help="decoder family (lm only)")
    parser.add_argument("--layers", type=int, default=8, help="number of layers")
    parser.add_argument("--text", help="text file whose lines train the tokenizer (lm only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "lm":
        if not args.text:
            parser.error("lm needs --text FILE to train its tokenizer")
        texts = [line for line in Path(args.text).read_text().splitlines() if line.strip()]
        out = build_tiny_lm(args.out, texts, family=args.family, layers=args.layers, seed=args.seed)
    elif args.kind == "wavlm":
        out = build_tiny_wavlm(args.out, layers=args.layers, seed=args.seed)
    else:
        out = build_tiny_whisper(args.out, layers=args.layers, seed=args.seed)
    print(out)


def _save(out_dir: str | Path, model, processor) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not allowed: expected one of {', '.join(FAMILIES)}")


if __name__ == "__main__":
    main()
