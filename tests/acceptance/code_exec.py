"""code_exec: pickle payloads planted in a checkpoint, also with any hash manifest recomputed."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from .harness import (
    Case,
    Ctx,
    HarnessError,
    case,
    judge,
    message_lines,
    newest_ckpt,
    payload,
    resume_flags,
    success_problems,
)

HASHES = ("md5", "sha1", "sha224", "sha256", "sha384", "sha512", "blake2b", "blake2s", "sha3_256")


def file_info(path: Path) -> tuple[int, dict[str, str]]:
    data = path.read_bytes()
    return len(data), {alg: hashlib.new(alg, data).hexdigest() for alg in HASHES}


def snapshot(run: Path) -> dict[Path, tuple[int, dict[str, str]]]:
    return {p: file_info(p) for p in run.rglob("*") if p.is_file() and not p.is_symlink()}


def rehash_manifests(run: Path, before: dict[Path, tuple[int, dict[str, str]]]) -> list[str]:
    """What an attacker does next: in every text file under ``run`` replace the old hash of each
    changed file by its new one (and, in JSON, its old size by the new size: next to the hash or
    under the file's name). Rewritten manifests are themselves changed files: repeat until none."""
    queue = [p for p, info in before.items() if p.is_file() and file_info(p) != info]
    rewritten: list[str] = []
    rounds = 0
    while queue and rounds < 20:
        rounds += 1
        changed = queue.pop(0)
        old_size, old = before[changed]
        new_size, new = file_info(changed)
        for other in sorted(p for p in run.rglob("*") if p.is_file() and not p.is_symlink() and p != changed):
            if other.stat().st_size > 8 << 20:
                continue
            try:
                text = other.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            updated = text
            for alg in HASHES:
                updated = re.sub(re.escape(old[alg]), new[alg], updated, flags=re.I)
            if other.suffix == ".json":
                try:
                    data = json.loads(updated)
                except ValueError:
                    data = None
                if data is not None and _fix_sizes(data, changed, old_size, new_size, set(new.values())):
                    updated = json.dumps(data, indent=2)
            if updated != text:
                other.write_text(updated)
                rewritten.append(str(other.relative_to(run)))
                if other in before and other not in queue:
                    queue.append(other)
    return rewritten


def _fix_sizes(data: Any, changed: Path, old_size: int, new_size: int, new_hashes: set[str]) -> bool:
    fixed = False
    if isinstance(data, dict):
        holds_hash = any(isinstance(v, str) and any(h in v.lower() for h in new_hashes) for v in data.values())
        for key, value in list(data.items()):
            names_file = isinstance(key, str) and key and (str(changed).endswith(key) or key == changed.name)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value == old_size
                and (holds_hash or names_file)
            ):
                data[key] = new_size
                fixed = True
            else:
                fixed |= _fix_sizes(value, changed, old_size, new_size, new_hashes)
    elif isinstance(data, list):
        for item in data:
            fixed |= _fix_sizes(item, changed, old_size, new_size, new_hashes)
    return fixed


def code_exec(ctx: Ctx, nproc: int, attack: str, resume: str, rehash: bool) -> tuple[bool, str]:
    """Plant a pickle whose unpickling runs ``touch MARKER`` into the newest checkpoint and resume.
    Handled well: MARKER never appears, and the resume refuses (non-zero exit, no traceback,
    naming the planted file). Attack ``other``: every other (non-tensor) file of the checkpoint
    dir, one at a time; with ``auto``, also the files beside the checkpoint dirs (e.g. a
    ``latest`` pointer; for those a run that carries on but names the file is also fine).
    ``rehash``: the attacker also rewrites any hash/size manifest under the run dir."""
    template = "vit1" if nproc == 1 else "mae2"
    probe, _, _ = ctx.copy_template(template, "probe")
    ck = newest_ckpt(probe)
    if attack == "metadata":
        targets = [ck / ".metadata"]
    elif attack == "shard":
        targets = sorted(ck.glob("*.distcp"))[:1]
    else:
        targets = sorted(p for p in ck.iterdir() if p.is_file() and p.name != ".metadata" and p.suffix != ".distcp")
        if resume == "auto":
            targets += sorted(p for p in ck.parent.iterdir() if p.is_file() and not p.is_symlink())
    if not targets:
        raise HarnessError(f"nothing to attack for {attack} in {ck}")
    problems, notes = [], []
    for i, target in enumerate(targets):
        run, flags, n = ctx.copy_template(template, f"run{i}")
        target = run / target.relative_to(probe)
        ckpt = run / ck.relative_to(probe)
        marker = ctx.dir / f"MARKER{i}"
        before = snapshot(run) if rehash else {}
        data = payload(marker)
        if attack == "shard":  # overwrite the start of the shard (where DCP puts its pickled items)
            with open(target, "r+b") as f:
                f.write(data)
        else:
            target.write_bytes(data)
        if rehash:
            rewritten = rehash_manifests(run, before)
            notes.append(f"rehashed {rewritten}" if rewritten else "no manifest found")
        res = ctx.run(resume_flags(flags, resume, ckpt), nproc=n)
        beside = target.parent != ckpt
        where = str(target.relative_to(run))
        own = []
        if marker.exists():
            own.append("MARKER created: code executed")
        if res.timed_out:
            own.append("timed out")
        elif res.rc == 0 and not beside:
            own.append("resumed from it (exit 0)")
        if res.traceback:
            own.append("traceback")
        if target.name not in message_lines(res.out, scrub=False):
            own.append("file not named")
        if own:
            problems.append(f"{where}: {', '.join(own)}")
    note = f" ({notes[0]})" if notes else ""
    return judge(problems, f"refused for {[str(t.relative_to(probe)) for t in targets]}{note}")


def control(ctx: Ctx, nproc: int) -> tuple[bool, str]:
    """Not an attack: a copied base run resumes (the other cases rely on copies being resumable).
    Handled well: the resume succeeds (exit 0, no traceback)."""
    run, flags, n = ctx.copy_template("vit1" if nproc == 1 else "mae2")
    res = ctx.run({**flags, "--max-steps": "3", "--checkpoint.resume": "auto"}, nproc=n)
    return judge(success_problems(res, "resume"), "untampered copy resumes")


def cases(nproc: int) -> list[Case]:
    out = []
    for n in (1, nproc):
        out.append(case(f"control-untampered-{n}rank", control, nproc=n))
        for attack in ("metadata", "shard", "other"):
            for resume in ("auto", "path"):
                for rehash in (False, True):
                    name = f"{attack}-{resume}{'-rehash' if rehash else ''}-{n}rank"
                    out.append(case(name, code_exec, nproc=n, attack=attack, resume=resume, rehash=rehash))
    return out
