"""bad_flags: each numeric flag given 0 / negative / nan / inf / out-of-range values."""

from __future__ import annotations

import math
import re

from .harness import (
    FLAG_TIMEOUT,
    Case,
    Ctx,
    base_flags,
    case,
    flag_pattern,
    judge,
    last_line,
    message_lines,
    names_flag,
    refusal_problems,
)

SUGGEST = re.compile(r"\b(use|try|pass|set|e\.g\.|for example|instead|did you mean|perhaps|such as|like)\b", re.I)

# (model, flag, values): one case per entry.
BAD_FLAGS: list[tuple[str, str, list[str]]] = []


def _bad(model: str, flag: str, *values: str) -> None:
    for value in values:
        BAD_FLAGS.append((model, flag, value.split()))


_bad("vit", "--max-steps", "0", "-3")
_bad("vit", "--data.global-batch-size", "0", "-4")
_bad("vit", "--data.micro-batch-size", "0", "-2", "3")
_bad("vit", "--data.num-classes", "0", "-1")
_bad("vit", "--optim.lr", "-0.001", "nan", "inf")
_bad("vit", "--optim.weight-decay", "-0.1", "nan")
_bad("vit", "--optim.betas", "1.0 0.95", "0.9 1.5", "-0.1 0.95")
_bad("vit", "--optim.eps", "-1e-8", "nan")
_bad("vit", "--optim.grad-clip", "-1", "nan")
_bad("vit", "--schedule.warmup-steps", "-1")
_bad("vit", "--schedule.warmup-start-lr", "-0.001", "nan")
_bad("vit", "--schedule.min-lr", "nan", "1.0")  # 1.0 > the peak lr
_bad("vit", "--checkpoint.every", "-1")
_bad("vit", "--checkpoint.keep", "0", "-1")
_bad("vit", "--metrics.log-every", "0", "-1")
_bad("vit", "--run.seed", "-1", str(2**64))
_bad("vit", "--arch.in-chans", "0", "-1")
_bad("vit", "--arch.patch-size", "0", "5", "32")  # 5 does not divide 16; 32 > the image
_bad("vit", "--arch.img-size", "0 0", "-16 -16", "18 18")  # 18 is not a multiple of the patch (4)
_bad("vit", "--arch.embed-dim", "0", "60")  # 60 is not divisible by the 8 heads
_bad("vit", "--arch.depth", "-1")
_bad("vit", "--arch.num-heads", "0", "3")  # 3 does not divide the width 64
_bad("vit", "--arch.mlp-ratio", "-1", "nan")
for _flag in ("drop-path-rate", "attn-drop-rate", "proj-drop-rate", "pos-drop-rate", "drop-rate", "patch-drop-rate"):
    _bad("vit", f"--arch.{_flag}", "-0.1", "1.0")
_bad("vit", "--arch.drop-path-rate", "nan")
_bad("mae", "--arch.mask-ratio", "-0.1", "1.0", "nan")
_bad("vit", "--arch.init-values", "nan", "inf")
_bad("vit", "--arch.num-classes", "0", "-1", "2")  # 2 < the 3 classes of the data
_bad("mae", "--arch.decoder-embed-dim", "0", "-32")
_bad("mae", "--arch.decoder-depth", "-1")
_bad("mae", "--arch.decoder-num-heads", "0", "3")
_bad("mae", "--arch.decoder-mlp-ratio", "-1", "nan")
_bad("unetr", "--arch.feature-size", "0", "-8")
_bad("diffusion", "--arch.time-steps", "0", "-1")


def _as_float(token: str) -> float | None:
    try:
        return float(token.strip("()[],'\""))
    except ValueError:
        return None


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def suggests_value(text: str, flag: str, values: list[str]) -> bool:
    """Whether the output proposes the rejected value itself (``use --x 0`` after rejecting 0)."""
    wanted = [_as_float(v) for v in values]
    if any(w is None for w in wanted):
        return False
    count = len(wanted)
    pattern = flag_pattern(flag) + r"\s*[= ]\s*((?:[-+\w.()\[\]]+[\s,]*){" + str(count) + "})"
    for match in re.finditer(pattern, text):
        got = [_as_float(t) for t in re.split(r"[\s,]+", match.group(1).strip()) if t][:count]
        if len(got) != count or any(g is None for g in got) or not all(map(_same, got, wanted)):
            continue
        start = match.start()
        line_start = text.rfind("\n", 0, start) + 1
        clause = text[line_start:start]
        for sep in (";", ":", "("):
            clause = clause[clause.rfind(sep) + 1 :]
        if SUGGEST.search(clause):
            return True
    return False


def bad_flag(ctx: Ctx, model: str, flag: str, values: list[str]) -> tuple[bool, str]:
    """Handled well: non-zero exit in time, no traceback, the output names the flag, does not
    propose the rejected value, and --run.dir was not created."""
    run = ctx.dir / "run"
    res = ctx.run({**base_flags(model), "--run.dir": str(run), flag: values}, timeout=FLAG_TIMEOUT)
    problems = refusal_problems(res)
    if not names_flag(message_lines(res.out, scrub=False), flag):
        problems.append(f"message does not name {flag}" + (f" ({last_line(res.out)})" if res.rc else ""))
    if suggests_value(message_lines(res.out, scrub=False), flag, values):
        problems.append("suggests the rejected value")
    if run.exists():
        problems.append("created --run.dir")
    return judge(problems, f"refused: {last_line(res.out)}")


def cases(nproc: int) -> list[Case]:
    """One case per bad value; a flag the trainer no longer has is no case (skipped)."""
    out = []
    for model, flag, values in BAD_FLAGS:
        name = ("" if model == "vit" else f"{model}:") + f"{flag[2:]}={' '.join(values)}"
        out.append(case(name, bad_flag, needs_flag=flag, model=model, flag=flag, values=values))
    return out
