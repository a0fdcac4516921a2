"""Train a ucfvit model.

    torchrun --standalone --nproc_per_node 8 recipes/train.py --model mae --mesh 2x2x2
    python recipes/train.py --model unetr                        # one process, mesh 1x1x1
    python recipes/train.py --model mae --help                   # that recipe's defaults

``--model`` picks a complete recipe (``ucfvit.train.presets``) whose values become the defaults;
every other flag overrides one field of ``ucfvit.train.config.Config``.
"""

from __future__ import annotations

import argparse
import sys

import tyro

from ucfvit.train.config import Config
from ucfvit.train.presets import FAMILIES, preset
from ucfvit.train.trainer import train


def parse(argv: list[str]) -> Config:
    """Read ``--model``/``--model-size`` first, then parse everything with that preset as default."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default="mae", choices=FAMILIES)
    pre.add_argument("--model-size", "--model_size", default=None)
    known, _ = pre.parse_known_args(argv)
    defaults = preset(known.model, known.model_size)
    return tyro.cli(Config, default=defaults, args=argv, description=__doc__)


def main(argv: list[str] | None = None) -> None:
    train(parse(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
