"""`search: bisect` against the full sweep: pruned cells run, and whether both find the same removable fraction.

On a store where a sweep of an experiment's studies has finished (e.g. after `slamgrid run experiments/demo.yaml`),
each study with depths is turned into a bisect study and expanded again and again on the sweep's results, as
`slamgrid run` would after each wave (a cell's result is the same whichever asked for it: same id), until every
search has decided. Printed per study: pruned cells of the sweep and of the search, and per (model, path,
healing) the removable fraction the sweep found (`slam.metrics.removable_fraction` over every depth) and the one
the search found (its deepest passing depth). Then the same on a synthetic 32-layer curve (Llama-3.1-8B's depth,
30 depths) for every position of the threshold. The last line is the ratio of pruned cells, search over sweep.

    python benchmarks/search.py [experiments/demo.yaml] [--tracking-uri sqlite:///mlflow.db]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import yaml

from grid.cells import expand
from grid.experiment import load_experiment
from grid.tracking import GridStore, tracking_uri
from slam.config import TASK_METRICS
from slam.metrics import bisect_depth, removable_fraction, set_scores, within_threshold

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", nargs="?", default=str(REPO / "experiments" / "demo.yaml"))
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args()
    path = Path(args.experiment).resolve()
    exp = load_experiment(path)
    results = GridStore(tracking_uri(args.tracking_uri), exp.name).results()
    sweep_cells = [c for c in expand(exp, results) if c.kind == "prune"]
    missing = [c.id for c in sweep_cells if c.id not in results]
    if missing:
        raise SystemExit(f"{len(missing)} pruned cells of the sweep have no finished result: run the sweep first")
    total_sweep = total_search = 0
    for study in exp.studies:
        if study.measures_only:
            continue
        bisect = _as_bisect(path, study.name)
        asked = _search(bisect, results)
        swept = [c for c in sweep_cells if study.name in c.tags["study"].split(",")]
        searched = [c for c in asked if c.kind == "prune" and study.name in c.tags["study"].split(",")]
        total_sweep, total_search = total_sweep + len(swept), total_search + len(searched)
        print(f"study {study.name}: {len(swept)} pruned cells in the sweep, {len(searched)} in the search")
        metric = TASK_METRICS[exp.tasks[study.task].task]
        baseline = {c.config["train_cell"]: set_scores(results[c.id], metric) for c in expand(exp) if c.kind == "eval"}
        groups = sorted({(c.tags["model"], c.tags["path.source"], c.tags["healing"]) for c in swept})
        for group in groups:
            rows = [c for c in swept if (c.tags["model"], c.tags["path.source"], c.tags["healing"]) == group]
            base = baseline[rows[0].config["train_cell"]]
            scores = {c.config["fraction"]: set_scores(results[c.id], metric) for c in rows}
            by_n = {c.config["n"]: set_scores(results[c.id], metric) for c in rows}
            answer = _searched(base, by_n, metric)
            found = 0.0 if answer is None else (answer - 1) / exp.models[group[0]].layers
            print(f"  {'/'.join(group)}: sweep {removable_fraction(base, scores, metric):.4f}, search {found:.4f}")
    m, depths = 32, list(range(2, 32))
    agree, steps = 0, []
    for deepest in [None, *depths]:
        answer, asked = _curve(depths, deepest)
        agree += answer == deepest
        steps.append(asked)
    print(f"synthetic {m}-layer curve: the sweep's answer at {agree} of {len(depths) + 1} threshold positions, "
          f"{max(steps)} pruned cells at most against {len(depths)}")  # fmt: skip
    print(f"pruned cells, search over sweep ({exp.name}): {total_search / total_sweep:.3f}")


def _searched(baseline: dict[str, float], by_n: dict[int, dict[str, float]], metric: str) -> int | None:
    """The deepest passing depth a binary search over the scored depths finds."""
    answer, _ = bisect_depth(sorted(by_n), lambda n: within_threshold(baseline, by_n[n], metric))
    return answer


def _curve(depths: list[int], deepest: int | None) -> tuple[int | None, int]:
    """A binary search on a monotone curve passing up to `deepest`: its answer and the depths it looked at."""
    asked: list[int] = []

    def passes(n: int) -> bool:
        asked.append(n)
        return deepest is not None and n <= deepest

    answer, _ = bisect_depth(depths, passes)
    return answer, len(asked)


def _as_bisect(path: Path, study: str):
    """The experiment with only `study`, searching its depths (written beside the file so relative paths hold)."""
    doc = yaml.safe_load(path.read_text())
    doc["studies"] = [{**copy.deepcopy(s), "search": "bisect"} for s in doc["studies"] if s["name"] == study]
    edited = path.with_name(f".{path.stem}-bisect-{study}.yaml")
    edited.write_text(yaml.safe_dump(doc, sort_keys=False))
    try:
        return load_experiment(edited)
    finally:
        edited.unlink()


def _search(exp, results: dict) -> list:
    """Expand a bisect experiment on `results` until it stops growing: the cells its searches asked for."""
    cells = expand(exp, results)
    while True:
        more = expand(exp, {c.id: results[c.id] for c in cells if c.id in results})
        if {c.id for c in more} == {c.id for c in cells}:
            return cells
        cells = more


if __name__ == "__main__":
    main()
