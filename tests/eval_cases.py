"""Worker side of the evaluation tests: validation during training and recipes/evaluate.py in forked ranks."""

from __future__ import annotations

import json
import pathlib

from train_cases import config
from ucfvit.train.evaluate import EvaluateConfig, evaluate
from ucfvit.train.hooks import Hooks, TensorBoardSink
from ucfvit.train.trainer import train

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
                checkpoint=pathlib.Path(run_dir), mesh=mesh, out=pathlib.Path(f"{tmp}/{family}_eval_{mesh}"),
                eval=config(family, common).eval,
            )
        )  # fmt: skip
        out[family] = {"during_training": _validation_lines(run_dir), "evaluate": result["metrics"]}
    return out


def evaluate_on(tmp: str, mesh: str, out_name: str) -> dict:
    """Evaluate the checkpoints of :func:`train_then_evaluate` (trained elsewhere) on ``mesh``."""
    out = {}
    for family, extra in FAMILY_ARGS.items():
        ev = config(family, [*EVAL, *extra]).eval
        result = evaluate(
            EvaluateConfig(
                checkpoint=pathlib.Path(f"{tmp}/{family}"), mesh=mesh, out=pathlib.Path(f"{tmp}/{out_name}_{family}"),
                eval=ev,
            )
        )  # fmt: skip
        out[family] = result["metrics"]
    return out


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
    argv = ["--mesh", "2x1x1", "--data.global-batch-size", "4", "--max-steps", "30", "--metrics.log-every", "1",
            "--eval.every", "2", "--eval.samples", "4", "--run.dir", f"{tmp}/hooks"]  # fmt: skip
    result = train(config("mae", argv), hooks=[hook, TensorBoardSink(pathlib.Path(tmp), writer=writer)])
    return {
        "steps": result.steps_done, "stopped": result.stopped_early, "calls": hook.calls,
        "scalars": writer.scalars, "closed": writer.closed,
    }  # fmt: skip
