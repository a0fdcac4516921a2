"""Adaptive patching (ucfvit.data.quadtree): counts, tiling, reconstruction, criteria and refusals."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ucfvit.data.quadtree import adaptive_patches, edge_map_2d, gradient_map_3d, reconstruct


def blobs(spatial: tuple[int, ...], count: int = 6, seed: int = 0) -> np.ndarray:
    """float32 (H, W) / (D, H, W) array of random disks / balls of random intensities on 0."""
    rng = np.random.default_rng(seed)
    out = np.zeros(spatial, np.float32)
    grid = np.indices(spatial, dtype=np.float32)
    for _ in range(count):
        centre = rng.uniform(0, spatial)
        radius = rng.uniform(0.1, 0.3) * min(spatial)
        inside = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) < radius**2
        out[inside] = rng.uniform(20, 250)
    return out


def noisy(shape: tuple[int, ...], seed: int = 0, noise: float = 3.0) -> np.ndarray:
    """(C, *spatial) blobs per channel plus noise whose values use the whole float32 mantissa."""
    rng = np.random.default_rng(seed + 1000)
    image = np.stack([blobs(shape[1:], seed=seed + c) for c in range(shape[0])])
    return image + rng.normal(0, noise, shape).astype(np.float32)


def coverage(out: dict, spatial: tuple[int, ...]) -> np.ndarray:
    """How many valid regions cover each pixel."""
    count = np.zeros(spatial, np.int64)
    for corner, side in zip(out["coords"][out["valid"]], out["sizes"][out["valid"]], strict=True):
        count[tuple(slice(c, c + side) for c in corner)] += 1
    return count


def check_layout(out: dict, image: np.ndarray, patch: int, fixed_length: int, min_patch: int) -> None:
    spatial, nd = image.shape[1:], image.ndim - 1
    assert out["patches"].shape == (fixed_length, image.shape[0], *[patch] * nd)
    assert out["patches"].dtype == np.float32
    assert out["coords"].shape == (fixed_length, nd) and out["coords"].dtype == np.int64
    assert out["sizes"].shape == out["valid"].shape == (fixed_length,) and out["sizes"].dtype == np.int64
    valid, sizes, coords = out["valid"], out["sizes"], out["coords"]
    n = int(valid.sum())
    assert valid[:n].all() and not valid[n:].any(), "pads come last"
    assert (coverage(out, spatial) == 1).all(), "valid regions tile the image: no gap, no overlap"
    ratio = sizes[valid] // min_patch
    assert (sizes[valid] % min_patch == 0).all() and (ratio & (ratio - 1) == 0).all()
    assert (coords[valid] % sizes[valid][:, None] == 0).all(), "corners are aligned to their side"
    keys = np.ravel_multi_index(tuple(coords[valid].T), spatial)
    assert (np.diff(keys) > 0).all(), "real regions come in row-major order of their corners"
    assert (sizes[~valid] == min_patch).all() and (coords[~valid] == 0).all()
    assert (out["patches"][~valid] == 0).all()


def check_reconstruction(out: dict, image: np.ndarray, patch: int) -> None:
    """Exact where a region was not shrunk; box averages (side / patch wide) where it was."""
    rec = reconstruct(out["patches"], out["coords"], out["sizes"], out["valid"], image.shape[1:])
    assert rec.shape == image.shape and rec.dtype == np.float32
    shrunk = 0
    for corner, side in zip(out["coords"][out["valid"]], out["sizes"][out["valid"]], strict=True):
        box = (slice(None), *(slice(c, c + side) for c in corner))
        if side <= patch:
            np.testing.assert_array_equal(rec[box], image[box])
        else:
            shrunk += 1
            f, nd = side // patch, image.ndim - 1
            # Each f-wide box of the region is its mean (box average down to the patch, repeated back up).
            split = image[box].astype(np.float64).reshape(-1, *[x for _ in range(nd) for x in (patch, f)])
            mean = split.mean(axis=tuple(range(2, 2 + 2 * nd, 2)), keepdims=True)
            expect = np.broadcast_to(mean, split.shape).reshape(rec[box].shape)
            np.testing.assert_allclose(rec[box], expect, rtol=1e-5, atol=1e-4)
    return shrunk


CASES_2D = [  # (shape, patch, fixed_length, min_patch)
    ((3, 64, 64), 8, 40, None),
    ((1, 48, 80), 16, 12, 16),  # 3 x 5 cells: not square, not a power of two
    ((2, 96, 64), 16, 70, 8),  # regions from 8 (upsampled) to 32 (shrunk)
    ((1, 40, 24), 4, 30, 4),
    ((2, 64, 64), 8, 1, 64),  # one region, shrunk 8x
    ((2, 32, 48), 8, 96, 4),  # every cell, each upsampled 2x
    ((1, 36, 36), 4, 18, 4),  # a 32-square shrunk 8x: the 9-pixel pyramid level has an odd side
    ((2, 36, 60), 12, 15, 12),  # a patch size that is not a power of two
    ((1, 48, 84), 12, 300, 3),  # ... with cells upsampled 4x
]


@pytest.mark.parametrize("shape,patch,length,min_patch", CASES_2D)
def test_2d_layout_tiles_and_reconstructs(shape, patch, length, min_patch):
    image = noisy(shape)
    out = adaptive_patches(image, patch, length, min_patch=min_patch)
    check_layout(out, image, patch, length, min_patch or patch)
    check_reconstruction(out, image, patch)


CASES_3D = [
    ((1, 32, 32, 32), 4, 100, 4),
    ((2, 40, 24, 56), 4, 80, 8),  # non-cubic, not powers of two; every region shrunk
    ((1, 16, 32, 24), 8, 50, 4),  # 4-voxel cells upsampled to 8
    ((1, 32, 32, 32), 4, 8, 16),  # one level of octants
    ((1, 8, 16, 8), 4, 128, 2),  # every cell, each upsampled 2x
    ((1, 36, 36, 36), 4, 218, 4),  # a 32-cube shrunk 8x: the 9-voxel pyramid level has an odd side
]


@pytest.mark.parametrize("shape,patch,length,min_patch", CASES_3D)
def test_3d_octree_tiles_and_reconstructs(shape, patch, length, min_patch):
    image = noisy(shape, seed=3)
    out = adaptive_patches(image, patch, length, min_patch=min_patch)
    check_layout(out, image, patch, length, min_patch)
    check_reconstruction(out, image, patch)


def test_mixed_sizes_exercise_every_resize_path():
    """Regions smaller than, equal to and larger than the patch, several of each, in one image."""
    image = np.zeros((2, 128, 96), np.float32)
    image[:, 8:56, 8:56] = noisy((2, 48, 48), seed=5)  # busy corner: small regions; elsewhere large, flat ones
    image[:, 60:] += np.linspace(0, 1, 96, dtype=np.float32)  # a ramp: box averages are not trivial
    out = adaptive_patches(image, 8, 200, min_patch=4)
    sizes = set(out["sizes"][out["valid"]].tolist())
    assert {4, 8} <= sizes and max(sizes) >= 32, sizes
    check_layout(out, image, 8, 200, 4)
    assert check_reconstruction(out, image, 8) > 0


def base_count(grid: tuple[int, ...]) -> int:
    """Regions of the base tiling, cell by cell: each cell lies in the largest aligned 2**k block inside the grid."""
    total = 0.0
    for cell in np.ndindex(*grid):
        k = 0
        while all((c >> (k + 1) << (k + 1)) + (2 << k) <= n for c, n in zip(cell, grid, strict=True)):
            k += 1
        total += 1 / 2 ** (k * len(grid))
    return round(total)


def test_3x5_cell_grid_counts_and_padding():
    """48 x 80 with 16-pixel cells: two 32-squares plus seven cells (9); 10 and 11 regions are impossible."""
    image = noisy((1, 48, 80))
    with pytest.raises(ValueError, match=r"fixed_length=8 .* 9 "):
        adaptive_patches(image, 16, 8)
    for length, real in ((9, 9), (10, 9), (11, 9), (12, 12), (15, 15), (20, 15)):
        out = adaptive_patches(image, 16, length)
        assert int(out["valid"].sum()) == real, length
        check_layout(out, image, 16, length, 16)


@pytest.mark.parametrize("shape,m,gain", [((1, 64, 48), 8, 3), ((1, 16, 24, 8), 4, 7), ((1, 24, 40, 16), 8, 7)])
def test_padding_is_minimal(shape, m, gain):
    image = noisy(shape, seed=2)
    grid = tuple(n // m for n in shape[1:])
    cells, base = int(np.prod(grid)), base_count(grid)
    with pytest.raises(ValueError, match=rf"fixed_length={base - 1} .*: {base} "):
        adaptive_patches(image, m, base - 1, min_patch=m)
    assert (cells - base) % gain == 0, "a dyadic tiling's count is congruent to the cell count"
    for length in range(base, cells + 2 * gain):
        pads = int((~adaptive_patches(image, m, length, min_patch=m)["valid"]).sum())
        if length <= cells:
            assert pads == (length - base) % gain < gain, length
        else:
            assert pads == length - cells, length


def test_power_of_two_square_has_a_single_root():
    image = noisy((1, 64, 64))
    out = adaptive_patches(image, 16, 1)
    assert out["valid"].all() and out["sizes"][0] == 64
    out = adaptive_patches(image, 16, 16)  # every cell
    assert out["valid"].all() and (out["sizes"] == 16).all()


def test_channels_keep_their_own_pixels():
    pattern = noisy((1, 64, 64))[0]
    image = np.stack([c * 1000 + pattern for c in range(3)])
    out = adaptive_patches(image, 8, 60, min_patch=4)
    rec = reconstruct(out["patches"], out["coords"], out["sizes"], out["valid"], image.shape[1:])
    small = np.zeros(image.shape[1:], bool)
    for corner, side in zip(out["coords"][out["valid"]], out["sizes"][out["valid"]], strict=True):
        small[tuple(slice(c, c + side) for c in corner)] = side <= 8
    assert small.any()
    for c in range(3):
        np.testing.assert_array_equal(rec[c][small], image[c][small])
        patch = out["patches"][out["valid"], c]
        assert patch.min() >= image[c].min() and patch.max() <= image[c].max()


@pytest.mark.parametrize("value", [np.float32(0.1) * np.float32(3), np.float32(1.1), np.float32(-7.3e-5)])
def test_box_average_of_a_constant_image_is_that_constant(value):
    """Float32 sums of a repeated value round; the result must still be the value, not one ulp out."""
    image = np.full((2, 128, 64), value, np.float32)
    out = adaptive_patches(image, 4, 2, min_patch=4)
    assert (out["sizes"] == 64).all()
    assert (out["patches"][out["valid"]] == value).all()
    volume = np.full((1, 32, 32, 64), value, np.float32)
    out = adaptive_patches(volume, 2, 2, min_patch=2)
    assert (out["sizes"] == 32).all() and (out["patches"][out["valid"]] == value).all()


def test_resizing_never_overshoots_the_input_range():
    rng = np.random.default_rng(7)
    image = (rng.standard_normal((2, 128, 128)) * 1e3).astype(np.float32) + np.float32(0.1)
    for length, m in ((1, 128), (4, 64), (40, 4)):
        out = adaptive_patches(image, 4, length, min_patch=m)
        for c in range(2):
            patch = out["patches"][out["valid"], c]
            assert patch.min() >= image[c].min() and patch.max() <= image[c].max()
    volume = (rng.standard_normal((1, 32, 32, 32)) * 1e3).astype(np.float32)
    patch = adaptive_patches(volume, 2, 15, min_patch=2)["patches"]
    assert patch.min() >= volume.min() and patch.max() <= volume.max()


def test_edges_are_split_finest():
    image = np.zeros((1, 128, 128), np.float32)
    image[:, 8:56, 8:56] = blobs((48, 48), count=8, seed=1)  # every edge inside the top-left quadrant
    out = adaptive_patches(image, 8, 40)
    sizes, coords = out["sizes"][out["valid"]], out["coords"][out["valid"]]
    top_left = (coords < 64).all(axis=1)
    assert (sizes[~top_left] == 64).all(), "edge-free quadrants are never split"
    assert sizes[top_left].max() <= 32 and sizes[top_left].min() <= 16
    assert out["valid"].sum() == 40


def test_gradients_are_split_finest_in_3d():
    volume = np.zeros((1, 32, 32, 32), np.float32)
    volume[:, 18:30, 2:14, 18:30] = blobs((12, 12, 12), count=3, seed=4)  # inside one octant
    out = adaptive_patches(volume, 4, 36, min_patch=4)
    sizes, coords = out["sizes"][out["valid"]], out["coords"][out["valid"]]
    octant = (coords[:, 0] >= 16) & (coords[:, 1] < 16) & (coords[:, 2] >= 16)
    assert sizes[octant].min() == 4 and (sizes[~octant] == 16).all()


def test_separate_channels_get_their_own_trees():
    image = np.zeros((2, 128, 128), np.float32)
    image[0, 8:56, 8:56] = blobs((48, 48), count=6, seed=1)
    image[1, 72:120, 72:120] = blobs((48, 48), count=6, seed=2)
    out = adaptive_patches(image, 8, 40, separate_channels=True)
    assert out["patches"].shape == (2, 40, 1, 8, 8)
    assert out["coords"].shape == (2, 40, 2) and out["sizes"].shape == out["valid"].shape == (2, 40)
    assert not np.array_equal(out["sizes"], out["sizes"][::-1])
    for c, busy in ((0, lambda xy: (xy < 64).all(axis=1)), (1, lambda xy: (xy >= 64).all(axis=1))):
        sizes, coords = out["sizes"][c][out["valid"][c]], out["coords"][c][out["valid"][c]]
        assert sizes[busy(coords)].max() < 64 and (sizes[~busy(coords)] == 64).all()
        alone = adaptive_patches(image[c : c + 1], 8, 40)
        for key in alone:
            np.testing.assert_array_equal(out[key][c], alone[key])
    rec = reconstruct(out["patches"], out["coords"], out["sizes"], out["valid"], image.shape[1:])
    assert rec.shape == image.shape
    for c in range(2):
        tree = {key: value[c] for key, value in out.items()}
        check_reconstruction(tree, image[c : c + 1], 8)
        np.testing.assert_array_equal(rec[c : c + 1], reconstruct(**tree, spatial_shape=image.shape[1:]))


def test_separate_channels_in_3d():
    volume = noisy((2, 16, 16, 32), seed=6)
    out = adaptive_patches(volume, 4, 30, separate_channels=True)
    assert out["patches"].shape == (2, 30, 1, 4, 4, 4) and out["coords"].shape == (2, 30, 3)
    assert not np.array_equal(out["sizes"][0], out["sizes"][1])
    for c in range(2):
        check_layout({key: value[c] for key, value in out.items()}, volume[c : c + 1], 4, 30, 4)
        check_reconstruction({key: value[c] for key, value in out.items()}, volume[c : c + 1], 4)


def test_deterministic():
    image = noisy((3, 96, 96), seed=9)
    a = adaptive_patches(image, 8, 77, min_patch=4)
    b = adaptive_patches(image.copy(), 8, 77, min_patch=4)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    volume = noisy((1, 24, 24, 24), seed=9)
    a, b = (adaptive_patches(volume, 4, 50, min_patch=4) for _ in range(2))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64, np.float64, np.float16, bool])
def test_input_dtypes(dtype):
    image = (noisy((2, 32, 48)).clip(0, 255) > 100) if dtype is bool else noisy((2, 32, 48)).clip(0, 255)
    image = image.astype(dtype)
    out = adaptive_patches(image, 8, 20, min_patch=4)
    check_layout(out, image, 8, 20, 4)
    assert out["patches"].dtype == np.float32


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (7, 5), (33, 64), (130, 97)])
def test_edges_equal_opencv_canny_exactly(shape):
    # An 8-bit image spanning 0..255 is used as it is, so the edges must be cv2.Canny's, bit for bit
    # (they are computed from cv2.spatialGradient's Sobel, which is faster than Canny's own).
    rng = np.random.default_rng(sum(shape))
    for image in (
        rng.integers(0, 256, shape),
        cv2.GaussianBlur(rng.integers(0, 256, shape).astype(np.uint8), (5, 5), 2),
    ):
        image = image.astype(np.uint8)
        image.flat[0], image.flat[-1] = 0, 255
        expect = cv2.Canny(image, 50, 150) > 0
        assert np.array_equal(edge_map_2d(image[None]).astype(bool), expect)


def test_criteria():
    image = noisy((2, 64, 48))
    edges = edge_map_2d(image)
    assert edges.shape == (64, 48) and edges.dtype == np.float32 and set(np.unique(edges)) <= {0.0, 1.0}
    expect = np.zeros((64, 48), bool)
    for channel in image:
        img8 = np.round((channel - channel.min()) * (255 / (channel.max() - channel.min()))).astype(np.uint8)
        expect |= cv2.Canny(img8, 50, 150) > 0
    assert (edges.astype(bool) != expect).mean() < 0.01  # equal up to rounding to 8 bits
    assert edges.sum() > 0
    volume = noisy((2, 6, 7, 9), seed=4)
    volume[1] *= 100
    grad = gradient_map_3d(volume)
    expect = np.zeros(volume.shape[1:])
    for channel in volume.astype(np.float64):
        for axis in range(3):
            diff = np.abs(np.diff(channel, axis=axis)) / (channel.max() - channel.min())
            expect[tuple(slice(0, n - (a == axis)) for a, n in enumerate(channel.shape))] += diff
    assert grad.shape == (6, 7, 9) and grad.dtype == np.float32
    np.testing.assert_allclose(grad, expect, rtol=1e-5, atol=1e-6)
    for shape in ((1, 4, 5), (3, 1, 5), (3, 4, 1), (1, 1, 5), (2, 1, 1)):  # no neighbour along some axes
        channel = noisy((1, *shape), seed=8)
        expect = sum(
            np.pad(np.abs(np.diff(channel[0], axis=a)), [(0, int(a == b)) for b in range(3)]) for a in range(3)
        )
        np.testing.assert_allclose(gradient_map_3d(channel), expect / np.ptp(channel), rtol=1e-5, atol=1e-6)
    assert not gradient_map_3d(np.ones((1, 4, 4, 4))).any()


def test_errors_are_clear():
    image = noisy((1, 48, 80))
    hint = r"\(48, 80\).*min_patch=32: crop to \(32, 64\) or pad to \(64, 96\), or use min_patch=16"
    with pytest.raises(ValueError, match=hint):
        adaptive_patches(image, 16, 20, min_patch=32)
    with pytest.raises(ValueError, match=r"fixed_length=3 .*9.*larger fixed_length or min_patch"):
        adaptive_patches(image, 16, 3)
    with pytest.raises(ValueError, match=r"min_patch=12 .*power of two"):
        adaptive_patches(image, 16, 20, min_patch=12)
    with pytest.raises(ValueError, match=r"min_patch=48 .*power of two"):
        adaptive_patches(image, 16, 20, min_patch=48)
    with pytest.raises(ValueError, match=r"\(48, 80\) must be channels-first"):
        adaptive_patches(image[0], 16, 20)
    with pytest.raises(ValueError, match="channels-first"):
        adaptive_patches(image[None, None], 16, 20)
    with pytest.raises(ValueError, match="fixed_length=0"):
        adaptive_patches(image, 16, 0)
    with pytest.raises(ValueError, match="patch_size"):
        adaptive_patches(image, 0, 20)


def test_ties_split_the_larger_node_first_then_row_major():
    """A flat image scores 0 everywhere: the root splits, then the top-left quadrant, then the top-right."""
    image = np.full((1, 64, 64), 5.0, np.float32)
    out = adaptive_patches(image, 16, 7)
    assert out["sizes"].tolist() == [16, 16, 32, 16, 16, 32, 32]
    assert out["coords"].tolist() == [[0, 0], [0, 16], [0, 32], [16, 0], [16, 16], [32, 0], [32, 32]]
    out = adaptive_patches(image, 16, 10)
    assert out["sizes"].tolist() == [16] * 8 + [32] * 2
    assert out["coords"][8:].tolist() == [[32, 0], [32, 32]]
