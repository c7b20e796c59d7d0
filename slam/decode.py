"""Batched greedy decoding of a SpeechLLM with a KV cache over `inputs_embeds`.

A batch is left-padded (position ids count real tokens only), prefilled once, then extended one
token per step. A row that produces EOS leaves the batch at once: its cache rows are dropped, so
finished hypotheses cost nothing while the others go on. Utterances are grouped by length before
batching, which keeps padding small. The result for each utterance is the one it gets alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel

from slam.config import DecodeConfig
from slam.model import DecoderInputs, SpeechLLM, decoder_stack


def greedy_decode(model: SpeechLLM, waveforms: Sequence[np.ndarray], cfg: DecodeConfig) -> list[str]:
    """Greedy hypotheses for a list of utterances, in input order.

    Args:
        model: The SpeechLLM (pruned and healed or not).
        waveforms: Mono 16 kHz waveforms.
        cfg: Batch size and token limit.

    Returns:
        One decoded text per waveform, special tokens removed.
    """
    token_ids = greedy_token_ids(model, waveforms, cfg)
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


@torch.no_grad()
def greedy_token_ids(model: SpeechLLM, waveforms: Sequence[np.ndarray], cfg: DecodeConfig) -> list[list[int]]:
    """Greedy token ids (without EOS) for each utterance, batched by length.

    Args:
        model: The SpeechLLM.
        waveforms: Mono 16 kHz waveforms.
        cfg: Batch size and token limit.

    Returns:
        One list of generated token ids per waveform, in input order.
    """
    was_training = model.training
    model.eval()
    order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
    results: list[list[int]] = [[] for _ in waveforms]
    try:
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            inputs = model.decoder_inputs([waveforms[i] for i in batch], targets=None, padding_side="left")
            eos = model.tokenizer.eos_token_id
            for i, ids in zip(batch, greedy_from_inputs(model.decoder, inputs, eos, cfg.max_new_tokens)):
                results[i] = ids
    finally:
        model.train(was_training)
    return results


def prefill(decoder: PreTrainedModel, inputs: DecoderInputs) -> tuple[torch.Tensor, DynamicCache]:
    """Run the decoder once over left-padded inputs, filling a fresh KV cache.

    Args:
        decoder: The causal LM (pruned or not).
        inputs: Left-padded decoder inputs without targets (`SpeechLLM.decoder_inputs(..., padding_side="left")`).

    Returns:
        The next-token logits of each row (b, V) and the cache.
    """
    cache = DynamicCache(config=decoder_stack(decoder).config)
    logits = decoder(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=inputs.attention_mask,
        position_ids=inputs.position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_keyword(decoder): cache},
    ).logits[:, -1]  # (b, V)
    return logits, cache


@torch.no_grad()
def greedy_from_inputs(
    decoder: PreTrainedModel, inputs: DecoderInputs, eos_id: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy token ids (without EOS) for one left-padded batch: prefill, then one token per step.

    A row that produces EOS leaves the batch at once (its cache rows are dropped).

    Args:
        decoder: The causal LM.
        inputs: Left-padded decoder inputs without targets.
        eos_id: The token that ends a hypothesis.
        max_new_tokens: Tokens after which a hypothesis stops without EOS.

    Returns:
        One list of token ids per row.
    """
    embed = decoder.get_input_embeddings()
    cache_kw = _cache_keyword(decoder)
    logits, cache = prefill(decoder, inputs)
    mask = inputs.attention_mask  # (b, L)
    next_position = inputs.position_ids[:, -1] + 1  # (b,)
    rows = mask.shape[0]
    active = torch.arange(rows, device=mask.device)  # rows of the original batch still decoding
    outputs: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        tokens = logits.argmax(dim=-1)  # (b,)
        going = tokens != eos_id
        for row, token, keep in zip(active.tolist(), tokens.tolist(), going.tolist()):
            if keep:
                outputs[row].append(token)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep_rows = torch.nonzero(going).squeeze(1)
            cache.batch_select_indices(keep_rows)
            active, tokens, mask, next_position = (
                active[keep_rows],
                tokens[keep_rows],
                mask[keep_rows],
                next_position[keep_rows],
            )
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)  # (b, L+1)
        logits = decoder(
            inputs_embeds=embed(tokens)[:, None],  # (b, 1, D)
            attention_mask=mask,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_kw: cache},
        ).logits[:, -1]
        next_position = next_position + 1
    return outputs


def _cache_keyword(decoder) -> str:
    # transformers renamed `past_key_values` to `cache`; the base model's signature says which one it takes.
    stack = decoder_stack(decoder)
    return "cache" if "cache" in inspect.signature(stack.forward).parameters else "past_key_values"
