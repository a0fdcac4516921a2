"""Quadtree/octree adaptive patches: a fixed number of square (2D) or cubic (3D) regions of varying size per sample.

Busy parts of an image get small regions, smooth parts large ones, and every region is resized to
``patch_size`` per axis, so a ViT sees ``fixed_length`` tokens per sample whatever the image size.
Meant for data-loader workers: numpy in, numpy out, one sample at a time, no randomness.

How the regions are chosen
    The image is cut into cells of side ``min_patch``. Regions are aligned dyadic squares/cubes of
    cells (side ``min_patch * 2**k``, corner a multiple of the side), as in a quadtree/octree. The
    base tiling covers every cell by the largest aligned dyadic block that lies fully inside the
    image, so any rectangle (or box) of cells works, not only power-of-two squares. A node's score
    is the sum of a criterion over its pixels: Canny edge pixels in 2D (:func:`edge_map_2d`), the
    gradient magnitude in 3D (:func:`gradient_map_3d`). Scores are monotone (a parent scores at
    least as much as each child), so splitting the top ``K`` nodes by score (ties: larger node
    first, then row-major) always gives a valid tree; ``K`` is the most splits that keep the count
    at or below ``fixed_length``.

Padding guarantee
    A split adds 3 regions in 2D and 7 in 3D, so the count of any tiling by aligned dyadic squares
    is congruent to the cell count mod 3 (mod 7 for cubes), and exactly ``L`` real regions is
    impossible for some ``L``: e.g. no tiling of a 3 x 5-cell grid by squares of any integer sides
    has 10 squares. The remainder is filled with pad tokens (zero patch, corner 0, size
    ``min_patch``, ``valid=False``), placed after the real ones. When the image has at least
    ``fixed_length`` cells there are fewer than 3 (2D) / 7 (3D) pads, and none when
    ``fixed_length`` minus the base-tiling count is a multiple of 3 / 7. With fewer cells than
    ``fixed_length`` every cell becomes a region and the rest is padding.

Resizing
    A region of side ``s > patch_size`` is box-averaged over disjoint ``s / patch_size`` windows
    (OpenCV INTER_AREA with an integer factor) and clipped to its channel's [min, max], so float32
    rounding never takes it outside the input's range; ``s < patch_size`` is upsampled by
    repetition, so :func:`reconstruct` gives such regions back exactly. Patches are float32 (a
    float64 image is rounded to float32 once).

Complexity
    Linear in the number of pixels: one pass over each channel while it is in cache (its range,
    its criterion: Canny from OpenCV's Sobel gradients, or forward differences; and the first
    level of the image pyramid), one pass to cell scores, a pyramid over the cells, an O(n) top-K
    selection (``np.partition``) over the splittable nodes, and one gather plus one resize per
    distinct region side. Python loops run only over tree levels, region sides and channels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

__all__ = ["adaptive_patches", "edge_map_2d", "gradient_map_3d", "reconstruct"]

# dtypes OpenCV takes as they are; anything else is converted to float32 before the criterion.
_CV_DTYPES = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim not in (3, 4):
        raise ValueError(
            f"image of shape {image.shape} must be channels-first (C, H, W) or (C, D, H, W); "
            "add a leading channel axis for a single-channel image"
        )
    if min(image.shape) < 1:
        raise ValueError(f"image of shape {image.shape} is empty")
    if image.dtype.kind not in "biuf":
        raise ValueError(f"image dtype {image.dtype} is not numeric")
    if image.dtype.type not in _CV_DTYPES:
        image = image.astype(np.float32)
    return np.ascontiguousarray(image)


def _bounds(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (min, max) of a checked (C, *spatial) image, float64 arrays of shape (C,)."""
    lo, hi = np.zeros((2, image.shape[0]))
    for c, channel in enumerate(image):
        lo[c], hi[c] = cv2.minMaxLoc(channel.reshape(-1, channel.shape[-1]))[:2]
    return lo, hi


def _edges_u8(channel: np.ndarray, lo: float, hi: float, thresholds: tuple[float, float]) -> np.ndarray:
    """Canny edges (0/255 uint8) of one (H, W) channel with range [lo, hi], min-max scaled to 8 bits first."""
    if hi > lo:
        alpha = 255.0 / (hi - lo)
        # |x * alpha - lo * alpha| lies in 0..255: one fused, saturating pass to uint8.
        img8 = cv2.convertScaleAbs(channel, alpha=alpha, beta=-lo * alpha)
    else:
        img8 = np.zeros(channel.shape, np.uint8)
    # Canny from the 3x3 Sobel gradients OpenCV's own Canny would compute (replicated border): the same
    # edges bit for bit, in about half the time of cv2.Canny(img8, ...), whose fused Sobel is slower.
    dx, dy = cv2.spatialGradient(img8, borderType=cv2.BORDER_REPLICATE)
    return cv2.Canny(dx, dy, float(thresholds[0]), float(thresholds[1]))


def _union(edges: list[np.ndarray]) -> np.ndarray:
    """Pixels that are an edge in any of the channels' 0/255 maps."""
    combined = edges[0]
    for e in edges[1:]:
        combined = cv2.max(combined, e)
    return combined


def edge_map_2d(image: np.ndarray, thresholds: tuple[float, float] = (50.0, 150.0)) -> np.ndarray:
    """The 2D split criterion: 1.0 on Canny edge pixels of any channel, else 0.0; (H, W) float32.

    Each channel of the (C, H, W) image is min-max scaled to 0..255 uint8, run through
    ``cv2.Canny(low, high)``, and the channels' edges are combined with max.
    """
    image = _check_image(image)
    if image.ndim != 3:
        raise ValueError(f"edge_map_2d takes a (C, H, W) image, got shape {image.shape}")
    edges = [_edges_u8(ch, lo, hi, thresholds) for ch, lo, hi in zip(image, *_bounds(image), strict=True)]
    return (_union(edges) > 0).astype(np.float32)


def _gradient_channel(volume: np.ndarray) -> np.ndarray:
    """Sum of |forward differences| along the three axes of one (D, H, W) volume, float32.

    The last slice along an axis has no forward neighbour and contributes 0 for that axis. Plain
    numpy on the flattened volume, so every pass is one long contiguous loop: the neighbour along
    axis 0 / 1 / 2 is H * W / W / 1 elements on, and differences that wrapped across a slice or row
    edge are zeroed. Two volume-sized float32 buffers and ``out=`` everywhere, no other temporaries.
    """
    volume = np.ascontiguousarray(volume, dtype=np.float32)
    d, h, w = volume.shape
    flat = volume.reshape(-1)
    grad = np.empty(flat.size, np.float32)
    buf = np.empty(flat.size, np.float32)
    plane = h * w
    np.subtract(flat[plane:], flat[:-plane], out=grad[:-plane])  # axis 0
    np.abs(grad[:-plane], out=grad[:-plane])
    grad[flat.size - plane :] = 0  # the last slice
    np.subtract(flat[w:], flat[:-w], out=buf[:-w])  # axis 1
    np.abs(buf[:-w], out=buf[:-w])
    buf.reshape(d, plane)[:, plane - w :] = 0  # the last row of every slice
    np.add(grad, buf, out=grad)
    np.subtract(flat[1:], flat[:-1], out=buf[:-1])  # axis 2
    np.abs(buf[:-1], out=buf[:-1])
    buf.reshape(d * h, w)[:, w - 1] = 0  # the last value of every row
    np.add(grad, buf, out=grad)
    return grad.reshape(d, h, w)


def gradient_map_3d(image: np.ndarray) -> np.ndarray:
    """The 3D split criterion: gradient magnitude of a (C, D, H, W) volume, (D, H, W) float32.

    Per channel, the sum of absolute forward differences along each axis, divided by that channel's
    value range (so channels in different units weigh alike; constant channels add 0), summed over
    channels.
    """
    image = _check_image(image)
    if image.ndim != 4:
        raise ValueError(f"gradient_map_3d takes a (C, D, H, W) volume, got shape {image.shape}")
    out = np.zeros(image.shape[1:], np.float32)
    for channel, lo, hi in zip(image, *_bounds(image), strict=True):
        if hi > lo:
            out += _gradient_channel(channel) * np.float32(1.0 / (hi - lo))
    return out


def _box_mean(x: np.ndarray, f: int, nd: int, out: np.ndarray | None = None) -> np.ndarray:
    """f-fold box average over the last ``nd`` axes of a C-contiguous float array (OpenCV INTER_AREA).

    With an integer factor INTER_AREA averages disjoint f x f windows (float32 sums for float32
    input). The array is seen as 2D (rows = every axis but the last): a window of f rows never
    straddles an outer axis because each spatial side is a multiple of f. In 3D a second pass
    averages the depth axis. ``out`` (C-contiguous, float32, the result's shape) receives the result.
    """
    lead, spatial = x.shape[: x.ndim - nd], x.shape[x.ndim - nd :]
    small = tuple(n // f for n in spatial)
    flat = x.reshape(-1, spatial[-1])
    last = None if out is None else out.reshape(-1, small[-1] if nd == 2 else small[1] * small[2])
    first = last if nd == 2 else None
    flat = cv2.resize(flat, (small[-1], flat.shape[0] // f), dst=first, interpolation=cv2.INTER_AREA)
    if nd == 3:
        flat = flat.reshape(-1, small[1] * small[2])  # rows: (lead, depth); columns: the shrunk plane
        flat = cv2.resize(flat, (flat.shape[1], flat.shape[0] // f), dst=last, interpolation=cv2.INTER_AREA)
    return flat.reshape(*lead, *small)


def _edge_counts(edges: np.ndarray, m: int) -> np.ndarray:
    """Edge pixels (0/255 uint8 map) per m x m cell, int64, from the map's integral image (exact:
    32-bit sums while 255 * pixels fits, else float64)."""
    h, w = edges.shape
    depth = cv2.CV_32S if 255 * h * w < 2**31 else cv2.CV_64F
    corner = cv2.integral(edges, sdepth=depth)[::m, ::m].astype(np.int64)
    return (corner[1:, 1:] - corner[:-1, 1:] - corner[1:, :-1] + corner[:-1, :-1]) // 255


def _gradient_scores(volume: np.ndarray, m: int, lo: float, hi: float) -> np.ndarray:
    """Cell scores of one (D, H, W) channel: its gradient magnitude summed per m^3 cell over its range."""
    if hi > lo:
        return _box_mean(_gradient_channel(volume), m, 3).astype(np.float64) * (m**3 / (hi - lo))
    return np.zeros(tuple(n // m for n in volume.shape))


def _channel_pass(image: np.ndarray, m: int, thresholds: tuple[float, float], separate: bool, halve: bool):
    """One pass over the channels, each used for everything while it is still in cache: its [min,
    max], its criterion and, if ``halve``, its 2x box average (the image pyramid's first level).
    Returns ``(bounds, scores, half)``: scores has one cell-score array per tree (one per channel
    if ``separate``, else one); half is None unless ``halve``. At 1024^2 x 3 this pass order saves a
    sixth of the patching time over channel-wide passes, which re-read the image from memory."""
    nd, count = image.ndim - 1, image.shape[0]
    lo, hi = np.zeros((2, count))
    half = np.empty((count, *(n // 2 for n in image.shape[1:])), np.float32) if halve else None
    criteria = []
    for c, channel in enumerate(image):
        lo[c], hi[c] = cv2.minMaxLoc(channel.reshape(-1, channel.shape[-1]))[:2]
        if nd == 2:
            criteria.append(_edges_u8(channel, lo[c], hi[c], thresholds))
        else:
            criteria.append(_gradient_scores(channel, m, lo[c], hi[c]))
        if half is not None:
            low, high = np.float32(lo[c : c + 1]), np.float32(hi[c : c + 1])
            _halve(channel[None].astype(np.float32, copy=False), nd, low, high, out=half[c : c + 1])
    if nd == 2:
        trees = [_edge_counts(e, m) for e in (criteria if separate else [_union(criteria)])]
    else:
        trees = criteria if separate else [sum(criteria[1:], criteria[0])]
    return (lo, hi), trees, half


def _pyramid(cells: np.ndarray) -> list[np.ndarray]:
    """Level k holds the scores of the aligned 2**k-cell blocks lying fully inside the grid."""
    levels = [cells]
    nd = cells.ndim
    while True:
        prev = levels[-1]
        shape = tuple(n // 2 for n in prev.shape)
        if min(shape) == 0:
            return levels
        crop = prev[tuple(slice(0, 2 * n) for n in shape)]
        split_shape = [x for n in shape for x in (n, 2)]
        levels.append(crop.reshape(split_shape).sum(axis=tuple(range(1, 2 * nd, 2))))


def _up(mask: np.ndarray) -> np.ndarray:
    """Each entry repeated twice along every axis (children of a level-k mask at level k-1)."""
    for axis in range(mask.ndim):
        mask = np.repeat(mask, 2, axis=axis)
    return mask


def _root_masks(levels: list[np.ndarray]) -> list[np.ndarray]:
    """Level-k nodes whose parent block is not fully inside the grid (the base tiling's regions)."""
    roots = []
    for k, level in enumerate(levels):
        root = np.ones(level.shape, bool)
        if k + 1 < len(levels):
            root[tuple(slice(0, 2 * n) for n in levels[k + 1].shape)] = False
        roots.append(root)
    return roots


def _leaves(cells: np.ndarray, fixed_length: int, min_patch: int) -> list[tuple[np.ndarray, ...]]:
    """Leaf block indices per level after the best splits: ``out[k]`` = index arrays at level k."""
    nd = cells.ndim
    gain = 2**nd - 1
    levels = _pyramid(cells)
    roots = _root_masks(levels)
    base = int(sum(r.sum() for r in roots))
    if base > fixed_length:
        raise ValueError(
            f"fixed_length={fixed_length} is below the fewest regions this image allows: {base} "
            f"(the base tiling by the largest aligned blocks of min_patch={min_patch} cells); "
            "use a larger fixed_length or min_patch"
        )
    # Candidates: every node that can split (level >= 1), larger levels first, row-major inside a level,
    # which is exactly the tie order; a stable selection therefore breaks ties as documented.
    top = len(levels) - 1
    scores = np.concatenate([levels[k].ravel() for k in range(top, 0, -1)]) if top else np.zeros(0)
    n_split = min(scores.size, (fixed_length - base) // gain)
    chosen = np.zeros(scores.size, bool)
    if n_split:
        kth = scores.size - n_split
        threshold = np.partition(scores, kth)[kth]
        chosen = scores > threshold
        ties = np.flatnonzero(scores == threshold)[: n_split - int(chosen.sum())]
        chosen[ties] = True
    split = [np.zeros(levels[0].shape, bool)] + [None] * top
    offset = 0
    for k in range(top, 0, -1):
        size = levels[k].size
        split[k] = chosen[offset : offset + size].reshape(levels[k].shape)
        offset += size
    out = []
    for k in range(len(levels)):
        in_tree = roots[k].copy()
        if k < top:
            up = _up(split[k + 1])
            in_tree[tuple(slice(0, n) for n in up.shape)] |= up
        out.append(np.nonzero(in_tree & ~split[k]))
    return out


def _blocks(x: np.ndarray, side: int) -> np.ndarray:
    """View of (C, *S) as (C, n0, side, n1, side, ...) over the full blocks of ``side``."""
    shape, strides = [x.shape[0]], [x.strides[0]]
    for n, st in zip(x.shape[1:], x.strides[1:], strict=True):
        shape += [n // side, side]
        strides += [st * side, st]
    return np.lib.stride_tricks.as_strided(x, shape=shape, strides=strides, writeable=x.flags.writeable)


def _halve(x: np.ndarray, nd: int, lo: np.ndarray, hi: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(C, *S) float32 box-averaged 2x per spatial axis (an odd trailing row/slice is dropped), each
    channel clipped to its [lo, hi] where float32 sums rounded one ulp outside; into ``out`` if given."""
    if any(n % 2 for n in x.shape[1:]):
        x = np.ascontiguousarray(x[(slice(None), *(slice(0, n - n % 2) for n in x.shape[1:]))])
    out = _box_mean(x, 2, nd, out)
    for c, channel in enumerate(out):
        low, high = cv2.minMaxLoc(channel.reshape(-1, channel.shape[-1]))[:2]
        if low < lo[c] or high > hi[c]:
            np.clip(channel, lo[c], hi[c], out=channel)
    return out


def _write(out: np.ndarray, position: np.ndarray, blocks: np.ndarray) -> None:
    """Write (n, C, s, s[, s]) float32 blocks with s <= p (out's side) into ``out[position]``.

    s < p: each pixel repeated (nearest), so the block comes back exactly. ``position`` is
    increasing; when it is a run of consecutive tokens the result is written in place (no
    temporary, no scatter), else into a temporary that is scattered.
    """
    n, c, s = blocks.shape[:3]
    p, nd = out.shape[2], blocks.ndim - 2
    if s == p:
        out[position] = blocks
        return
    run = int(position[-1] - position[0]) == n - 1
    dst = out[position[0] : position[0] + n] if run else np.empty((n, c, *[p] * nd), np.float32)
    f = p // s
    # Nearest upsampling of the last two axes in one OpenCV pass (rows = every other axis; a
    # power-of-two factor makes its source index floor(i / f) exact), then the depth axis in 3D.
    flat = blocks.reshape(-1, s)
    size = (p, flat.shape[0] * f)
    if nd == 2:
        cv2.resize(flat, size, dst=dst.reshape(size[::-1]), interpolation=cv2.INTER_NEAREST)
    else:
        plane = cv2.resize(flat, size, interpolation=cv2.INTER_NEAREST).reshape(n, c, s, 1, p, p)
        dst.reshape(n, c, s, f, p, p)[...] = plane
    if not run:
        out[position] = dst


def _patch_tree(image: np.ndarray, cells: np.ndarray, p: int, m: int, fixed_length: int, bounds, half=None) -> dict:
    nd = image.ndim - 1
    spatial = image.shape[1:]
    leaves = _leaves(cells, fixed_length, m)
    corners = np.concatenate([np.stack(idx, axis=1).astype(np.int64) * (m << k) for k, idx in enumerate(leaves)])
    sides = np.concatenate([np.full(idx[0].size, m << k, np.int64) for k, idx in enumerate(leaves)])
    n = sides.size
    # Row-major order by corner (corners of a tiling are distinct, so the order is total).
    order = np.argsort(np.ravel_multi_index(tuple(corners.T), spatial))
    position = np.empty(n, np.int64)
    position[order] = np.arange(n)
    patches = np.empty((fixed_length, image.shape[0], *[p] * nd), np.float32)
    patches[n:] = 0  # pad tokens; every real one is written below
    # Regions larger than p are read from an image pyramid (level j: box average by 2**j, built by
    # repeated halving only as deep as needed; ``half``, level 1, may come computed), where a region
    # of side p * 2**j is a p-block.
    pyramid = [image] if half is None else [image, half]
    lo, hi = (b.astype(np.float32) for b in bounds)
    start = 0
    for k, idx in enumerate(leaves):
        count, side = idx[0].size, m << k
        if count:
            level = max(side // p, 1).bit_length() - 1
            while len(pyramid) <= level:
                pyramid.append(_halve(pyramid[-1].astype(np.float32, copy=False), nd, lo, hi))
            view = _blocks(pyramid[level], min(side, p))  # (C, n0, b, n1, b[, n2, b])
            gather = view[(slice(None),) + tuple(x for i in idx for x in (i, slice(None)))]  # (count, C, b, b[, b])
            _write(patches, position[start : start + count], gather.astype(np.float32, copy=False))
        start += count
    coords = np.zeros((fixed_length, nd), np.int64)
    coords[:n] = corners[order]
    sizes = np.full(fixed_length, m, np.int64)
    sizes[:n] = sides[order]
    valid = np.zeros(fixed_length, bool)
    valid[:n] = True
    return {"patches": patches, "coords": coords, "sizes": sizes, "valid": valid}


def _check_sizes(spatial: tuple[int, ...], patch_size: int, min_patch: int | None, fixed_length: int) -> int:
    for name, value in (("patch_size", patch_size), ("fixed_length", fixed_length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    m = patch_size if min_patch is None else min_patch
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
        raise ValueError(f"min_patch={min_patch!r} must be a positive int")
    big, small = max(m, patch_size), min(m, patch_size)
    ratio = big // small
    if big % small or ratio & (ratio - 1):
        examples = [patch_size // 2] * (patch_size % 2 == 0) + [patch_size, patch_size * 2]
        raise ValueError(
            f"min_patch={m} must be patch_size={patch_size} times or divided by a power of two "
            f"(e.g. {', '.join(map(str, examples))})"
        )
    if any(n % m for n in spatial):
        down = tuple(n // m * m for n in spatial)
        up = tuple(-(-n // m) * m for n in spatial)
        hint = f"crop to {down} or pad to {up}" if min(down) > 0 else f"pad to {up}"
        # The largest allowed min_patch (patch_size times or over a power of two) dividing every side, if any.
        common, smaller = math.gcd(*spatial), m
        while common % smaller and smaller % 2 == 0:
            half = smaller // 2
            if half < patch_size and patch_size % half:
                break
            smaller = half
        if common % smaller == 0:
            hint += f", or use min_patch={smaller}"
        raise ValueError(f"image spatial shape {tuple(spatial)} is not divisible by min_patch={m}: {hint}")
    return int(m)


def adaptive_patches(
    image: np.ndarray,
    patch_size: int,
    fixed_length: int,
    min_patch: int | None = None,
    edge_thresholds: tuple[float, float] = (50.0, 150.0),
    separate_channels: bool = False,
) -> dict[str, np.ndarray]:
    """Cut a (C, H, W) image or (C, D, H, W) volume into exactly ``fixed_length`` adaptive regions.

    Returns ``patches`` (L, C, p, p[, p]) float32, ``coords`` (L, ndim) int64 top-left corners in
    pixels, ``sizes`` (L,) int64 region sides in pixels and ``valid`` (L,) bool (False for padding,
    which comes last); real regions are in row-major order of their corners. With
    ``separate_channels`` each channel gets its own tree and every array gains a leading channel
    axis: patches (C, L, 1, p..), coords (C, L, ndim), sizes (C, L), valid (C, L). See the module
    docstring for the algorithm and the padding guarantee.
    """
    image = _check_image(image)
    m = _check_sizes(image.shape[1:], patch_size, min_patch, fixed_length)
    # The first pyramid level is made in the channel pass when some region will need it: every
    # cell is one (side m) when fixed_length covers all cells, else some region has side >= 2m.
    cells = math.prod(n // m for n in image.shape[1:])
    halve = m >= 2 * patch_size or (m >= patch_size and fixed_length < cells)
    bounds, trees, half = _channel_pass(image, m, edge_thresholds, separate_channels, halve)
    if not separate_channels:
        return _patch_tree(image, trees[0], patch_size, m, fixed_length, bounds, half)
    parts = [
        _patch_tree(
            image[c : c + 1],
            tree,
            patch_size,
            m,
            fixed_length,
            (bounds[0][c : c + 1], bounds[1][c : c + 1]),
            None if half is None else half[c : c + 1],
        )
        for c, tree in enumerate(trees)
    ]
    return {key: np.stack([part[key] for part in parts]) for key in parts[0]}


def _paste(patches, coords, sizes, valid, spatial) -> np.ndarray:
    """Reconstruct one tree's (L, C, p..) tokens into a (C, *spatial) float32 array."""
    nd = len(spatial)
    valid = valid.astype(bool)
    c, p = patches.shape[1], patches.shape[2]
    out = np.zeros((c, *spatial), np.float32)
    for side in np.unique(sizes[valid]):
        side = int(side)
        sel = valid & (sizes == side)
        blocks = patches[sel]
        if side > p:
            f = side // p
            expand = blocks[(slice(None), slice(None)) + (slice(None), None) * nd]
            blocks = np.broadcast_to(expand, (*blocks.shape[:2], *[x for _ in range(nd) for x in (p, f)]))
            blocks = blocks.reshape(*blocks.shape[:2], *[side] * nd)
        elif side < p:
            f = p // side
            split = blocks.reshape(*blocks.shape[:2], *[x for _ in range(nd) for x in (side, f)])
            total = split.sum(axis=tuple(range(3, 3 + 2 * nd, 2)), dtype=np.float64)
            blocks = (total * (1.0 / f**nd)).astype(np.float32)
        idx = coords[sel] // side
        view = _blocks(out, side)
        view[(slice(None),) + tuple(x for i in idx.T for x in (i, slice(None)))] = blocks
    return out


def reconstruct(
    patches: np.ndarray, coords: np.ndarray, sizes: np.ndarray, valid: np.ndarray, spatial_shape: tuple[int, ...]
) -> np.ndarray:
    """Paste every valid region back at full resolution: (C, *spatial_shape) float32.

    Downsampled regions are upsampled by repetition, upsampled ones area-averaged back down, so a
    region no larger than ``patch_size`` comes back exactly and a larger one as its box average.
    Takes the output of :func:`adaptive_patches`, with or without ``separate_channels``.
    """
    spatial = tuple(int(n) for n in spatial_shape)
    patches, coords, sizes, valid = (np.asarray(a) for a in (patches, coords, sizes, valid))
    if patches.ndim == len(spatial) + 3:  # separate_channels: one tree per channel
        return np.concatenate([_paste(*parts, spatial) for parts in zip(patches, coords, sizes, valid, strict=True)])
    if patches.ndim != len(spatial) + 2 or coords.shape[-1] != len(spatial):
        raise ValueError(f"patches {patches.shape} / coords {coords.shape} do not match spatial_shape {spatial}")
    return _paste(patches, coords, sizes, valid, spatial)
