"""Safe defaults: services on the loopback interface, no code shipped with a model run unless a model asks, YAML
without object tags, checkpoints that cannot run code, no shell, and the cluster's MLflow server off the public
interface.
"""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from grid.cells import expand
from grid.experiment import load_experiment
from grid.runner import LOOPBACK, _init_ray
from slam.config import DecoderConfig
from slam.errors import BadInputError
from slam.model import load_decoder
from slam.tiny import build_tiny_lm
from tests.grid.world import TEXTS, write_experiment

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted((REPO / "grid").glob("*.py")) + sorted((REPO / "slam").glob("*.py"))


def test_a_local_ray_the_grid_starts_serves_its_dashboard_on_the_loopback_only():
    _init_ray("local", LOOPBACK)
    try:
        url = ray.get_runtime_context().gcs_address and ray._private.worker.global_worker.node.address_info["webui_url"]
        host, port = url.split(":")
        listening = [
            c.laddr for c in psutil.net_connections("inet") if c.status == "LISTEN" and c.laddr.port == int(port)
        ]
    finally:
        ray.shutdown()
    assert host == LOOPBACK and listening and all(addr.ip == LOOPBACK for addr in listening)


def test_the_mlflow_ui_hint_and_the_cluster_keep_services_off_public_interfaces(capsys):
    from grid.cli import _print_ui_hint

    _print_ui_hint("sqlite:///mlflow.db", "demo")
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1" in capsys.readouterr().out

    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    commands = [shlex.split(c.replace("$(hostname -I | awk '{print $1}')", "PRIVATE_IP"))
                for c in cluster["head_start_ray_commands"]]  # fmt: skip
    [server] = [c for c in commands if "mlflow" in c and c[c.index("mlflow") + 1] == "server"]
    # The head's first address is its private (VPC) one: workers reach it, the internet does not.
    assert server[server.index("--host") + 1] == "PRIVATE_IP"
    [head] = [c for c in commands if "--head" in c]
    assert "--dashboard-host=127.0.0.1" in head


def test_code_shipped_with_a_model_is_not_run_unless_its_model_asks(tmp_path):
    model = build_tiny_lm(tmp_path / "lm", TEXTS, layers=2, hidden=32)
    marker = tmp_path / "ran"
    (model / "planted.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('code ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"}
    (model / "config.json").write_text(json.dumps(config))
    assert DecoderConfig(name=str(model)).trust_remote_code is False
    try:
        load_decoder(DecoderConfig(name=str(model)))
    except BadInputError as err:  # a model that needs its own code is refused rather than run
        assert "planted" in str(err) or "trust_remote_code" in str(err)
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_set_on_the_model_in_the_experiment_file(tmp_path):
    path = write_experiment(tmp_path, "trust", [{"name": "t", "task": "asr", "models": ["tiny"],
                                                 "paths": [{"source": "text"}], "depths": []}])  # fmt: skip
    _touch_world(tmp_path)
    assert all(not _trusts(cell.config) for cell in expand(load_experiment(path)))
    doc = yaml.safe_load(path.read_text())
    doc["models"]["tiny"]["decoder"]["trust_remote_code"] = True
    path.write_text(yaml.safe_dump(doc))
    assert all(_trusts(cell.config) for cell in expand(load_experiment(path)) if "decoder" in json.dumps(cell.config))


def test_yaml_object_tags_are_refused_not_constructed(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:pathlib.Path.write_text [{str(marker)!r}, 'code ran']\n")
    with pytest.raises(BadInputError, match="evil.yaml"):
        load_experiment(path)
    assert not marker.exists()


def test_the_code_loads_checkpoints_safely_and_builds_no_shell_command():
    for source in SOURCES:
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{source.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", where
            assert name not in ("pickle.load", "pickle.loads", "os.system", "os.popen", "eval", "exec"), where
            if name.startswith("subprocess."):
                assert keywords.get("shell", "False") == "False", where
                assert not isinstance(node.args[0], ast.Constant | ast.JoinedStr), f"{where}: a command string"


def _trusts(config: dict) -> bool:
    found = []

    def walk(value):
        if isinstance(value, dict):
            if "trust_remote_code" in value:
                found.append(value["trust_remote_code"])
            for item in value.values():
                walk(item)

    walk(config)
    return bool(found) and all(found)


def _touch_world(root: Path) -> None:
    """Empty stand-ins for the world's files: expanding an experiment reads no model."""
    for name in ("encoder", "lm"):
        (root / name).mkdir(exist_ok=True)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        (root / name).touch()
