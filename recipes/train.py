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

from ucfvit.train.cli import parse, run_recipe
from ucfvit.train.trainer import train


def main(argv: list[str] | None = None) -> None:
    run_recipe("recipes/train.py", lambda: train(parse(sys.argv[1:] if argv is None else argv, description=__doc__)))


if __name__ == "__main__":
    main()
