"""Evaluation on a mesh: validation during training and recipes/evaluate.py on 2x1x2 against one
process, and hooks that stop a run on two ranks at the same sync point. The rank side of each test
is beside it. In one process: tests/unit/test_evaluation.py."""

from __future__ import annotations

import json
import pathlib

import pytest

from rank_runner import run_ranks
from train_runs import config
from ucfvit.train.evaluate import EvaluateConfig, evaluate
from ucfvit.train.hooks import Hooks, TensorBoardSink
from ucfvit.train.trainer import train

pytestmark = pytest.mark.xdist_group("evaluation")  # its module fixture runs once, in one test process

# Six validation samples over two data-parallel ranks in batches of two: each rank's share (3)
# ends inside its second batch, so the padding rows are exercised.
EVAL = ["--eval.every", "2", "--eval.samples", "6", "--eval.batch-size", "2", "--eval.pictures", "2"]
FAMILY_ARGS = {
    "vit": [],
    "mae": [],
    "unetr": [],
    "sap": [],
    "diffusion": ["--eval.sample-steps", "3"],
}


def _validation_lines(run_dir: str) -> list[dict]:
    lines = [json.loads(x) for x in pathlib.Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [x["eval"] for x in lines if "eval" in x]


def train_then_evaluate(tmp: str, mesh: str) -> dict:
    """Per family: train 2 steps on ``mesh`` validating at step 2, then evaluate the checkpoint on ``mesh``."""
    out = {}
    for family, extra in FAMILY_ARGS.items():
        run_dir = f"{tmp}/{family}"
        common = ["--mesh", mesh, "--data.global-batch-size", "4", "--max-steps", "2", *EVAL, *extra]
        train(config(family, [*common, "--run.dir", run_dir]))
        result = evaluate(
            EvaluateConfig(
                checkpoint=pathlib.Path(run_dir),
                mesh=mesh,
                out=pathlib.Path(f"{tmp}/{family}_eval_{mesh}"),
                eval=config(family, common).eval,
            )
        )
        out[family] = {"during_training": _validation_lines(run_dir), "evaluate": result["metrics"]}
    return out


def evaluate_on(tmp: str, mesh: str, out_name: str) -> dict:
    """Evaluate the checkpoints of :func:`train_then_evaluate` (trained elsewhere) on ``mesh``."""
    out = {}
    for family, extra in FAMILY_ARGS.items():
        ev = config(family, [*EVAL, *extra]).eval
        result = evaluate(
            EvaluateConfig(
                checkpoint=pathlib.Path(f"{tmp}/{family}"),
                mesh=mesh,
                out=pathlib.Path(f"{tmp}/{out_name}_{family}"),
                eval=ev,
            )
        )
        out[family] = result["metrics"]
    return out


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluation")
    on_mesh = run_ranks(4, train_then_evaluate, str(tmp), "2x1x2", timeout=500)
    single = run_ranks(1, evaluate_on, str(tmp), "1x1x1", "single", timeout=300)[0]
    return tmp, on_mesh, single


def _close(a, b, where: str) -> None:
    assert set(a) == set(b), where
    for key in a:
        if isinstance(a[key], list):
            assert len(a[key]) == len(b[key]), (where, key)
            for x, y in zip(a[key], b[key], strict=True):
                assert (x is None and y is None) or x == pytest.approx(y, rel=1e-5, abs=1e-7), (where, key, a, b)
        else:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (where, key, a[key], b[key])


@pytest.mark.parametrize("family", ["vit", "mae", "unetr", "sap", "diffusion"])
def test_evaluation_on_2x1x2_equals_one_process(evaluated, family):
    tmp, on_mesh, single = evaluated
    for rank in on_mesh:
        got = rank[family]
        assert got["evaluate"]["samples"] == 6
        # validation during training (step 2) and recipes/evaluate.py see the same weights and samples
        _close(got["during_training"][-1], got["evaluate"], f"{family}: training-time vs evaluate.py")
        _close(got["evaluate"], single[family], f"{family}: 2x1x2 vs 1x1x1")
    if family == "unetr":
        assert single[family]["dice"] and single[family]["mean_iou"] is not None
    assert (tmp / f"single_{family}" / "eval.json").is_file()
    picture = tmp / f"single_{family}" / "pictures" / f"{family}_eval.png"
    assert (picture.is_file()) == (family != "vit"), picture  # classifiers have no picture
    assert (tmp / family / "curves.png").is_file()


class _Writer:
    """Stands in for TensorBoard's SummaryWriter: records what the sink writes."""

    def __init__(self):
        self.scalars, self.images, self.closed = [], [], False

    def add_scalar(self, name, value, step):
        self.scalars.append((name, step))

    def add_image(self, name, image, step, dataformats):
        self.images.append((name, image.shape, dataformats))

    def close(self):
        self.closed = True


class _StopAfterFirstValidation(Hooks):
    def __init__(self):
        self.calls = []

    def on_step_end(self, step, record):
        self.calls.append(("step", step, round(record["loss"], 6)))

    def on_eval_end(self, step, metrics):
        self.calls.append(("eval", step, metrics["samples"]))
        return True  # early stopping

    def on_checkpoint(self, step, path):
        self.calls.append(("checkpoint", step, pathlib.Path(path).name))


def hooks_stop_the_run(tmp: str) -> dict:
    """A hook stops a 30-step run after its first validation (step 2); a TensorBoard sink with a
    recording writer sees the scalars; every rank gets the same calls."""
    hook, writer = _StopAfterFirstValidation(), _Writer()
    argv = [
        *["--mesh", "2x1x1", "--data.global-batch-size", "4", "--max-steps", "30", "--metrics.log-every", "1"],
        *["--eval.every", "2", "--eval.samples", "4", "--run.dir", f"{tmp}/hooks"],
    ]
    result = train(config("mae", argv), hooks=[hook, TensorBoardSink(pathlib.Path(tmp), writer=writer)])
    return {
        "steps": result.steps_done,
        "stopped": result.stopped_early,
        "calls": hook.calls,
        "scalars": writer.scalars,
        "closed": writer.closed,
    }


def test_a_hook_stops_the_run_at_the_next_sync_point_and_sinks_see_the_metrics(tmp_path):
    results = run_ranks(2, hooks_stop_the_run, str(tmp_path), timeout=300)
    assert results[0]["calls"] == results[1]["calls"]  # every rank: the same calls, the same values
    r = results[0]
    # the hook asks to stop after validating at step 2; the ranks agree at step 3's sync, save and stop
    assert r["steps"] == 3 and r["stopped"], r
    kinds = [(c[0], c[1]) for c in r["calls"]]
    assert kinds == [("step", 1), ("step", 2), ("eval", 2), ("step", 3), ("checkpoint", 3)], kinds
    assert r["calls"][2][2] == 4 and r["calls"][-1][2] == "step-00000003"
    names = {name for name, _ in r["scalars"]}
    assert {"train/loss", "train/lr", "eval/loss", "eval/psnr"} <= names, names
    assert ("eval/loss", 2) in [tuple(x) for x in r["scalars"]] and r["closed"]
