"""blame: bad data, bad weights, bad files and typos named where they enter, in one line, blaming the right
thing (a file, a tensor, a flag; never the learning rate for a NaN that came in from outside)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from .harness import (
    FLAG_TIMEOUT,
    REPO,
    TIMEOUT,
    Case,
    Ctx,
    HarnessError,
    Result,
    base_flags,
    case,
    ckpt_dirs,
    has_traceback,
    judge,
    kill_everything,
    last_line,
    max_logged_step,
    message_lines,
    names_flag,
    newest_ckpt,
    refusal_problems,
    sha256,
    success_problems,
    tree_digest,
)

BLAMES_TRAINING = re.compile(r"diverg|--optim\.lr|learning rate|skip-nonfinite", re.I)
EVALUATE = REPO / "recipes" / "evaluate.py"
FRONTIER = REPO / "launch" / "frontier" / "train.sbatch"


def run_program(ctx: Ctx, cmd: list[str], timeout: float = FLAG_TIMEOUT) -> Result:
    """Run another program of the repository (``evaluate.py``, a launcher) as ``ctx.run`` runs the trainer."""
    ctx.command = lambda argv, nproc, record_exit=False: list(cmd)  # type: ignore[method-assign]  # this call's command line
    try:
        return ctx.run([], timeout=timeout)
    finally:
        del ctx.command


def blame_problems(res: Result, tokens: list[str]) -> list[str]:
    """A clean refusal that names every token (a flag, a path or a tensor) and blames no divergence."""
    problems = refusal_problems(res)
    said = message_lines(res.out, scrub=False)
    missing = [t for t in tokens if not (names_flag(said, t) if t.startswith("--") else t in said)]
    if missing:
        problems.append(f"does not name {missing}")
    if BLAMES_TRAINING.search(message_lines(res.out)):
        problems.append("blames the training (divergence, learning rate)")
    return problems


def npy_files(root: Path, count: int, bad: int | None = None, value: float = float("nan")) -> Path:
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        arr = np.random.default_rng(i).random((16, 16), dtype=np.float32)
        if i == bad:
            arr[3, 4] = value
        np.save(root / f"f{i:03d}.npy", arr)
    return root


def npy_flags(root: Path, run: Path) -> dict:
    return {
        **base_flags("mae"),
        "--data.kind": "npy",
        "--data.root": str(root),
        "--data.tile": ["16", "16"],
        "--run.dir": str(run),
    }


def image_classes(root: Path, counts: dict[str, int]) -> Path:
    import cv2
    import numpy as np

    for name, count in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            cv2.imwrite(str(root / name / f"{i:03d}.png"), np.full((16, 16, 3), 20 * i % 255, np.uint8))
    return root


def vit_state(tmp: Path, name: str, change) -> Path:
    """A state dict of the base flags' ViT (debug size, 16x16 input), changed by ``change(state)``."""
    import torch

    from ucfvit.models import build_model

    state = build_model("vit", "debug", img_size=16).state_dict()
    change(state)
    path = tmp / name
    torch.save(state, path)
    return path


# --------------------------------------------------------------------------------------------------- data


def nan_data(ctx: Ctx, kind: str) -> tuple[bool, str]:
    """A data file holding NaN (an .npy array) or infinity (a float TIFF of an image folder) among good
    ones. Handled well: a clean refusal naming the file, not a divergence or the learning rate."""
    root = ctx.dir / "data"
    if kind == "npy":
        npy_files(root, 6, bad=2)
        flags, bad = npy_flags(root, ctx.dir / "run"), "f002.npy"
    else:
        import cv2
        import numpy as np

        root.mkdir()
        for i in range(6):
            img = np.random.default_rng(i).random((16, 16), dtype=np.float32)
            img[5, 5] = np.inf if i == 4 else img[5, 5]
            cv2.imwrite(str(root / f"img{i}.tif"), img)
        flags, bad = {**base_flags("mae"), "--data.kind": "imagefolder", "--data.root": str(root)}, "img4.tif"
        flags["--run.dir"] = str(ctx.dir / "run")
    res = ctx.run({**flags, "--max-steps": "3"}, timeout=TIMEOUT)
    return judge(blame_problems(res, [bad]), f"refused: {last_line(res.out)}")


def label_beyond_classes(ctx: Ctx) -> tuple[bool, str]:
    """Class folders a, b and c (c holding a few images, met late) with --arch.num-classes 2. Handled well:
    refused before the first step, naming the option and c's file."""
    root = image_classes(ctx.dir / "images", {"a": 12, "b": 12, "c": 1})
    flags = {**base_flags("vit"), "--data.kind": "imagefolder", "--data.root": str(root)}
    flags |= {"--arch.num-classes": "2", "--max-steps": "30", "--run.dir": str(ctx.dir / "run")}
    res = ctx.run(flags, timeout=TIMEOUT)
    problems = blame_problems(res, ["--arch.num-classes", str(root / "c")])
    if max_logged_step(ctx.dir / "run", res.log):
        problems.append(f"found only after step {max_logged_step(ctx.dir / 'run', res.log)}")
    return judge(problems, f"refused at start: {last_line(res.out)}")


def deleted_after_index(ctx: Ctx) -> tuple[bool, str]:
    """A data file deleted after the run cached its index (run.dir/data/index.json), then resume auto.
    Handled well: a clean refusal naming the missing file and the cached index (not "corrupt"); the
    checkpoint kept."""
    root = npy_files(ctx.dir / "data", 6)
    run = ctx.dir / "run"
    flags = {**npy_flags(root, run), "--max-steps": "1"}
    first = ctx.run(flags)
    if first.rc != 0:
        raise HarnessError(f"first run failed: {last_line(first.out)}")
    before = tree_digest(newest_ckpt(run))
    (root / "f003.npy").unlink()
    res = ctx.run({**flags, "--max-steps": "3"})
    problems = blame_problems(res, ["f003.npy", "index.json"])
    if re.search(r"corrupt", message_lines(res.out), re.I):
        problems.append("calls the file corrupt")
    if tree_digest(ckpt_dirs(run)[0]) != before:
        problems.append("step-1 checkpoint changed")
    return judge(problems, f"refused: {last_line(res.out)}")


def vanished_root(ctx: Ctx) -> tuple[bool, str]:
    """The data root is deleted while a run with --data.skip-bad-files trains on 300 files. Handled well:
    the run stops with a clean error naming the data root, after at most a few skip lines."""
    root = npy_files(ctx.dir / "data", 300)
    run = ctx.dir / "run"
    flags = {**npy_flags(root, run), "--max-steps": "400", "--data.skip-bad-files": [], "--checkpoint.every": "0"}
    proc, log = ctx.start(flags)
    try:
        if not ctx.wait_for_step(proc, run, log, 2, TIMEOUT):
            return False, f"run never got going: {last_line(log.read_text())}"
        shutil.rmtree(root)
        res = ctx.finish(proc, log, TIMEOUT)
    finally:
        kill_everything(proc)
    problems = blame_problems(res, [str(root)])
    skips = len(re.findall(r"skipping", res.out))
    if skips > 20:
        problems.append(f"{skips} skip lines")
    return judge(problems, f"stopped after {skips} skip line(s): {last_line(res.out)}")


def data_error_one_rank(ctx: Ctx) -> tuple[bool, str]:
    """UNETR on 2 ranks without shuffling; only rank 1 reads a label mask holding class 9 (of 3).
    Handled well: the first error line is that rank's, naming the mask; no traceback (no gloo error of
    the other rank); non-zero exit."""
    import numpy as np

    images, labels = npy_files(ctx.dir / "images", 8), ctx.dir / "labels"
    labels.mkdir()
    for i in range(8):
        mask = np.random.default_rng(i).integers(0, 3, (16, 16))
        mask[2, 2] = 9 if i == 5 else mask[2, 2]
        np.save(labels / f"f{i:03d}.npy", mask)
    flags = {**npy_flags(images, ctx.dir / "run"), "--model": "unetr", "--data.labels": str(labels)}
    flags |= {"--mesh": "2x1x1", "--data.global-batch-size": "8", "--data.no-shuffle": []}
    res = ctx.run(flags, nproc=2)
    problems = blame_problems(res, [str(labels / "f005.npy")])
    errors = [line for line in message_lines(res.out, scrub=False).splitlines() if line.startswith("recipes/")]
    if errors and "f005.npy" not in errors[0]:
        problems.append(f"first error line is not the failing rank's: {errors[0][:100]}")
    return judge(problems, f"refused, the failing rank first: {last_line(errors[0]) if errors else last_line(res.out)}")


# ------------------------------------------------------------------------------------------------ weights


def bad_init_from(ctx: Ctx, what: str) -> tuple[bool, str]:
    """--init.from a state dict whose head.weight holds NaN, or whose norm.weight is stored as integers.
    Handled well: a clean refusal naming the file and the tensor, before training (not a divergence)."""
    import torch

    if what == "nan":
        path, tensor = vit_state(ctx.dir, "weights.pth", lambda s: s["head.weight"].fill_(float("nan"))), "head.weight"
    else:
        path = vit_state(ctx.dir, "weights.pth", lambda s: s.update({"norm.weight": s["norm.weight"].to(torch.int64)}))
        tensor = "norm.weight"
    flags = {**base_flags("vit"), "--init.from": str(path), "--run.dir": str(ctx.dir / "run")}
    res = ctx.run(flags, timeout=TIMEOUT)
    problems = blame_problems(res, [str(path), tensor])
    if max_logged_step(ctx.dir / "run", res.log):
        problems.append("trained first")
    return judge(problems, f"refused: {last_line(res.out)}")


def exported(ctx: Ctx) -> Path:
    """A run directory with a safetensors export of the base flags' ViT after one step."""
    run = ctx.dir / "run"
    res = ctx.run(
        {**base_flags("vit"), "--max-steps": "1", "--checkpoint.export-safetensors": [], "--run.dir": str(run)}
    )
    if res.rc != 0 or not (run / "model.safetensors").is_file():
        raise HarnessError(f"export run failed ({res.brief()}): {last_line(res.out)}")
    return run


def rewrite_export(run: Path, tensors=None, kwargs=None) -> None:
    """Change the export's tensors and/or its config (in model_config.json and the header alike)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = run / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    if tensors:
        tensors(state)
    if kwargs:
        key = next(iter(metadata))
        spec = json.loads(metadata[key])
        spec["kwargs"].update(kwargs)
        metadata[key] = json.dumps(spec)
        (run / "model_config.json").write_text(json.dumps(spec, indent=2))
    save_file(state, str(weights), metadata=metadata)


def evaluate_bad_export(ctx: Ctx, what: str) -> tuple[bool, str]:
    """recipes/evaluate.py on an export whose weights hold NaN, or whose model_config.json (and header)
    gives depth as a string. Handled well: a clean refusal naming the file and the tensor or field; no
    eval.json, or one that is valid JSON."""
    run = exported(ctx)
    if what == "nan":
        rewrite_export(run, tensors=lambda s: s["blocks.0.attn.q.weight"].fill_(float("nan")))
        tokens = ["model.safetensors", "blocks.0.attn.q.weight"]
    else:
        rewrite_export(run, kwargs={"depth": "2"})
        tokens = ["model_config.json", "depth"]
    out = ctx.dir / "eval"
    cmd = [sys.executable, str(EVALUATE), "--checkpoint", str(run / "model.safetensors"), "--out", str(out)]
    res = run_program(ctx, cmd, timeout=TIMEOUT)
    problems = blame_problems(res, tokens)
    if (out / "eval.json").exists():
        try:
            json.loads((out / "eval.json").read_text(), parse_constant=lambda c: 1 / 0)
        except (ValueError, ZeroDivisionError):
            problems.append("eval.json is not valid JSON")
    return judge(problems, f"refused: {last_line(res.out)}")


# ------------------------------------------------------------------------------------- run dirs and files


def too_long_run_dir(ctx: Ctx) -> tuple[bool, str]:
    """--run.dir whose path leaves no room for the checkpoint files a run writes in it (PATH_MAX).
    Handled well: a clean refusal naming --run.dir before any step."""
    base = ctx.dir / "deep"
    room = os.pathconf(ctx.dir, "PC_PATH_MAX") - 50 - len(str(base))
    run = Path(base, *["d" * 200] * (room // 201), "r" * max(1, room % 201))
    res = ctx.run({**base_flags("vit"), "--max-steps": "2", "--run.dir": str(run)}, timeout=TIMEOUT)
    problems = blame_problems(res, ["--run.dir"])
    if re.search(r"\bstep\s+\d+\s*/\s*\d+", res.out):
        problems.append("trained first")
    return judge(problems, f"refused: {last_line(res.out)[:120]}")


def run_dir_inside_data(ctx: Ctx) -> tuple[bool, str]:
    """--run.dir inside an image-folder data root (its pictures would become a class of the next run).
    Handled well: a clean refusal naming both; nothing created in the data root."""
    root = image_classes(ctx.dir / "images", {"a": 4, "b": 4})
    before = sorted(p.name for p in root.iterdir())
    flags = {**base_flags("vit"), "--data.kind": "imagefolder", "--data.root": str(root)}
    res = ctx.run({**flags, "--run.dir": str(root / "runs" / "vit")}, timeout=FLAG_TIMEOUT)
    problems = blame_problems(res, ["--run.dir", "--data.root"])
    if sorted(p.name for p in root.iterdir()) != before:
        problems.append("wrote into the data root")
    return judge(problems, f"refused: {last_line(res.out)}")


def full_disk_metrics(ctx: Ctx) -> tuple[bool, str]:
    """Writes beyond a size limit fail (RLIMIT_FSIZE) when metrics.jsonl, already past it, gets its next
    line on resume. Handled well: a clean exit naming metrics.jsonl; afterwards (disk fine again) resume
    auto continues from the kept checkpoint."""
    run = ctx.dir / "run"
    flags = {**base_flags("vit"), "--run.dir": str(run), "--max-steps": "30", "--checkpoint.every": "30"}
    first = ctx.run(flags)
    if first.rc != 0:
        raise HarnessError(f"first run failed: {last_line(first.out)}")
    config, metrics = (run / "config.json").stat().st_size, (run / "metrics.jsonl").stat().st_size
    if metrics < config + 1024:
        raise HarnessError(f"metrics.jsonl ({metrics} B) is not larger than config.json ({config} B)")
    resume = {**flags, "--max-steps": "31", "--checkpoint.resume": "auto"}
    res = ctx.run(resume, fsize=config + 512)
    problems = blame_problems(res, ["metrics.jsonl"])
    again = ctx.run(resume)
    problems += success_problems(again, "resume afterwards")
    return judge(problems, f"failed cleanly: {last_line(res.out)}; resumed afterwards")


def trainer_state_wrong_type(ctx: Ctx) -> tuple[bool, str]:
    """The newest checkpoint's trainer_state.json holds "step": "2" (a string), its manifest entry
    recomputed. Handled well: resume auto refused cleanly naming trainer_state.json and the field; the
    checkpoints unchanged."""
    run, flags, _ = ctx.copy_template("vit1")
    ck = newest_ckpt(run)
    state = json.loads((ck / "trainer_state.json").read_text())
    state["step"] = str(state["step"])
    (ck / "trainer_state.json").write_text(json.dumps(state))
    manifest = json.loads((ck / "manifest.json").read_text())
    entry = {"size": (ck / "trainer_state.json").stat().st_size, "sha256": sha256(ck / "trainer_state.json")}
    manifest["files"]["trainer_state.json"] = entry
    (ck / "manifest.json").write_text(json.dumps(manifest))
    before = {d.name: tree_digest(d) for d in ckpt_dirs(run)}
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"})
    problems = blame_problems(res, ["trainer_state.json", "step"])
    if {d.name: tree_digest(d) for d in ckpt_dirs(run)} != before:
        problems.append("checkpoints changed")
    return judge(problems, f"refused: {last_line(res.out)}")


def launcher_dry_run_typo(ctx: Ctx) -> tuple[bool, str]:
    """launch/frontier/train.sbatch --dry-run with a misspelt training flag (--max-stepz 10). Handled well:
    the dry run fails (non-zero, no traceback) naming the flag, and prints no launch command."""
    cmd = ["bash", str(FRONTIER), "--dry-run", "--nodes", "1", "--python", sys.executable]
    cmd += ["--model", "mae", "--mesh", "1x8x1", "--max-stepz", "10"]
    start = time.monotonic()
    res = run_program(ctx, cmd)
    problems = blame_problems(res, ["--max-stepz"])
    if re.search(r"^launch ", res.out, re.M):
        problems.append("printed the launch command")
    if has_traceback(res.out):
        problems.append("traceback")
    return judge(problems, f"refused in {time.monotonic() - start:.0f} s: {last_line(res.out)[:140]}")


def cases(nproc: int) -> list[Case]:
    return [
        case("nan-npy-data", nan_data, kind="npy"),
        case("inf-image-data", nan_data, kind="image"),
        case("label-beyond-num-classes", label_beyond_classes),
        case("file-deleted-after-index", deleted_after_index),
        case("vanished-root-skip-bad-files", vanished_root, slow=True),
        case("data-error-on-one-of-2-ranks", data_error_one_rank),
        case("nan-init-from", bad_init_from, what="nan"),
        case("int-stored-init-from", bad_init_from, what="int"),
        case("nan-weights-evaluate", evaluate_bad_export, what="nan"),
        case("model-config-wrong-type-evaluate", evaluate_bad_export, what="types"),
        case("run-dir-too-long", too_long_run_dir),
        case("run-dir-inside-image-root", run_dir_inside_data),
        case("full-disk-metrics", full_disk_metrics, slow=True),
        case("trainer-state-wrong-type-rehash", trainer_state_wrong_type),
        case("launcher-dry-run-typo", launcher_dry_run_typo),
    ]
