"""Tile positions (ucfvit.data.tiling): coverage of a volume, hand-computed lists, counts, and split ranges."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ucfvit.data.tiling import count_tiles, split_range, tile_grid, tile_starts


def test_every_tile_of_a_volume_exactly_once():
    shape, tile = (23, 17, 9), (5, 4, 3)
    vol = np.arange(np.prod(shape)).reshape(shape)
    grid = tile_grid(shape, tile)
    assert grid.dtype == np.int64 and grid.shape == (4 * 4 * 3, 3)
    assert len({tuple(c) for c in grid}) == len(grid)
    # The tiles are exactly the blocks of the volume cut at multiples of the tile size.
    a, b, c = (s // t for s, t in zip(shape, tile, strict=True))
    blocks = vol[: a * 5, : b * 4, : c * 3].reshape(a, 5, b, 4, c, 3).transpose(0, 2, 4, 1, 3, 5).reshape(-1, 5, 4, 3)
    tiles = np.stack([vol[x : x + 5, y : y + 4, z : z + 3] for x, y, z in grid])
    np.testing.assert_array_equal(tiles, blocks)  # same blocks, in row-major order
    cover = np.zeros(shape, dtype=int)
    for x, y, z in grid:
        cover[x : x + 5, y : y + 4, z : z + 3] += 1
    expected = np.zeros(shape, dtype=int)
    expected[: a * 5, : b * 4, : c * 3] = 1
    np.testing.assert_array_equal(cover, expected)


@pytest.mark.parametrize(
    "length,tile,overlap,plain,extra",
    [
        (100, 32, 0.0, [0, 32, 64], [68]),
        (96, 32, 0.0, [0, 32, 64], []),  # already ends at the border
        (100, 32, 0.25, [0, 24, 48], [68]),  # overlap 8, step 24
        (100, 32, 0.5, [0, 16, 32, 48, 64], [68]),  # step 16
        (37, 10, 0.3, [0, 7, 14, 21], [27]),  # overlap 3 (0.3 * 10 is 3.0000000000000004), step 7
        (25, 10, 0.9, list(range(16)), []),  # overlap 9, step 1: the last tile ends at 25
        (50, 32, 0.9, [0, 3, 6, 9, 12, 15, 18], []),  # overlap round(28.8) = 29, step 3
        (52, 32, 0.9, [0, 3, 6, 9, 12, 15, 18], [20]),
        (11, 5, 0.5, [0, 2, 4, 6], []),  # overlap 2.5 rounds up to 3: step 2
        (11, 7, 0.5, [0, 3], [4]),  # overlap 3.5 rounds up to 4: step 3
        (10, 4, 0.99, list(range(7)), []),  # overlap 4 would make step 0: at least 1
        (32, 32, 0.5, [0], []),
        (31, 32, 0.0, [], []),  # too short: empty, the caller pads or refuses
        (0, 32, 0.25, [], []),
    ],
)
def test_hand_computed_starts(length, tile, overlap, plain, extra):
    got = tile_starts(length, tile, overlap)
    assert got.dtype == np.int64 and got.tolist() == plain
    assert tile_starts(length, tile, overlap, use_all_data=True).tolist() == plain + extra
    assert count_tiles([length], [tile], overlap) == len(plain)
    assert count_tiles([length], [tile], overlap, use_all_data=True) == len(plain) + len(extra)


def test_hand_computed_grids():
    # 2D, overlap 0.5, tile 4 (step 2): axis 0 -> 0 2 4 6; axis 1 (7) -> 0 2, plus 3 with use_all_data.
    assert tile_grid((10, 7), (4, 4), 0.5).tolist() == [[x, y] for x in (0, 2, 4, 6) for y in (0, 2)]
    assert tile_grid((10, 7), (4, 4), 0.5, use_all_data=True).tolist() == [
        [x, y] for x in (0, 2, 4, 6) for y in (0, 2, 3)
    ]
    # 3D, overlap 0: (6, 5, 4) with tile 4 -> axis 0: 0 (+2), axis 1: 0 (+1), axis 2: 0.
    assert tile_grid((6, 5, 4), (4, 4, 4)).tolist() == [[0, 0, 0]]
    assert tile_grid((6, 5, 4), (4, 4, 4), use_all_data=True).tolist() == [[0, 0, 0], [0, 1, 0], [2, 0, 0], [2, 1, 0]]
    # 3D, overlap 0.25: (100, 37, 25) with tiles (32, 10, 10): steps 24, 8 (round 2.5 up -> 3, step 7), 7.
    axes = [[0, 24, 48, 68], [0, 7, 14, 21, 27], [0, 7, 14, 15]]
    got = tile_grid((100, 37, 25), (32, 10, 10), 0.25, use_all_data=True)
    assert got.tolist() == [list(c) for c in itertools.product(*axes)]
    assert count_tiles((100, 37, 25), (32, 10, 10), 0.25, use_all_data=True) == 4 * 5 * 4
    # One axis too short: no tiles at all, still (0, ndim).
    assert tile_grid((100, 5, 25), (32, 10, 10)).shape == (0, 3)


def test_count_tiles_matches_tile_grid_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(400):
        ndim = int(rng.integers(1, 4))
        shape = rng.integers(0, 60, ndim).tolist()
        tile = rng.integers(1, 20, ndim).tolist()
        overlap = float(rng.choice([0.0, 0.5, rng.uniform(0, 0.999)]))
        use_all = bool(rng.integers(0, 2))
        grid = tile_grid(shape, tile, overlap, use_all)
        assert grid.shape == (count_tiles(shape, tile, overlap, use_all), ndim)
        for axis, (length, t) in enumerate(zip(shape, tile, strict=True)):
            starts = tile_starts(length, t, overlap, use_all)
            assert (np.diff(starts) > 0).all() and (starts >= 0).all() and (starts + t <= length).all()
            if use_all and length >= t:
                assert starts[-1] + t == length  # the border is always reached
            if len(grid):
                assert set(grid[:, axis].tolist()) == set(starts.tolist())
        if len(grid) > 1:  # row-major: lexicographically increasing corners
            assert all(tuple(a) < tuple(b) for a, b in zip(grid[:-1], grid[1:], strict=True))


def test_bad_arguments():
    for overlap in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="--data.tile-overlap"):
            tile_starts(100, 32, overlap)
    for tile in (0, -3):
        with pytest.raises(ValueError, match="tile"):
            tile_starts(100, tile)
    with pytest.raises(ValueError, match="same"):
        tile_grid((10, 10), (4, 4, 4))
    with pytest.raises(ValueError, match="same"):
        count_tiles((10, 10, 10), (4, 4))
    with pytest.raises(TypeError):
        tile_starts(10.5, 4)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 99, 100, 1000, 12345])
def test_split_range_partitions(n):
    parts = [split_range(n, 0.0, 0.8), split_range(n, 0.8, 0.9), split_range(n, 0.9, 1.0)]
    assert parts[0].start == 0 and parts[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(parts[:-1], parts[1:], strict=True))  # consecutive, disjoint
    assert [i for p in parts for i in p] == list(range(n))
    assert all(p.step == 1 for p in parts)


def test_split_range_values_and_errors():
    assert split_range(10, 0.0, 0.8) == range(0, 8)
    assert split_range(10, 0.8, 0.9) == range(8, 9)
    assert split_range(10, 0.9, 1.0) == range(9, 10)
    assert split_range(100, 0.0, 0.29) == range(0, 29)  # 100 * 0.29 is 28.999999999999996 in floats
    assert split_range(3, 0.5, 1.0) == range(1, 3)
    for start, end in [(0.5, 0.5), (0.8, 0.2), (-0.1, 0.5), (0.5, 1.1)]:
        with pytest.raises(ValueError):
            split_range(10, start, end)
    with pytest.raises(ValueError):
        split_range(-1, 0.0, 1.0)
