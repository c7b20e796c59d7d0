"""Physical layer pruning of a causal LM decoder.

Removed layers leave the module tree (their memory is freed once nothing else holds them),
`config.num_hidden_layers` and `config.layer_types` follow, and every kept layer's `layer_idx`
is renumbered so that the KV cache, which is indexed by `layer_idx`, stays exact.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable

from torch import nn

from slam.errors import BadInputError
from slam.model import decoder_stack


def drop_layers(decoder: nn.Module, removed: Iterable[int]) -> nn.Module:
    """Remove decoder layers in place and return the pruned model.

    Args:
        decoder: A causal LM (plain or PEFT-wrapped) whose body holds `layers`.
        removed: 1-based numbers of the layers to remove, e.g. `PathStep.removed`.

    Returns:
        The same model object, pruned.

    Raises:
        BadInputError: A layer number is out of range or repeated, or every layer would go.
    """
    stack = decoder_stack(decoder)
    m = len(stack.layers)
    removed = list(removed)
    bad = [layer for layer in removed if not _is_layer_number(layer) or not 1 <= layer <= m]
    if bad:
        raise BadInputError(f"layer numbers {bad} are out of range 1..{m}")
    if len(set(removed)) != len(removed):
        raise BadInputError(f"layer numbers {removed} repeat a layer")
    removed = [int(layer) for layer in removed]
    keep = [i for i in range(m) if i + 1 not in set(removed)]
    if not keep:
        raise BadInputError(f"removing {removed} would leave no decoder layer")
    stack.layers = nn.ModuleList([stack.layers[i] for i in keep])
    for new_idx, layer in enumerate(stack.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    for config in {id(c): c for c in (_base(decoder).config, stack.config)}.values():
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in keep]
        config.num_hidden_layers = len(keep)
    return decoder


def _is_layer_number(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _base(decoder: nn.Module) -> nn.Module:
    return decoder.get_base_model() if hasattr(decoder, "get_base_model") else decoder
