"""`slamgrid path`: the JSON contract of DESIGN section 4 and one-line errors for user mistakes; `slamgrid status`
without the training stack."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import threading

import numpy as np
import pytest

from grid.cli import _parser, main
from slam.config import DecoderConfig, DistanceConfig
from slam.metrics import format_percent
from slam.model import load_decoder
from slam.redundancy import TEXT_TOKEN, text_layer_distances
from tests.conftest import REPO, SENTENCES


def test_path_writes_the_contract(lm_dir, tmp_path, sentences, capsys):
    out = tmp_path / "sub" / "path.json"
    argv = ["path", "--model", str(lm_dir), "--text", str(SENTENCES), "--out", str(out)]
    assert main(argv + ["--max-samples", "7", "--batch-size", "3"]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"model", "n_layers", "source", "num_samples", "token", "layout", "convention", "distance",
                           "path"}  # fmt: skip
    assert (report["convention"], report["token"]) == ("paper", TEXT_TOKEN)
    m = report["n_layers"]
    assert (report["model"], m, report["source"], report["num_samples"]) == (str(lm_dir), 6, "text", 7)
    distance = np.array(report["distance"])
    assert distance.shape == (m + 1, m + 1)
    decoder, tokenizer = load_decoder(DecoderConfig(str(lm_dir)))
    direct = text_layer_distances(decoder, tokenizer, sentences[:7], DistanceConfig(batch_size=3))
    np.testing.assert_allclose(distance, direct.distance, atol=1e-12)
    assert [step["n"] for step in report["path"]] == list(range(2, m))
    for step in report["path"]:
        assert set(step) == {"n", "start", "removed", "fraction", "distance", "receiving_layer"}
        assert step["removed"] == list(range(step["start"] + 1, step["start"] + step["n"]))
        assert step["receiving_layer"] == step["start"] + 1
        assert step["fraction"] == (step["n"] - 1) / m
        assert step["distance"] == distance[step["start"], step["start"] + step["n"]]
        candidates = [distance[layer, layer + step["n"]] for layer in range(1, m - step["n"] + 1)]
        assert step["distance"] == min(candidates)
    lines = capsys.readouterr().out.splitlines()
    assert str(out) in lines[0]
    # The human answer: per fraction, the block to drop and its distance.
    assert lines[1].split() == ["drop", "%", "n", "block", "l", "layers", "removed", "distance"]
    assert len(lines) == 2 + len(report["path"])
    for line, step in zip(lines[2:], report["path"]):
        removed = step["removed"]
        span = str(removed[0]) if len(removed) == 1 else f"{removed[0]}-{removed[-1]}"
        expected = [format_percent(step["fraction"]), str(step["n"]), str(step["start"]), span]
        assert line.split() == [*expected, f"{step['distance']:.4f}"]


def test_path_convention_gromov_removes_the_n_layers_of_each_block(qwen_dir, tmp_path):
    out = tmp_path / "gromov.json"
    argv = ["path", "--model", str(qwen_dir), "--text", str(SENTENCES), "--out", str(out), "--max-samples", "5"]
    assert main(argv + ["--convention", "gromov"]) == 0
    report = json.loads(out.read_text())
    m, distance = report["n_layers"], np.array(report["distance"])
    assert report["convention"] == "gromov"
    assert [step["n"] for step in report["path"]] == list(range(1, m - 1))
    for step in report["path"]:
        candidates = [distance[layer, layer + step["n"]] for layer in range(0, m - step["n"] + 1)]
        assert step["start"] == int(np.argmin(candidates))
        assert step["removed"] == list(range(step["start"] + 1, step["start"] + step["n"] + 1))
        assert step["fraction"] == step["n"] / m
    with pytest.raises(SystemExit) as caught:  # argparse: a choice that is not offered
        main(argv + ["--convention", "shortgpt"])
    assert caught.value.code == 2


def test_path_skips_empty_lines_and_truncates(qwen_dir, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("\n  the river ran cold and clear  \n\n\na cat\n")
    out = tmp_path / "p.json"
    assert main(["path", "--model", str(qwen_dir), "--text", str(text), "--out", str(out), "--max-length", "3"]) == 0
    assert json.loads(out.read_text())["num_samples"] == 2


def test_path_reads_text_from_a_pipe(qwen_dir, tmp_path):
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("the river ran cold\na cat\nseven birds\n"))
    writer.start()
    out = tmp_path / "p.json"
    assert main(["path", "--model", str(qwen_dir), "--text", str(fifo), "--out", str(out)]) == 0
    writer.join()
    assert json.loads(out.read_text())["num_samples"] == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-model", "no such model directory"),
        ("empty-text", "no non-empty line"),
        ("not-causal", "model type 'wavlm' is not a causal LM"),
        ("missing-text", "no such text file"),
        ("bad-batch", "distance.batch_size=0 is not allowed"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(case, message, qwen_dir, wavlm_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    model = {"missing-model": str(tmp_path / "nope"), "not-causal": str(wavlm_dir)}.get(case, str(qwen_dir))
    text = {"empty-text": str(empty), "missing-text": str(tmp_path / "none.txt")}.get(case, str(SENTENCES))
    argv = ["path", "--model", model, "--text", text, "--out", str(tmp_path / "o.json")]
    if case == "bad-batch":
        argv += ["--batch-size", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("slamgrid: error: ") and message in err
    assert not (tmp_path / "o.json").exists()


def test_console_error_has_no_traceback(tmp_path):
    argv = ["path", "--model", str(tmp_path / "nope"), "--text", str(SENTENCES), "--out", str(tmp_path / "o.json")]
    result = subprocess.run([sys.executable, "-m", "grid", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"slamgrid: error: {tmp_path / 'nope'}: no such model directory"


def test_status_reads_the_store_without_importing_torch_or_ray(tmp_path):
    from grid.cells import expand
    from grid.experiment import load_experiment
    from grid.tracking import GridStore

    demo = REPO / "experiments" / "demo.yaml"
    exp = load_experiment(demo)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = GridStore(uri, exp.name)
    cells = expand(exp)
    with store.start_cell(cells[0]):
        pass
    # `slamgrid status` as the console script runs it, then what it imported.
    code = (
        "import sys; from grid.cli import main; code = main(sys.argv[1:]); print(sorted(sys.modules)); sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "status", str(demo), "--tracking-uri", uri], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    *printed, modules = result.stdout.splitlines()
    assert printed[:3] == [f"demo: {len(cells)} cells", "  FINISHED  1", f"  PENDING   {len(cells) - 1}"]
    imported = {name.strip("'") for name in modules.strip("[]").split(", ")}
    assert "grid.status" in imported and "mlflow" in imported
    assert not imported & {"torch", "ray", "transformers", "grid.runner", "grid.stages"}


def _manifest(directory, count, seed):
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        sf.write(directory / f"{i}.flac", 0.1 * rng.standard_normal(8_000 + 1_000 * i), 16_000)
        lines.append(json.dumps({"audio": f"{i}.flac", "text": f"the river ran cold {i}"}))
    (directory / "m.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "m.jsonl"


def test_path_from_speech_pools_the_sets(qwen_dir, wavlm_dir, tmp_path):
    import torch

    from slam.config import DataConfig, EncoderConfig, ProjectorConfig, SpeechLLMConfig
    from slam.data import load_dataset
    from slam.model import build_speech_llm, load_speech_llm, save_speech_llm
    from slam.redundancy import speech_layer_distances

    cfg = SpeechLLMConfig(EncoderConfig(str(wavlm_dir)), DecoderConfig(str(qwen_dir)), ProjectorConfig(hidden=32))
    torch.manual_seed(0)
    save_speech_llm(build_speech_llm(cfg), cfg, tmp_path / "slam")
    sets = [_manifest(tmp_path / "dev-a", 3, 0), _manifest(tmp_path / "dev-b", 3, 1)]
    out = tmp_path / "speech.json"
    argv = ["path", "--model", str(tmp_path / "slam"), "--out", str(out), "--max-samples", "2"]
    assert main(argv + ["--speech", str(sets[0]), "--speech", str(sets[1]), "--batch-size", "3"]) == 0
    report = json.loads(out.read_text())
    assert (report["source"], report["num_samples"], report["n_layers"]) == ("speech", 4, 6)
    model, _ = load_speech_llm(tmp_path / "slam")
    pairs = [
        (s.audio, s.text)
        for m in sets
        for s in load_dataset(DataConfig(source="manifest", path=str(m), max_samples=2)).samples()
    ]
    direct = speech_layer_distances(model.eval(), pairs, DistanceConfig(batch_size=1))
    np.testing.assert_allclose(np.array(report["distance"]), direct.distance, atol=1e-5)
    assert [s["n"] for s in report["path"]] == [2, 3, 4, 5]


def test_path_speech_spec_errors(tmp_path, capsys):
    argv = ["path", "--model", str(tmp_path), "--out", str(tmp_path / "o.json"), "--speech", "tedlium:x"]
    assert main(argv) == 2
    assert "--speech 'tedlium:x': expected a manifest .jsonl or SOURCE:PATH[:SPLIT[:NAME]]" in capsys.readouterr().err
    assert main(["path", "--model", str(tmp_path), "--out", str(tmp_path / "o.json"), "--speech", "x.jsonl"]) == 2
    assert "x.jsonl" in capsys.readouterr().err  # the manifest is read before any model is loaded


def test_version_and_help_for_every_option_and_an_example_per_command(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"slamgrid {version('slamgrid')}"
    parser = _parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert set(commands.choices) == {"run", "plan", "status", "summarize", "export", "path"}
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help, f"slamgrid {name} {action.option_strings or action.dest}: no help text"
        example = command.epilog.split("example:\n", 1)[1].strip()
        assert example.startswith(f"slamgrid {name} "), name
        # The example parses as the command's own arguments.
        command.parse_args(shlex.split(example)[2:])
