"""The `slamgrid` command line: `run`, `status` and `summarize` of an experiment grid, `path` of one model.

User mistakes (a missing file, a model that cannot be used, a bad value) end with a one-line
`slamgrid: error: ...` on stderr and exit code 2, without a traceback; so does what stops the grid from
outside the experiment file (`grid.errors.GridError`: another driver, a dead Ray cluster, an unreachable
store, an unwritable directory), with exit code 3. `run` exits 1 when cells are left unfinished and 130
when stopped by SIGINT or SIGTERM (its running cells marked KILLED). Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from grid.cells import Cell
    from grid.status import GridStatus

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_HANDLER = "slamgrid-stderr"


def main(argv: Sequence[str] | None = None) -> int:
    """Run `slamgrid`; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    # One progress bar per artifact read (summaries read many) would bury the tables.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's INFO lines (creating a new store's tables) would come before a one-line error, or bury the tables.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from grid.errors import EXIT_ENVIRONMENT, GridError
    from slam.errors import BadInputError

    try:
        return args.func(args)
    except (BadInputError, ValueError, FileNotFoundError) as err:
        print(f"slamgrid: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except GridError as err:
        print(f"slamgrid: error: {err}", file=sys.stderr)
        return EXIT_ENVIRONMENT


def cmd_path(args: argparse.Namespace) -> int:
    """`slamgrid path`: the distance matrix and optimal pruning path, from text or from speech."""
    import torch
    from transformers.utils import logging as hf_logging

    from slam.config import DecoderConfig, DistanceConfig
    from slam.model import load_decoder, load_speech_llm
    from slam.redundancy import path_report, path_table, speech_layer_distances, text_layer_distances

    hf_logging.disable_progress_bar()
    cfg = DistanceConfig(batch_size=args.batch_size, max_samples=args.max_samples, max_length=args.max_length)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.text:
        texts = _read_lines(Path(args.text))
        decoder, tokenizer = load_decoder(
            DecoderConfig(name=args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        )
        result = text_layer_distances(decoder.to(device), tokenizer, texts, cfg)
    else:
        # --max-samples applies to each set, so every dev set is represented in the pooled mean.
        from slam.data import load_dataset

        sets = [load_dataset(_data_config(spec, args.on_bad_sample, args.max_samples)) for spec in args.speech]
        model, _ = load_speech_llm(args.model)
        pooled = replace(cfg, max_samples=None)
        result = speech_layer_distances(model.to(device).eval(), _speech_pairs(sets, args.task), pooled)
    report = path_report(args.model, result, "text" if args.text else "speech", args.convention)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.model}: {result.n_layers} layers, {result.num_samples} samples, {args.convention} path -> {out}")
    print(path_table(report))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """`slamgrid run`: run (or resume) every cell of an experiment; exit 1 unless all of them finished."""
    from grid.progress import resolve_mode
    from grid.runner import run_experiment

    mode = resolve_mode(args.progress)
    _log_to_stderr(mode)
    # A scheduler's (or `kill`'s) SIGTERM stops the grid as Ctrl-C does: running cells KILLED, resumable.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = run_experiment(
            args.experiment,
            tracking_uri=args.tracking_uri,
            workdir=args.workdir,
            workers=args.workers,
            ray_address=args.address,
            dashboard_host=args.dashboard_host,
            feature_cache=_feature_cache(args.feature_cache),
            progress=mode,
            **({"backbones_per_worker": args.backbones_per_worker} if args.backbones_per_worker else {}),
            **({"retries": args.retries} if args.retries is not None else {}),
        )
    except KeyboardInterrupt:
        print(
            "slamgrid: interrupted; the running cells are marked KILLED. Run the same command again to resume them",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"started {report.started} cell(s); backbone loads: {sum(report.loads.values())}")
    _print_status(report.status)
    from grid.summarize import summarize

    print()
    print(summarize(args.experiment, tracking_uri=args.tracking_uri).text())
    _print_ui_hint(args.tracking_uri, report.status.experiment)
    return 0 if report.status.all_finished else 1


def cmd_export(args: argparse.Namespace) -> int:
    """`slamgrid export`: finished prune cells' pruned and healed models as files to deploy."""
    from transformers.utils import logging as hf_logging

    from grid.export import export_cells

    hf_logging.disable_progress_bar()
    cells = [args.cell] if args.cell else args.cells
    out = export_cells(args.experiment, cells, args.out, tracking_uri=args.tracking_uri, device=args.device)
    if len(cells) == 1:
        print(
            f"exported cell {cells[0]} to {out}: decoder/ (plain transformers: AutoModelForCausalLM.from_pretrained"
            f"('{out}/decoder')), the whole SpeechLLM: slam.model.load_speech_llm('{out}')"
        )
    else:
        print(
            f"exported {len(cells)} cells on one backbone to {out}: decoder/ once, tasks/NAME/ per task; serve them "
            f"with slam.export.SharedBackbone('{out}').model(task)"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """`slamgrid plan`: the cells of an experiment, those finished, and the slot-hours left; runs nothing."""
    from grid.plan import plan_experiment

    print(plan_experiment(args.experiment, args.tracking_uri, args.timings, args.measure).text())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """`slamgrid status`: cells per state, read from the store, and why cells failed or are blocked."""
    from grid.status import experiment_status

    _print_status(experiment_status(args.experiment, tracking_uri=args.tracking_uri))
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    """`slamgrid summarize`: Table 1, Table 2, Figures 1 and 2 from the MLflow store, logged to the parent run."""
    from grid.summarize import REPORT_DIR, summarize

    summary = summarize(args.experiment, tracking_uri=args.tracking_uri, log=not args.no_log, out=args.out)
    print(summary.text())
    figures = ", ".join(f"{name}.png" for name in summary.figures) or "no figure yet"
    if args.out:
        print(f"\nwritten to {args.out}/: tables as .txt, .csv and .md, summary.json, {figures}")
    if not args.no_log:
        print(f"\nlogged to the parent run of experiment {summary.experiment!r} under {REPORT_DIR}/ ({figures})")
    _print_ui_hint(args.tracking_uri, summary.experiment)
    return 0


def _log_to_stderr(mode: str) -> None:
    """The runner's lines (a cell started, finished, failed; progress) on stderr; the final table goes to stdout.

    A live display (`rich`) prints them above itself, through its console; otherwise each is a `slamgrid:` line.
    The handler is replaced, not added again, when `run` is called more than once in a process.
    """
    import logging

    if mode == "rich":
        from rich.logging import RichHandler

        from grid.progress import shared_console

        handler: logging.Handler = RichHandler(console=shared_console(), show_path=False, markup=False)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("slamgrid: %(message)s"))
    handler.set_name(_HANDLER)
    for name in ("grid.runner", "grid.lease", "grid.progress"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == _HANDLER]:
            logger.removeHandler(old)
        logger.addHandler(handler)
    for name in ("grid.runner", "grid.progress"):
        logging.getLogger(name).setLevel(logging.INFO)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _print_ui_hint(tracking_uri: str | None, experiment: str) -> None:
    """How to look at the results in the MLflow UI: its runs table of the experiment, in the model-training layout."""
    from grid.tracking import UI_LAYOUT, experiment_id_of
    from grid.tracking import tracking_uri as resolve

    uri = resolve(tracking_uri)
    found = experiment_id_of(uri, experiment)
    page = f"/#/experiments/{found}?{UI_LAYOUT}" if found is not None else ""
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: open {uri.rstrip('/')}{page} (experiment {experiment!r})")
    else:
        print(
            f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000, "
            f"then open http://127.0.0.1:5000{page} (experiment {experiment!r}; tables and figures on its run `grid`: "
            f"its description and, under Artifacts, report/)"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slamgrid",
        description="Decoder-layer redundancy of SpeechLLMs: the paper's grid on Ray, tracked in MLflow.",
        epilog="example: slamgrid run experiments/demo.yaml (the whole demo grid on this machine); "
        "slamgrid COMMAND --help for each command",
    )
    parser.add_argument("--version", action="version", version=f"slamgrid {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, what: str, example: str) -> argparse.ArgumentParser:
        # Raw: the example keeps its own line.
        return sub.add_parser(
            name,
            help=what,
            description=what,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    run = command(
        "run",
        "run or resume every cell of an experiment file on Ray, tracked in MLflow",
        "slamgrid run experiments/demo.yaml --workers 2 --progress plain",
    )
    run.add_argument("experiment", help="experiment file (YAML), e.g. experiments/demo.yaml")
    _add_tracking_uri(run)
    run.add_argument("--workdir", default="out", help="root of the cells' working directories (checkpoints)")
    run.add_argument(
        "--workers",
        type=_positive_int,
        help="slots to use, each a cell worker or a DDP training process (default: one per GPU, else per CPU)",
    )
    run.add_argument(
        "--address",
        help="Ray cluster address, or `local` for a new local Ray (default: $RAY_ADDRESS, else the cluster "
        "`ray start` ran on this machine, else a local Ray)",
    )
    run.add_argument(
        "--retries",
        type=_non_negative_int,
        help="times a cell whose worker or trainer process died is started again in this run (default: 2)",
    )
    run.add_argument(
        "--dashboard-host",
        default="127.0.0.1",
        help="interface the Ray dashboard of a local Ray listens on (default: 127.0.0.1, this machine only; "
        "0.0.0.0 opens it to the network)",
    )
    run.add_argument(
        "--feature-cache",
        metavar="DIR|off",
        help="where frozen-encoder outputs are computed once and reused by every cell (default: WORKDIR/features; "
        "on a cluster a directory every node sees); `off` encodes every utterance in every cell",
    )
    run.add_argument(
        "--backbones-per-worker",
        type=_positive_int,
        help="decoders a worker keeps loaded, least recently used dropped first (default: 2)",
    )
    run.add_argument(
        "--progress",
        metavar="auto|rich|plain|off",
        default="auto",
        help="how progress is shown: rich (a live display of the grid and each training), plain (log lines, "
        "every 30 s while something changes), off; auto (default): rich on a terminal, else plain",
    )
    run.set_defaults(func=cmd_run)
    plan = command(
        "plan",
        "cells of an experiment file by kind and model, those finished, and the slot-hours left",
        "slamgrid plan experiments/paper.yaml",
    )
    plan.add_argument("experiment", help="experiment file (YAML)")
    _add_tracking_uri(plan)
    plan.add_argument(
        "--timings",
        metavar="FILE",
        help="YAML of timings per decoder (step_s, batch_size, utterance_s, forward_s, encoder_s), used first",
    )
    plan.add_argument(
        "--measure",
        action="store_true",
        help="measure the timings of models in local directories on this machine (default: derive them from "
        "model sizes, for an H100)",
    )
    plan.set_defaults(func=cmd_plan)
    status = command(
        "status",
        "cells of an experiment file per state, from the MLflow store",
        "slamgrid status experiments/demo.yaml --tracking-uri sqlite:///mlflow.db",
    )
    status.add_argument("experiment", help="experiment file (YAML)")
    _add_tracking_uri(status)
    status.set_defaults(func=cmd_status)
    summary = command(
        "summarize",
        "Table 1/2 and Figure 1/2 of an experiment file from the MLflow store, logged to its parent run",
        "slamgrid summarize experiments/demo.yaml --out report/",
    )
    summary.add_argument("experiment", help="experiment file (YAML)")
    _add_tracking_uri(summary)
    summary.add_argument("--no-log", action="store_true", help="print only; log nothing to the parent run")
    summary.add_argument(
        "--out",
        metavar="DIR",
        help="also write the tables (.txt, .csv, .md), summary.json and the figures (.png) into DIR",
    )
    summary.set_defaults(func=cmd_summarize)
    export = command(
        "export",
        "write finished prune cells' pruned (and healed) models: one as a Hugging Face decoder plus projector, "
        "several tasks as one shared backbone with a projector and adapter each",
        "slamgrid export experiments/demo.yaml --cell 1a2b3c4d --out pruned/",
    )
    export.add_argument("experiment", help="experiment file (YAML)")
    chosen = export.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--cell", help="the prune cell to export (its id, or a unique prefix, as `status` prints)")
    chosen.add_argument(
        "--cells", nargs="+", metavar="ID", help="prune cells of different tasks that remove the same layers"
    )
    export.add_argument("--out", required=True, help="new (or empty) directory to write")
    _add_tracking_uri(export)
    export.add_argument("--device", default="cpu", help="where the models are rebuilt: cpu (default), cuda, cuda:N")
    export.set_defaults(func=cmd_export)
    path = command(
        "path",
        "distance matrix and optimal pruning path of an LLM from text (or of a saved SpeechLLM from speech)",
        "slamgrid path --model Qwen/Qwen2.5-7B --text some.txt --out qwen7b-path.json",
    )
    path.add_argument(
        "--model", required=True, help="causal LM (hub id or directory) with --text; a saved SpeechLLM with --speech"
    )
    source = path.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="text file, one sample per non-empty line")
    source.add_argument(
        "--speech",
        action="append",
        help="evaluation set, repeatable: a manifest .jsonl, or SOURCE:PATH[:SPLIT[:NAME]] "
        "(librispeech, loquacious, covost2); samples of all sets are pooled",
    )
    path.add_argument("--task", choices=("asr", "ast"), default="asr", help="target text of speech samples")
    path.add_argument(
        "--on-bad-sample",
        choices=("error", "skip"),
        default="error",
        help="a sample whose audio is missing or unreadable: stop with its file and line (error, default) or leave it "
        "out and say so (skip)",
    )
    path.add_argument("--out", required=True, help="JSON file to write")
    path.add_argument("--max-samples", type=int, default=None, help="use only the first N samples (of each set)")
    path.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    path.add_argument("--max-length", type=int, default=512, help="truncate each sample to this many tokens")
    path.add_argument(
        "--convention",
        choices=("paper", "gromov"),
        default="paper",
        help="block convention of the path: paper (eq. 2, block n removes n-1 layers) or gromov (n layers)",
    )
    path.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights' dtype (default: float32; distances are computed in float32 either way)",
    )
    path.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    path.add_argument("--trust-remote-code", action="store_true", help="allow code shipped with the model")
    path.set_defaults(func=cmd_path)
    return parser


def _add_tracking_uri(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slamgrid")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def _print_status(status: GridStatus) -> None:
    """Counts per state, then each failed and blocked cell with its reason."""
    print(f"{status.experiment}: {len(status.cells)} cells")
    for state, count in status.counts.items():
        print(f"  {state:<9} {count}")
    groups = (("failed", ("FAILED", "KILLED")), ("interrupted", ("INTERRUPTED",)), ("blocked", ("BLOCKED",)))
    for title, states in groups:
        listed = [cell for cell in status.cells if cell.state in states]
        if listed:
            print(f"{title}:")
        for cell in listed:
            print(f"  {_describe(cell.cell)}: {cell.reason or 'no error recorded'}")
    from grid.provenance import code_tags, describe

    current = describe(code_tags())
    other = status.other_code(current)
    if other:
        versions = ", ".join(f"{version} ({count})" for version, count in other.items())
        print(
            f"warning: {sum(other.values())} finished cell(s) came from another code version than this checkout's "
            f"({current}): {versions}; their results stand as they are (a rerun does not redo them)"
        )


def _describe(cell: Cell) -> str:
    """`kind id [tag=value ...]`: the id is the MLflow tag `cell_id`, the tags say what the cell is."""
    shown = ("model", "task", "path.source", "n", "healing", "study")
    tags = " ".join(f"{key}={cell.tags[key]}" for key in shown if key in cell.tags)
    return f"{cell.kind} {cell.id} [{tags}]"


def _feature_cache(value: str | None) -> str | bool:
    """`--feature-cache`: a directory, `off` (no cache), or not given (the working directory's)."""
    if value is None:
        return True
    return False if value == "off" else value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return int(text)


def _data_config(spec: str, on_bad_sample: str, max_samples: int | None):
    from slam.config import DATA_SOURCES, DataConfig

    if spec.endswith(".jsonl"):
        return DataConfig(source="manifest", path=spec, max_samples=max_samples, on_bad_sample=on_bad_sample)
    parts = spec.split(":")
    if parts[0] not in DATA_SOURCES or not 2 <= len(parts) <= 4:
        raise ValueError(f"--speech {spec!r}: expected a manifest .jsonl or SOURCE:PATH[:SPLIT[:NAME]]")
    fields = dict(zip(("source", "path", "split", "name"), parts))
    return DataConfig(**fields, max_samples=max_samples, on_bad_sample=on_bad_sample)


def _speech_pairs(sets, task: str):
    for dataset in sets:
        for sample in dataset.samples():
            yield sample.audio, sample.target(task)


def _read_lines(path: Path) -> list[str]:
    from slam.errors import BadInputError

    # Not `is_file()`: a pipe (`--text <(...)`) is a fine source too.
    if not path.exists() or path.is_dir():
        raise BadInputError(f"{path}: no such text file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    lines = [line for line in lines if line]
    if not lines:
        raise BadInputError(f"{path}: no non-empty line to use as a sample")
    return lines
