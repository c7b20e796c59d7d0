"""A pruned and healed SpeechLLM as files a practitioner deploys: one task, or several tasks on one backbone.

What healing trained is kept with its cell (`save_healed`, `restore_healed`): the projector when it was healed, the
healing LoRA when the decoder was. From a model rebuilt that way:

- `export_speech_llm` writes one task's model: `decoder/`, a standard Hugging Face checkpoint of the pruned decoder
  with the healing LoRA merged into its weights (its `num_hidden_layers` the kept layers), with its tokenizer, which
  plain `transformers.AutoModelForCausalLM.from_pretrained` loads; beside it the projector (`trained.safetensors`)
  and the SpeechLLM's `config.json`, whose decoder is `./decoder`, so that `slam.model.load_speech_llm(DIR)` loads
  the whole model. The encoder is referenced as the model was built from it (a hub id, or a directory).
- `export_tasks` writes several tasks that share the pruned backbone (the paper's conclusion: ASR and AST on the
  ASR-derived path remove the same layers): the backbone once in `decoder/`, without any healing LoRA, and per task
  `tasks/NAME/` with its SpeechLLM config (prompt, encoder), projector, and healing LoRA as a PEFT adapter
  (`adapter/`) when the task healed the decoder. `SharedBackbone(DIR)` loads the backbone once and serves each task.

Both write `export.json`: where the model came from (what the caller passes, e.g. the grid cell) and the layers
removed, numbered in the original decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slam.config import SpeechLLMConfig, to_dict
from slam.errors import BadInputError
from slam.model import (
    Projector,
    SpeechLLM,
    load_decoder,
    load_encoder,
    read_speech_llm_config,
    resolve_saved_names,
    restore_trained,
    save_speech_llm,
)

HEALED_FILE = "healed.safetensors"
"""What healing trained, by parameter name in the healed SpeechLLM (`save_healed`)."""
DECODER_DIR = "decoder"
"""The pruned decoder's Hugging Face checkpoint in an export."""
TASKS_DIR = "tasks"
"""The per-task parts of a multi-task export."""
ADAPTER_DIR = "adapter"
"""A task's healing LoRA, as a PEFT adapter, in a multi-task export."""
MANIFEST_FILE = "export.json"
"""Where an export came from, and what it removed."""


def save_healed(model: SpeechLLM, out_dir: str | Path) -> Path | None:
    """Save the parameters healing trained (those that require grad) to `out_dir/healed.safetensors`.

    Args:
        model: A pruned SpeechLLM after `slam.healing.add_healing` (and training).
        out_dir: Directory to write.

    Returns:
        The file, or None when nothing was trained (healing `none`): the pruned model is then the trained one.
    """
    trained = {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    if not trained:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(trained, out / HEALED_FILE)
    return out / HEALED_FILE


def restore_healed(model: SpeechLLM, path: str | Path) -> None:
    """Copy what `save_healed` saved into a SpeechLLM pruned and set up for healing the same way, in place.

    Raises:
        BadInputError: The saved parameters are not the model's trainable ones.
    """
    file = Path(path)
    state = load_file(file)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        diff = sorted(set(state) ^ set(params))
        raise BadInputError(f"{file}: healed weights do not match the model ({diff[0]} and others)")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def export_speech_llm(model: SpeechLLM, cfg: SpeechLLMConfig, out_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write one pruned (and healed) SpeechLLM for deployment (see the module's docstring).

    Args:
        model: The pruned SpeechLLM, healed or not; a healing LoRA is merged into a copy of its decoder.
        cfg: The config it was built from (its encoder, projector and prompt are kept; its decoder becomes
            `./decoder`, without LoRA).
        out_dir: The directory to write; it must not hold files already.
        manifest: What to record about where the model came from, with `removed` (original layer numbers).

    Returns:
        The directory.
    """
    out = _empty_directory(out_dir)
    decoder = _merged(model.decoder)
    decoder.save_pretrained(out / DECODER_DIR)
    model.tokenizer.save_pretrained(out / DECODER_DIR)
    standalone = SpeechLLM(model.encoder, model.projector, decoder, model.tokenizer, model.prompt)
    save_speech_llm(standalone, _local_decoder(cfg, f"./{DECODER_DIR}"), out)
    _write_manifest(out, {**manifest, "kind": "speech_llm", "num_hidden_layers": decoder.config.num_hidden_layers})
    return out


def export_tasks(
    models: Mapping[str, tuple[SpeechLLM, SpeechLLMConfig]], out_dir: str | Path, manifest: Mapping[str, Any]
) -> Path:
    """Write several tasks that share one pruned backbone: the backbone once, a projector and adapter per task.

    Args:
        models: Task name -> its pruned (and healed) SpeechLLM and config; every decoder must be the same pruned
            backbone (the caller checks the removed layers), adapted per task only by its healing LoRA.
        out_dir: The directory to write; it must not hold files already.
        manifest: What to record (per-task details under `tasks`, the `removed` layers).

    Returns:
        The directory.

    Raises:
        BadInputError: Fewer than two tasks, or decoders whose pruned weights differ.
    """
    if len(models) < 2:
        raise BadInputError(f"a multi-task export needs at least two tasks, got {len(models)}")
    out = _empty_directory(out_dir)
    bases = {name: _base_decoder(model.decoder) for name, (model, _) in models.items()}
    first_name, first = next(iter(bases.items()))
    reference = first.state_dict()
    for name, base in bases.items():
        state = base.state_dict()
        if set(state) != set(reference) or any(not torch.equal(state[key], reference[key]) for key in reference):
            raise BadInputError(
                f"tasks {first_name} and {name} do not share one pruned backbone: their decoders' weights differ "
                "(a baseline LoRA or another decoder)"
            )
    first.save_pretrained(out / DECODER_DIR)
    next(iter(models.values()))[0].tokenizer.save_pretrained(out / DECODER_DIR)
    for name, (model, cfg) in models.items():
        task_dir = out / TASKS_DIR / name
        standalone = SpeechLLM(model.encoder, model.projector, bases[name], model.tokenizer, model.prompt)
        save_speech_llm(standalone, _local_decoder(cfg, f"../../{DECODER_DIR}"), task_dir)
        if hasattr(model.decoder, "peft_config"):
            model.decoder.save_pretrained(task_dir / ADAPTER_DIR)
    layers = first.config.num_hidden_layers
    _write_manifest(out, {**manifest, "kind": "shared_backbone", "tasks": list(models), "num_hidden_layers": layers})
    return out


class SharedBackbone:
    """The tasks of a multi-task export (`export_tasks`), served from one loaded backbone.

    The decoder is loaded once; each task's healing LoRA is a named PEFT adapter on it, its projector and prompt
    its own, and each distinct encoder is loaded once. `model(task)` switches the decoder to that task's adapter
    (or to none), so the models it returns share the decoder: use one task's model at a time.
    """

    def __init__(self, path: str | Path) -> None:
        """Load the backbone, the encoders, the projectors and the adapters of an export.

        Raises:
            BadInputError: `path` is not a multi-task export.
        """
        root = Path(path)
        manifest = _read_manifest(root)
        if manifest.get("kind") != "shared_backbone":
            raise BadInputError(f"{root}: not a multi-task export (its {MANIFEST_FILE} says {manifest.get('kind')!r})")
        self.tasks: list[str] = list(manifest["tasks"])
        configs = {task: _task_config(root, task) for task in self.tasks}
        decoder, self.tokenizer = load_decoder(configs[self.tasks[0]].decoder)
        self._adapters = [task for task in self.tasks if (root / TASKS_DIR / task / ADAPTER_DIR).is_dir()]
        if self._adapters:
            from peft import PeftModel

            first, *rest = self._adapters
            decoder = PeftModel.from_pretrained(decoder, root / TASKS_DIR / first / ADAPTER_DIR, adapter_name=first)
            for task in rest:
                decoder.load_adapter(root / TASKS_DIR / task / ADAPTER_DIR, adapter_name=task)
        self.decoder = decoder.eval()
        encoders: dict[str, Any] = {}
        self._models: dict[str, SpeechLLM] = {}
        for task, cfg in configs.items():
            key = json.dumps(to_dict(cfg.encoder), sort_keys=True)
            if key not in encoders:
                encoders[key] = load_encoder(cfg.encoder)
            projector = Projector(encoders[key].dim, self.decoder.get_input_embeddings().embedding_dim, cfg.projector)
            model = SpeechLLM(encoders[key], projector, self.decoder, self.tokenizer, cfg.prompt)
            restore_trained(model, cfg, root / TASKS_DIR / task)
            self._models[task] = model.eval()

    def model(self, task: str) -> SpeechLLM:
        """The SpeechLLM of `task`, its adapter active on the shared decoder (none if it did not heal it).

        Raises:
            KeyError: Not a task of the export.
        """
        if task not in self._models:
            raise KeyError(f"no task {task!r} in this export: {', '.join(self.tasks)}")
        if self._adapters:
            if task in self._adapters:
                self.decoder.base_model.enable_adapter_layers()
                self.decoder.set_adapter(task)
            else:
                self.decoder.base_model.disable_adapter_layers()
        return self._models[task]

    def to(self, device: torch.device | str) -> SharedBackbone:
        """Move every part to `device`."""
        for model in self._models.values():
            model.to(device)
        return self


def _merged(decoder: torch.nn.Module) -> torch.nn.Module:
    """A plain Hugging Face decoder with any LoRA merged into its weights; `decoder` itself is left as it is."""
    plain = copy.deepcopy(decoder)
    return plain.merge_and_unload() if hasattr(plain, "merge_and_unload") else plain


def _base_decoder(decoder: torch.nn.Module) -> torch.nn.Module:
    """The pruned backbone under a healing adapter: a copy of the decoder with the adapter taken off, unmerged."""
    plain = copy.deepcopy(decoder)
    return plain.unload() if hasattr(plain, "unload") else plain


def _local_decoder(cfg: SpeechLLMConfig, name: str) -> SpeechLLMConfig:
    return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, name=name, lora=None))


def _task_config(root: Path, task: str) -> SpeechLLMConfig:
    task_dir = root / TASKS_DIR / task
    return resolve_saved_names(read_speech_llm_config(task_dir), task_dir)


def _empty_directory(out_dir: str | Path) -> Path:
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BadInputError(f"{out}: exists and is not an empty directory; export into a new one")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _write_manifest(out: Path, manifest: Mapping[str, Any]) -> None:
    (out / MANIFEST_FILE).write_text(json.dumps(dict(manifest), indent=2) + "\n")


def _read_manifest(root: Path) -> dict[str, Any]:
    file = root / MANIFEST_FILE
    if not file.is_file():
        raise BadInputError(f"{root}: not an export (no {MANIFEST_FILE})")
    return json.loads(file.read_text())
