"""Tests for slam.train: LR schedule, data order, optimiser settings, checkpoints, exact resume, and DDP.

The DDP tests train in 2 processes of a gloo group (`torch.multiprocessing.spawn`, one CPU thread each) and
compare with single-process training on the doubled batch: the same samples per step and, up to float summation
order, the same gradient, so losses and weights agree to `DDP_TOLERANCE`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from slam.config import DecoderConfig, EncoderConfig, HealConfig, ProjectorConfig, SpeechLLMConfig, TrainConfig
from slam.errors import BadInputError
from slam.healing import add_healing
from slam.model import build_speech_llm
from slam.pruning import drop_layers
from slam.train import batch_indices, latest_checkpoint, lr_at, train

TEXTS = ["the river ran cold", "she opened the window", "a small boat", "seven birds", "a long letter", "the city"]
SECONDS = (0.3, 0.45, 0.6, 0.35, 0.5, 0.4)


@dataclass
class _Sample:
    """The two things training reads from a sample: audio and the target of a task."""

    audio: np.ndarray
    text: str
    translation: str

    def target(self, task: str) -> str:
        return self.text if task == "asr" else self.translation


class _RecordingTracker:
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))


@pytest.fixture(scope="module")
def samples() -> list[_Sample]:
    rng = np.random.default_rng(0)
    return [
        _Sample(0.1 * rng.standard_normal(int(s * 16_000)).astype(np.float32), text, text.upper())
        for s, text in zip(SECONDS, TEXTS)
    ]


@pytest.fixture(scope="module")
def build(qwen_dir, wavlm_dir):
    """Rebuild the same tiny SpeechLLM, as a new process would: plain, or pruned with healing adapters."""
    return functools.partial(_build_model, qwen_dir, wavlm_dir)


def _build_model(qwen_dir: Path, wavlm_dir: Path, heal: HealConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    cfg = SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    model = build_speech_llm(cfg)
    if heal is not None:
        drop_layers(model.decoder, [2])  # removes layer 2: layer 3 receives h_1 and becomes layer 2
        add_healing(model, 2, heal)
    return model


# High LoRA dropout, so that a resume that does not restore the torch RNG would draw other masks.
HEAL = HealConfig("decoder+projector", lora_rank=8, lora_alpha=8, lora_dropout=0.5)
CFG = TrainConfig(steps=8, batch_size=2, lr=1e-3, checkpoint_every=2, log_every=2, seed=3)


def _trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def _frozen(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def test_lr_schedule_is_constant_then_linear_to_zero_after_the_last_step():
    cfg = TrainConfig(steps=10, warmdown=0.6, lr=1.0)
    expected = [1.0] * 4 + [6 / 7, 5 / 7, 4 / 7, 3 / 7, 2 / 7, 1 / 7]
    assert [lr_at(s, cfg) for s in range(1, 11)] == pytest.approx(expected, rel=1e-12, abs=0)
    assert lr_at(11, cfg) == 0.0
    assert [lr_at(s, TrainConfig(steps=4, warmdown=1.0, lr=2.0)) for s in range(1, 5)] == pytest.approx(
        [8 / 5, 6 / 5, 4 / 5, 2 / 5], rel=1e-12, abs=0
    )
    assert {lr_at(s, TrainConfig(steps=5, warmdown=0.0, lr=5e-4)) for s in range(1, 6)} == {5e-4}
    paper = TrainConfig()  # 50,000 steps, 60% warmdown: the last constant step is 20,000
    assert (lr_at(20_000, paper), lr_at(20_001, paper)) == (5e-4, pytest.approx(5e-4 * 30_000 / 30_001))
    for bad in (0, 12):
        with pytest.raises(ValueError, match="out of range 1..11"):
            lr_at(bad, cfg)


def test_batch_indices_follow_the_seeded_epoch_permutations():
    cfg = TrainConfig(batch_size=4, seed=7)
    n = 6
    stream = [i for e in range(4) for i in np.random.default_rng([7, e]).permutation(n)]
    batches = [batch_indices(step, cfg, n) for step in range(1, 7)]
    assert sum(batches, []) == stream  # consecutive batches; step 2 straddles epochs 0 and 1
    for epoch in range(4):
        assert sorted(stream[epoch * n : (epoch + 1) * n]) == list(range(n))
    assert batch_indices(5, cfg, n) == batches[4]  # a function of (seed, step): order of calls does not matter
    assert stream[:n] != stream[n : 2 * n]  # every epoch has its own order
    other = [batch_indices(step, replace(cfg, seed=8), n) for step in range(1, 7)]
    assert other != batches
    with pytest.raises(ValueError, match="step=0"):
        batch_indices(0, cfg, n)


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(build, samples, tmp_path):
    model = build(HEAL)
    initial = _trainable(model)
    full = train(model, samples, CFG, tmp_path / "full")
    expected = _trainable(model)

    # Interrupted after step 3: the newest checkpoint is step 2, so step 3 is run again after the resume.
    first = train(build(HEAL), samples, CFG, tmp_path / "split", stop_after=3)
    assert (first.steps, first.resumed_from, first.checkpoint.name) == (3, 0, "step-000002")
    assert first.losses == full.losses[:3]
    resumed_model = build(HEAL)
    second = train(resumed_model, samples, CFG, tmp_path / "split")

    assert (second.steps, second.resumed_from, second.checkpoint.name) == (8, 2, "step-000008")
    assert second.losses == full.losses
    assert len(full.losses) == 8 and all(np.isfinite(full.losses))
    got = _trainable(resumed_model)
    assert got.keys() == expected.keys()
    assert any(".lora_B." in name for name in got) and any(name.startswith("projector.") for name in got)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
        assert not torch.equal(got[name], initial[name]), name  # every trainable tensor moved
    assert not resumed_model.training


def test_loss_goes_down_on_a_repeated_batch(build, samples):
    model = build(HealConfig("decoder+projector", lora_rank=8, lora_alpha=8))
    # A random LM with init std 0.02 has logits within about +-1 whatever its input, so its loss cannot move far
    # from ln(V); a 5x wider (tied) embedding table gives it the logit range of a trained model.
    with torch.no_grad():
        model.decoder.get_input_embeddings().weight.mul_(5.0)
    cfg = TrainConfig(steps=30, batch_size=2, lr=1e-2, warmdown=0.0, seed=0)
    result = train(model, samples[:2], cfg)
    assert result.steps == 30 and result.checkpoint is None
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_only_trainable_parameters_change(build, samples):
    model = build(HEAL)
    frozen, trainable = _frozen(model), _trainable(model)
    assert any(name.startswith("encoder.") for name in frozen) and any(".mlp.gate_proj.base_layer" in n for n in frozen)

    train(model, samples, replace(CFG, steps=3))

    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name
    after = _trainable(model)
    assert all(not torch.equal(after[name], trainable[name]) for name in trainable)


@pytest.mark.parametrize("clip", [1e-3, 1e6])
def test_adam_betas_and_gradient_clipping_are_applied(build, samples, tmp_path, clip):
    cfg = TrainConfig(steps=1, batch_size=3, lr=1e-3, betas=(0.8, 0.95), clip=clip)
    reference = build()  # projector only: no dropout, so its gradient is the one train() sees
    batch = [samples[i] for i in batch_indices(1, cfg, len(samples))]
    reference.train()
    reference([s.audio for s in batch], [s.target("asr") for s in batch]).backward()
    grads = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()]))
    assert grad_norm > 1e-2  # so that the small clip really clips

    train(build(), samples, cfg, tmp_path)

    optim = torch.load(tmp_path / "checkpoints" / "step-000001" / "optimizer.pt", weights_only=True)
    (group,) = optim["param_groups"]
    assert tuple(group["betas"]) == (0.8, 0.95)
    assert group["lr"] == lr_at(1, cfg)
    # After one step, exp_avg = (1 - b1) * g and exp_avg_sq = (1 - b2) * g**2 for the clipped gradient g.
    names = sorted(grads)  # the optimiser holds the parameters sorted by name
    clipped = [optim["state"][i]["exp_avg"] / (1 - 0.8) for i in range(len(names))]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped]))
    assert float(norm) == pytest.approx(min(clip, float(grad_norm)), rel=1e-4)
    scale = min(1.0, clip / float(grad_norm))
    for i, name in enumerate(names):
        torch.testing.assert_close(clipped[i], grads[name] * scale, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(optim["state"][i]["exp_avg_sq"] / (1 - 0.95), clipped[i] ** 2, rtol=1e-3, atol=1e-12)


def test_checkpoints_are_named_by_step_and_only_the_last_two_are_kept(build, samples, tmp_path):
    cfg = replace(CFG, steps=5)
    tracker = _RecordingTracker()
    model = build()
    result = train(model, samples, cfg, tmp_path, tracker=tracker)

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000004", "step-000005"]  # 2 and 4 by interval, 5 at the end
    assert latest_checkpoint(tmp_path) == result.checkpoint == root / "step-000005"
    assert sorted(p.name for p in result.checkpoint.iterdir()) == [
        "optimizer.pt",
        "state.json",
        "trainable.safetensors",
    ]
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 5
    assert state["losses"] == result.losses
    assert state["cfg"] == json.loads(json.dumps(asdict(cfg)))
    assert state["world_size"] == 1 and len(state["rng"]) == 1
    assert set(state["rng"][0]) >= {"python", "numpy", "torch"}
    tensors = load_file(result.checkpoint / "trainable.safetensors")
    assert set(tensors) == {
        "projector.net.0.weight",
        "projector.net.0.bias",
        "projector.net.2.weight",
        "projector.net.2.bias",
    }
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(tensors[name], p.detach()), name
    assert [step for _, step in tracker.calls] == [2, 4]
    for metrics, step in tracker.calls:
        assert metrics["train.loss"] == pytest.approx(np.mean(result.losses[step - 2 : step]))
        assert metrics["train.lr"] == lr_at(step, cfg)
        assert metrics["train.step"] == step
        assert metrics["train.steps_per_s"] > 0
    assert latest_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize("damaged", ["state.json", "trainable.safetensors", "optimizer.pt"])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(build, samples, tmp_path, caplog, damaged):
    cfg = replace(CFG, steps=5)
    full = train(build(), samples, cfg, tmp_path)
    path = tmp_path / "checkpoints" / "step-000005" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])

    model = build()
    with caplog.at_level(logging.WARNING, logger="slam.train"):
        again = train(model, samples, cfg, tmp_path)

    assert "step-000005 is unreadable" in caplog.text
    assert again.resumed_from == 4 and again.losses == full.losses  # step 5 run again, identically
    assert again.unreadable == [tmp_path / "checkpoints" / "step-000005"]
    assert (tmp_path / "checkpoints" / "step-000005.corrupt").is_dir()  # kept aside, not deleted
    assert latest_checkpoint(tmp_path) == again.checkpoint == tmp_path / "checkpoints" / "step-000005"
    tensors = load_file(again.checkpoint / "trainable.safetensors")
    assert all(torch.equal(tensors[n], p.detach()) for n, p in model.named_parameters() if p.requires_grad)


def test_no_readable_checkpoint_starts_over_and_says_so(build, samples, tmp_path, caplog):
    fresh = train(build(), samples, replace(CFG, steps=4), tmp_path / "fresh")
    train(build(), samples, replace(CFG, steps=4), tmp_path)
    for ckpt in (tmp_path / "checkpoints").iterdir():
        (ckpt / "state.json").write_text("{")

    with caplog.at_level(logging.WARNING, logger="slam.train"):
        again = train(build(), samples, replace(CFG, steps=4), tmp_path)

    assert "no checkpoint under" in caplog.text and "step-000004, step-000002" in caplog.text
    assert "training starts over from step 0" in caplog.text
    assert again.resumed_from == 0 and again.losses == fresh.losses
    assert [p.name for p in again.unreadable] == ["step-000004", "step-000002"]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000002.corrupt", "step-000004", "step-000004.corrupt"]


def test_a_checkpoint_that_would_run_code_is_not_unpickled(build, samples, tmp_path):
    cfg = replace(CFG, steps=2, checkpoint_every=1)
    train(build(), samples, cfg, tmp_path)
    marker = tmp_path / "ran"
    torch.save(_Planted(marker), tmp_path / "checkpoints" / "step-000002" / "optimizer.pt")

    again = train(build(), samples, cfg, tmp_path)
    assert not marker.exists()
    assert again.resumed_from == 1 and [p.name for p in again.unreadable] == ["step-000002"]


def test_checkpoint_of_another_model_or_config_is_rejected(build, samples, tmp_path):
    train(build(), samples, replace(CFG, steps=2), tmp_path)

    with pytest.raises(
        BadInputError, match=r"missing from the checkpoint: \[.*lora_A.*\]; not trainable in the model: \[\]"
    ):
        train(build(HEAL), samples, replace(CFG, steps=2), tmp_path)
    with pytest.raises(BadInputError, match=r"different config \(train.lr: 0.001 -> 0.002\)"):
        train(build(), samples, replace(CFG, steps=2, lr=2e-3), tmp_path)
    resumed = train(build(), samples, replace(CFG, steps=2, log_every=1), tmp_path)  # logging may change
    assert resumed.resumed_from == 2 and resumed.steps == 2


def test_non_finite_loss_stops_before_the_update(build, samples):
    model = build()
    before = _trainable(model)
    model.nll = lambda waveforms, targets: (model.projector.net[0].bias.sum() * float("nan"), torch.tensor(3))

    with pytest.raises(FloatingPointError, match="step 1: the training loss is nan"):
        train(model, samples, replace(CFG, steps=2))

    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)


def test_bad_inputs_are_named(build, samples):
    with pytest.raises(BadInputError, match="no training samples"):
        train(build(), [], CFG)
    model = build()
    model.requires_grad_(False)
    with pytest.raises(BadInputError, match="no trainable parameters"):
        train(model, samples, CFG)


def _manifest_dataset(directory: Path, samples, bad: int, policy: str):
    """The samples as a manifest of FLAC files, sample `bad`'s file corrupt."""
    import soundfile as sf

    from slam.config import DataConfig
    from slam.data import load_dataset

    directory.mkdir(exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        audio = directory / f"{i}.flac"
        if i == bad:
            audio.write_bytes(np.random.default_rng(0).bytes(3000))
        else:
            sf.write(audio, sample.audio, 16_000, format="FLAC")
        lines.append(json.dumps({"audio": audio.name, "text": sample.text, "translation": sample.translation}))
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return load_dataset(DataConfig(source="manifest", path=str(directory / "train.jsonl"), on_bad_sample=policy))


def test_bad_audio_is_an_error_naming_the_file_unless_skipped(build, samples, tmp_path):
    cfg = replace(CFG, steps=4)
    bad = batch_indices(1, cfg, len(samples))[0]
    with pytest.raises(BadInputError, match=rf"train\.jsonl line {bad + 1} .*{bad}\.flac.*cannot decode audio"):
        train(build(), _manifest_dataset(tmp_path / "data", samples, bad, "error").for_training(), cfg)


def test_skipped_bad_audio_is_replaced_and_reported_across_a_resume(build, samples, tmp_path):
    cfg = replace(CFG, steps=4, checkpoint_every=2)
    # A sample of step 1 that steps 3 and 4 (run again after resuming from step 2) do not meet: only the
    # checkpoint can tell the resumed run that training left it out.
    batches = {step: batch_indices(step, cfg, len(samples)) for step in (1, 3, 4)}
    bad = min(set(batches[1]) - set(batches[3]) - set(batches[4]))
    data = tmp_path / "data"
    full = train(build(), _manifest_dataset(data, samples, bad, "skip").for_training(), cfg, tmp_path / "full")
    assert len(full.skipped) == 1
    where, reason = full.skipped[0]
    assert where.endswith(f"train.jsonl line {bad + 1} ({data / f'{bad}.flac'})") and "cannot decode audio" in reason
    assert len(full.losses) == 4 and all(np.isfinite(full.losses))

    view = _manifest_dataset(data, samples, bad, "skip").for_training()
    first = train(build(), view, cfg, tmp_path / "split", stop_after=3)
    assert first.skipped == full.skipped
    fresh = _manifest_dataset(data, samples, bad, "skip")
    second = train(build(), fresh.for_training(), cfg, tmp_path / "split")
    assert second.resumed_from == 2 and fresh.skipped == []  # the resumed steps never read the bad file
    assert second.skipped == full.skipped
    assert second.losses == full.losses


def test_a_checkpoint_written_before_ddp_support_resumes(build, samples, tmp_path):
    cfg = replace(CFG, steps=2)
    full = train(build(), samples, cfg, tmp_path)
    state_file = full.checkpoint / "state.json"
    state = json.loads(state_file.read_text())
    del state["world_size"]
    state["rng"] = state["rng"][0]  # the old layout: one process's RNG states, no process count
    state_file.write_text(json.dumps(state))

    again = train(build(), samples, cfg, tmp_path)

    assert (again.resumed_from, again.losses) == (2, full.losses)


# Losses (relative) and weights (absolute and relative) of 2-process DDP against one process on the doubled batch;
# measured: losses 5e-8 relative, weights 6e-8 absolute.
DDP_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def ddp_runs(qwen_dir, wavlm_dir, samples, tmp_path_factory) -> Path:
    """The DDP runs of this module, in one 2-process gloo group; rank r of run X left `X-{r}.pt` here."""
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(2, out, qwen_dir, wavlm_dir, samples), nprocs=2, join=True)
    return out


def test_ddp_training_equals_one_process_on_the_doubled_batch(ddp_runs, build, samples):
    ranks = [torch.load(ddp_runs / f"projector-{rank}.pt", weights_only=False) for rank in (0, 1)]
    # Rank 1 started from another random projector: DDP's initial broadcast and averaged gradients keep it equal.
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == CFG.steps
    for name, tensor in ranks[0]["trainable"].items():
        assert torch.equal(tensor, ranks[1]["trainable"][name]), name
    assert [step for _, step in ranks[0]["logged"]] == [2, 4, 6, 8] and ranks[1]["logged"] == []

    reference = build()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the DDP processes
    try:
        single = train(reference, samples, replace(CFG, batch_size=2 * CFG.batch_size))
    finally:
        torch.set_num_threads(threads)

    np.testing.assert_allclose(ranks[0]["losses"], single.losses, rtol=DDP_TOLERANCE, atol=0)
    expected = _trainable(reference)
    assert expected.keys() == ranks[0]["trainable"].keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(ranks[0]["trainable"][name], tensor, rtol=DDP_TOLERANCE, atol=DDP_TOLERANCE)
        assert not torch.equal(tensor, _trainable(build())[name]), name  # training moved it
    state = json.loads((latest_checkpoint(ddp_runs / "projector") / "state.json").read_text())
    assert state["world_size"] == 2 and state["rng"][0] != state["rng"][1]  # each rank's own RNG states


def test_ddp_resume_is_exact_on_every_rank(ddp_runs):
    for rank in (0, 1):
        full = torch.load(ddp_runs / f"heal-full-{rank}.pt", weights_only=False)
        split = torch.load(ddp_runs / f"heal-split-{rank}.pt", weights_only=False)
        assert (split["resumed_from"], split["steps"]) == (2, CFG.steps)
        assert split["first"] == full["losses"][:3] and split["losses"] == full["losses"]
        assert any(".lora_B." in name for name in full["trainable"])
        for name, tensor in full["trainable"].items():
            assert torch.equal(split["trainable"][name], tensor), (rank, name)
    assert sorted(p.name for p in (ddp_runs / "heal-split" / "checkpoints").iterdir()) == [
        "step-000006",
        "step-000008",
    ]


def test_a_checkpoint_of_another_number_of_processes_is_an_error(ddp_runs, build, samples):
    with pytest.raises(BadInputError, match="written by 2 training processes but this run has 1"):
        train(build(), samples, CFG, ddp_runs / "projector")


def _ddp_worker(rank: int, world: int, out: Path, qwen_dir: Path, wavlm_dir: Path, samples: list[_Sample]) -> None:
    """One rank: a projector run, and a healing run (LoRA dropout) whole and interrupted then resumed."""
    torch.set_num_threads(1)  # two processes on the CPUs of one
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=world)
    try:
        build = functools.partial(_build_model, qwen_dir, wavlm_dir)
        tracker = _RecordingTracker()
        # Each rank builds its own random initialisation: DDP starts every rank from rank 0's.
        model = build(seed=rank)
        result = train(model, samples, CFG, out / "projector", tracker=tracker)
        torch.save({**_outcome(model, result), "logged": tracker.calls}, out / f"projector-{rank}.pt")
        model = build(HEAL, seed=rank)
        torch.save(_outcome(model, train(model, samples, CFG, out / "heal-full")), out / f"heal-full-{rank}.pt")
        first = train(build(HEAL, seed=rank), samples, CFG, out / "heal-split", stop_after=3)
        model = build(HEAL, seed=rank)
        resumed = train(model, samples, CFG, out / "heal-split")
        torch.save({**_outcome(model, resumed), "first": first.losses}, out / f"heal-split-{rank}.pt")
    finally:
        dist.destroy_process_group()


def _outcome(model, result) -> dict:
    return {
        "trainable": _trainable(model),
        "losses": result.losses,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
    }


class _Planted:
    """Unpickling this writes a file: what a malicious checkpoint or model would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))
