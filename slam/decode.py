"""Batched greedy decoding of a SpeechLLM with a KV cache over `inputs_embeds`.

A batch is left-padded (position ids count real tokens only), prefilled once, then extended one
token per step. A row that produces EOS leaves the batch at once: its cache rows are dropped, so
finished hypotheses cost nothing while the others go on. Utterances are grouped by length before
batching, which keeps padding small. The result for each utterance is the one it gets alone.

The cache reserves room for the whole generation up front, so a step writes one position instead of
copying the cache, and (for sdpa decoders with full attention) the attention masks are built here once
per batch and extended by a column per step, instead of being rebuilt from the padding mask each step.
A batch without padding passes no mask at all.

`DecodeStats`, when given, adds up where the time went (encoding: speech to decoder inputs; decoding: prefill and
steps) and the tokens generated, for the decoding throughput a pruned model's speed is judged by.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from slam.config import DecodeConfig
from slam.model import DecoderInputs, SpeechLLM, decoder_stack


@dataclass
class DecodeStats:
    """Time and tokens of greedy decoding, added up over the calls it is given to."""

    encode_seconds: float = 0.0
    """Speech to decoder inputs: encoder, frame stacking, projector, prompt."""
    decode_seconds: float = 0.0
    """The decoder: prefill and every step after it."""
    tokens: int = 0
    """Tokens generated, each row's EOS included (a row stopped by the limit has none)."""

    @property
    def tokens_per_second(self) -> float:
        """Decoding throughput: generated tokens per second of decoder time (0 before any)."""
        return self.tokens / self.decode_seconds if self.decode_seconds else 0.0


def greedy_decode(
    model: SpeechLLM, waveforms: Sequence[np.ndarray], cfg: DecodeConfig, stats: DecodeStats | None = None
) -> list[str]:
    """Greedy hypotheses for a list of utterances, in input order.

    Args:
        model: The SpeechLLM (pruned and healed or not).
        waveforms: Mono 16 kHz waveforms.
        cfg: Batch size and token limit.
        stats: Adds this call's time and tokens, if given.

    Returns:
        One decoded text per waveform, special tokens removed.
    """
    token_ids = greedy_token_ids(model, waveforms, cfg, stats)
    return [model.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


@torch.no_grad()
def greedy_token_ids(
    model: SpeechLLM, waveforms: Sequence[np.ndarray], cfg: DecodeConfig, stats: DecodeStats | None = None
) -> list[list[int]]:
    """Greedy token ids (without EOS) for each utterance, batched by length.

    Args:
        model: The SpeechLLM.
        waveforms: Mono 16 kHz waveforms.
        cfg: Batch size and token limit.
        stats: Adds this call's time and tokens, if given.

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
            began = _clock()
            inputs = model.decoder_inputs([waveforms[i] for i in batch], targets=None, padding_side="left")
            encoded = _clock()
            eos = model.tokenizer.eos_token_id
            for i, ids in zip(batch, greedy_from_inputs(model.decoder, inputs, eos, cfg.max_new_tokens)):
                results[i] = ids
            if stats is not None:
                stats.encode_seconds += encoded - began
                stats.decode_seconds += _clock() - encoded
                stats.tokens += sum(len(results[i]) + (len(results[i]) < cfg.max_new_tokens) for i in batch)
    finally:
        model.train(was_training)
    return results


def prefill(
    decoder: PreTrainedModel, inputs: DecoderInputs, room: int = 0
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """Run the decoder once over left-padded inputs, filling a fresh KV cache.

    Args:
        decoder: The causal LM (pruned or not).
        inputs: Left-padded decoder inputs without targets (`SpeechLLM.decoder_inputs(..., padding_side="left")`).
        room: Tokens the cache reserves beyond the inputs, so that as many steps after this one write into it
            instead of copying it (a step past the reserve still works: the cache then grows by copying).

    Returns:
        The next-token logits of each row (b, V), the cache, and which cached positions hold real tokens
        (b, L) bool: the key mask, which grows by one column per generated token.
    """
    stack = decoder_stack(decoder)
    cache = DynamicCache(config=stack.config)
    cache.layers = [_ReservedLayer(room) for _ in cache.layers]
    real = inputs.attention_mask.bool()  # (b, L)
    if bool(real.all()):
        mask = None  # no padding: causal attention needs no mask (sdpa's fastest path)
    elif _builds_own_masks(stack.config):
        length = real.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()  # (L, L)
        # A padding position sees itself, so that no row of the mask is empty (some sdpa kernels give NaN there);
        # real positions never see padding, so what padding computes reaches no output.
        diagonal = torch.eye(length, dtype=torch.bool, device=real.device)
        mask = (causal & real[:, None, None, :]) | diagonal  # (b, 1, L, L)
    else:
        mask = inputs.attention_mask
    logits = decoder(
        inputs_embeds=inputs.inputs_embeds,
        attention_mask=mask,
        position_ids=inputs.position_ids,
        use_cache=True,
        logits_to_keep=1,
        **{_cache_keyword(decoder): cache},
    ).logits[:, -1]  # (b, V)
    return logits, cache, real


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
    own_masks = _builds_own_masks(decoder_stack(decoder).config)
    logits, cache, real = prefill(decoder, inputs, room=max_new_tokens)
    next_position = inputs.position_ids[:, -1] + 1  # (b,)
    rows = real.shape[0]
    active = torch.arange(rows, device=real.device)  # rows of the original batch still decoding
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
            active, tokens, real, next_position = (
                active[keep_rows],
                tokens[keep_rows],
                real[keep_rows],
                next_position[keep_rows],
            )
        real = torch.cat([real, real.new_ones(real.shape[0], 1)], dim=1)  # (b, L+1)
        logits = decoder(
            inputs_embeds=embed(tokens)[:, None],  # (b, 1, D)
            attention_mask=_step_mask(real, own_masks),
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_kw: cache},
        ).logits[:, -1]
        next_position = next_position + 1
    return outputs


def _clock() -> float:
    """Seconds, once the GPU (if any) has finished what was queued: CUDA kernels run asynchronously."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def _cache_keyword(decoder) -> str:
    # transformers renamed `past_key_values` to `cache`; the base model's signature says which one it takes.
    stack = decoder_stack(decoder)
    return "cache" if "cache" in inspect.signature(stack.forward).parameters else "past_key_values"


def _step_mask(real: torch.Tensor, own_masks: bool) -> torch.Tensor | None:
    # A generated token sees every real position before it: its mask is the key mask.
    if bool(real.all()):
        return None
    return real[:, None, None, :] if own_masks else real.long()


def _builds_own_masks(config) -> bool:
    # Masks built here, once per batch and extended per step, spare transformers from rebuilding them from the
    # padding mask at every step. They are what sdpa takes (bool, True = attend) and hold for full attention
    # only: another attention implementation or sliding-window layers get the padding mask and build their own.
    sliding = any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ())
    return getattr(config, "_attn_implementation", None) == "sdpa" and not sliding


class _ReservedLayer(DynamicLayer):
    """One layer's KV cache in buffers with room reserved for the tokens to come.

    `DynamicLayer` concatenates at every step, copying the whole cache; this layer writes the new positions
    into its buffers and returns views of the filled part. Past the reserve it grows by doubling.
    """

    def __init__(self, room: int):
        super().__init__()
        self.room = room
        self.length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.device = key_states.device
            self._keys = key_states.new_empty(_with_length(key_states, new + self.room))
            self._values = value_states.new_empty(_with_length(value_states, new + self.room))
            self.is_initialized = True
        elif self.length + new > self._keys.shape[-2]:
            self._keys = self._grown(self._keys, self.length + new)
            self._values = self._grown(self._values, self.length + new)
        self._keys[..., self.length : self.length + new, :] = key_states
        self._values[..., self.length : self.length + new, :] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[..., : self.length, :]
        self.values = self._values[..., : self.length, :]

    def _grown(self, buffer: torch.Tensor, needed: int) -> torch.Tensor:
        grown = buffer.new_empty(_with_length(buffer, max(needed, 2 * buffer.shape[-2])))
        grown[..., : self.length, :] = buffer[..., : self.length, :]
        return grown


def _with_length(states: torch.Tensor, length: int) -> tuple[int, ...]:
    return (*states.shape[:-2], length, states.shape[-1])
