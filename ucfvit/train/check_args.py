"""Check the arguments of ``recipes/train.py`` without running anything: what the launchers' ``--dry-run``
calls before printing the job (``launch/common.sh``), so that a misspelt flag fails before the queue.

    python -m ucfvit.train.check_args [--accelerator] -- ARGUMENTS...

Exit 0 (silent) when :func:`~ucfvit.train.cli.check_argv` accepts them; exit 3 (a code python itself
does not use, so a launcher tells a refusal from a python that could not run the check) with one line on
stderr, the trainer's own message, when it refuses them. ``--accelerator`` checks them against the GPU recipes
(a job for GPU nodes, checked on a login node).
"""

from __future__ import annotations

import sys

from .cli import check_argv
from .config import ConfigError

REFUSED = 3


def main(argv: list[str]) -> int:
    accelerator = None
    if argv[:1] == ["--accelerator"]:
        accelerator, argv = True, argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    try:
        check_argv(argv, accelerator=accelerator)
    except ConfigError as err:
        text = str(err)
        print(text if text.startswith("recipes/train.py") else f"recipes/train.py: {text}", file=sys.stderr)
        return REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
