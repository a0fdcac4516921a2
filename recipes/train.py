"""Train a ucfvit model.

    torchrun --standalone --nproc_per_node 8 recipes/train.py --model mae --mesh 2x2x2
    python recipes/train.py --model unetr                        # one process, mesh 1x1x1
    python recipes/train.py --model mae --help                   # that recipe's defaults
    python recipes/train.py --config runs/a/config.json --max-steps 200   # repeat a saved run

``--model`` picks a complete recipe (``ucfvit.train.presets``) whose values become the defaults;
``--config FILE`` uses a saved config.json (or YAML) instead. Every other flag overrides one field
of ``ucfvit.train.config.Config``.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from ucfvit.data.readers import DataError
from ucfvit.train.checkpoint import CheckpointError
from ucfvit.train.cli import parse
from ucfvit.train.config import ConfigError
from ucfvit.train.export import ExportError
from ucfvit.train.trainer import TrainingDiverged, train


def main(argv: list[str] | None = None) -> None:
    error = None
    try:
        train(parse(sys.argv[1:] if argv is None else argv, description=__doc__))
    except ConfigError as err:  # a bad option: one line naming it, no traceback
        error = f"error: {err}"
    except TrainingDiverged as err:  # the same message on every rank; nothing non-finite was saved
        error = f"diverged: {err}"
    except CheckpointError as err:  # a checkpoint refused at load, or a save that failed (on every rank)
        error = f"checkpoint error: {err}"
    except ExportError as err:  # rank 0 only; the other ranks have finished
        error = f"export error: {err}"
    except DataError as err:  # a file that cannot be read; from a loader worker, its message ends the traceback
        error = f"data error: {str(err).strip().splitlines()[-1].removeprefix(f'{DataError.__module__}.DataError: ')}"
    # Every rank gets here alike (done, or an error every rank raised; the export's is local). Left
    # to interpreter exit, gloo's threads can abort the process (SIGABRT, pytorch/pytorch#190489).
    if dist.is_initialized():
        dist.destroy_process_group()
    if error is not None:
        sys.exit(f"recipes/train.py: {error}")


if __name__ == "__main__":
    main()
