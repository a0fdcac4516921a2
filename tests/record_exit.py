"""Run a script as ``__main__`` and write its exit status to ``$UCFVIT_EXIT_DIR/rank-$RANK``.

    torchrun ... tests/record_exit.py recipes/train.py --model vit ...

torchrun does not say how its workers exited once it got a signal itself (it raises, and
exits 1), and a test of a stop must see every rank exit 0. No file: the rank died of a signal or
``os._exit``."""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

status: int | str | None = 1
try:
    sys.argv = sys.argv[1:]
    sys.path[0] = str(Path(sys.argv[0]).resolve().parent)  # as if the script were run itself
    runpy.run_path(sys.argv[0], run_name="__main__")
    status = 0
except SystemExit as exit_:
    status = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    raise
finally:
    Path(os.environ["UCFVIT_EXIT_DIR"], f"rank-{os.environ.get('RANK', '0')}").write_text(f"{status}\n")
