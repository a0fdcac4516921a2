"""Data pipeline speed on this machine, one JSON line: per-worker rates of JPEG decode + resize,
NIfTI tiling, quadtree and octree patching (single thread each), and whether N loader workers keep
up with a given consumption rate.

    python benchmarks/data.py                       # the anchor settings of issue 10
    python benchmarks/data.py --quick               # tiny sizes (what the tests run)
    python benchmarks/data.py --workers 2 --need 400   # can 2 workers feed 400 images/s?

UCF-VIT's own code on a 2-core machine, one thread (the anchor we compare with): quadtree at 512^2
~46 images/s (fixed_length 1024, patch 16) and ~6 (4096); 1024^2 3-channel ~21 / ~4.3; octree with
fixed_length 512, patch 4: 64^3 ~16 volumes/s, 128^3 ~7, 256^3 ~1.1; tiling 512^3 float32 into
128^3 tiles ~6 GB/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import default_collate  # noqa: E402

from ucfvit.data.balance import plan_load  # noqa: E402
from ucfvit.data.config import DataConfig  # noqa: E402
from ucfvit.data.dataset import InputSpec, build_dataset  # noqa: E402
from ucfvit.data.index import build_index  # noqa: E402
from ucfvit.data.loader import build_loader, keep_freed_memory  # noqa: E402
from ucfvit.data.quadtree import adaptive_patches  # noqa: E402
from ucfvit.data.readers import get_reader  # noqa: E402


def rate(fn, min_time: float) -> float:
    """Calls per second of ``fn`` over at least ``min_time`` seconds (after one warm-up call)."""
    fn()
    calls, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_time or calls < 2:
        fn()
        calls += 1
    return calls / elapsed


def image(shape, channels: int, seed: int = 0) -> np.ndarray:
    """(channels, *shape) float32 in 0..255 with edges: random boxes/balls on a smooth background."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(0, 1, s, dtype=np.float32) for s in shape], indexing="ij")
    x = np.broadcast_to(sum(grids) * 40, shape).copy()
    for _ in range(12):
        centre, radius = rng.uniform(0.1, 0.9, len(shape)), rng.uniform(0.03, 0.15)
        x[sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) < radius**2] = rng.uniform(60, 255)
    return np.stack([x * (0.6 + 0.2 * c) for c in range(channels)]).astype(np.float32)


def jpeg_files(root: Path, count: int, size: int) -> Path:
    folder = root / "class0"
    folder.mkdir(parents=True)
    for k in range(count):
        img = image((size, size), 3, seed=k).transpose(1, 2, 0).astype(np.uint8)
        cv2.imwrite(str(folder / f"{k}.jpg"), img)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, short timings (CI)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers for the keep-up check")
    parser.add_argument("--need", type=float, default=200.0, help="images/s the trainer consumes (keep-up check)")
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per timing")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    malloc_tuned = keep_freed_memory()  # as in every loader worker
    t = 0.05 if args.quick else args.min_time
    out: dict = {
        "benchmark": "data",
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "quick": args.quick,
        "worker_malloc_tuned": malloc_tuned,
    }

    # Quadtree (2D) and octree (3D) patching, one thread: images (volumes) per second.
    cases2d = (
        [(64, 1, 16, 16), (64, 3, 16, 16)]
        if args.quick
        else [(512, 3, 1024, 16), (512, 3, 4096, 8), (1024, 3, 1024, 16), (1024, 3, 4096, 8)]
    )
    for side, chans, length, min_patch in cases2d:
        x = image((side, side), chans)
        r = rate(lambda x=x, n=length, m=min_patch: adaptive_patches(x, 16, n, m), t)
        out[f"quadtree_{side}x{side}x{chans}_L{length}_per_s"] = round(r, 2)
        out[f"quadtree_{side}x{side}x{chans}_L{length}_patches_per_s"] = round(r * length)
    for side in [16] if args.quick else [64, 128, 256]:
        x = image((side,) * 3, 1)
        length = 512 if side >= 64 else 22
        r = rate(lambda x=x, n=length: adaptive_patches(x, 4, n, 4), t)
        out[f"octree_{side}^3_L512_per_s"] = round(r, 2)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # JPEG decode + resize to 224x224 through the imagefolder reader: samples/s per worker.
        size, count = (64, 8) if args.quick else (500, 64)
        jpegs = jpeg_files(root / "jpeg", count, size)
        data = DataConfig(kind="imagefolder", root=jpegs, num_workers=args.workers)
        spec = InputSpec(img_size=(224, 224), channels=3, variables=("r", "g", "b"))
        reader = get_reader("imagefolder")(spatial_ndim=2)
        index = {"imagefolder": build_index("imagefolder", data, reader, spec.img_size)}
        source = build_dataset(data, spec, 0, index)["imagefolder"]
        k = iter(range(10**9))
        out["jpeg_decode_resize_224_per_s_per_worker"] = round(rate(lambda: source.sample(next(k) % count), t), 1)

        # NIfTI tiling: a float32 .nii volume cut into tiles and collated four to a batch, GB/s of tiles;
        # the first pass maps the file's pages into this process, later passes (epochs) find them mapped.
        vol, tile = (64, 32) if args.quick else (512, 128)
        nib.save(
            nib.Nifti1Image(np.random.default_rng(0).random((vol,) * 3, dtype=np.float32), np.eye(4)), root / "v.nii"
        )
        vdata = DataConfig(kind="nifti", root=root, tile=(tile,) * 3, normalize="none")
        vspec = InputSpec(img_size=(tile,) * 3, channels=1, variables=("x",))
        vindex = {"nifti": build_index("nifti", vdata, get_reader("nifti")(spatial_ndim=3), vspec.img_size)}
        vsource = build_dataset(vdata, vspec, 0, vindex)["nifti"]
        tiles = vsource.size
        for name in ("nifti_tiling_first_pass_GB_per_s", "nifti_tiling_GB_per_s"):  # the second pass: epoch 2 on
            start = time.perf_counter()
            for first in range(0, tiles, 4):
                default_collate([vsource.sample(i) for i in range(first, min(first + 4, tiles))])
            out[name] = round(tiles * tile**3 * 4 / (time.perf_counter() - start) / 1e9, 2)

        # Keep-up: N workers feeding the imagefolder loader vs the rate the trainer needs.
        plan = plan_load(["imagefolder"], [source.size], 1, 8)
        steps = 4 if args.quick else 20
        loader = build_loader([source], plan, 0, [0], 0, steps, 8, seed=0, num_workers=args.workers)
        it = iter(loader)
        next(it)  # workers started
        start = time.perf_counter()
        got = sum(len(b["image"]) for b in it)
        delivered = got / (time.perf_counter() - start)
        out.update(
            workers=args.workers,
            loader_images_per_s=round(delivered, 1),
            need_images_per_s=args.need,
            keeps_up=delivered >= args.need,
        )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
