"""Post-pruning healing (paper 3.3): LoRA on the receiving block's MLP and/or the projector unfrozen.

Everything else is frozen. A decoder that carries the baseline LoRA (the LoRA-adapted SpeechLLM)
has it merged into its weights first: it stays frozen during healing, and the healing adapter is
then the only adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

from slam.config import HealConfig
from slam.errors import BadInputError
from slam.model import SpeechLLM, decoder_stack


@dataclass(frozen=True)
class HealReport:
    """Trainable parameters after healing is set up.

    Attributes:
        strategy: The healing strategy.
        receiving_layer: 1-based number, in the pruned decoder, of the layer that got the LoRA.
        decoder_trainable: Trainable parameters in the decoder (the healing LoRA).
        projector_trainable: Trainable parameters in the projector.
        total: All parameters of the SpeechLLM.
    """

    strategy: str
    receiving_layer: int
    decoder_trainable: int
    projector_trainable: int
    total: int

    @property
    def trainable(self) -> int:
        """All trainable parameters."""
        return self.decoder_trainable + self.projector_trainable


def add_healing(model: SpeechLLM, receiving_layer: int, cfg: HealConfig) -> HealReport:
    """Set up a healing strategy on a pruned SpeechLLM, in place.

    Args:
        model: The pruned SpeechLLM; its decoder is replaced by a PEFT model when the strategy heals it.
        receiving_layer: 1-based number, in the pruned decoder, of the layer that receives h_{l*}
            (`PathStep.receiving_layer`).
        cfg: Strategy and LoRA settings.

    Returns:
        The trainable-parameter counts.
    """
    m = len(decoder_stack(model.decoder).layers)
    if not 1 <= receiving_layer <= m:
        raise BadInputError(f"receiving_layer={receiving_layer} is out of range 1..{m}")
    if hasattr(model.decoder, "merge_and_unload"):
        model.decoder = model.decoder.merge_and_unload()
    model.requires_grad_(False)
    if cfg.heals_decoder:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.lora_targets),
            layers_to_transform=[receiving_layer - 1],
            layers_pattern="layers",
        )
        model.decoder = get_peft_model(model.decoder, lora)
    if cfg.heals_projector:
        model.projector.requires_grad_(True)
    return HealReport(
        strategy=cfg.strategy,
        receiving_layer=receiving_layer,
        decoder_trainable=_count(model.decoder, trainable=True),
        projector_trainable=_count(model.projector, trainable=True),
        total=_count(model, trainable=False),
    )


def _count(module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)
