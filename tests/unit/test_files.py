"""Bounded reads of small files: FIFOs, oversized and deeply nested files are one error naming the file."""

from __future__ import annotations

import os

import pytest

from ucfvit.files import MIB, check_regular, read_bounded, read_json


class Refused(ValueError):
    pass


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(Refused, match=r"config\.json: the config must be a regular file, but this is a FIFO"):
        read_bounded(fifo, MIB, "the config", Refused)  # returns at once: opening a FIFO would block


def test_a_directory_and_a_missing_file_are_named(tmp_path):
    with pytest.raises(ValueError, match="must be a regular file, but this is a directory"):
        check_regular(tmp_path, "the index")
    with pytest.raises(ValueError, match=r"gone\.json: no such file \(the index\)"):
        check_regular(tmp_path / "gone.json", "the index")


def test_a_sparse_huge_file_is_refused_by_its_size(tmp_path):
    latest = tmp_path / "latest"
    with open(latest, "wb") as f:
        f.truncate(3 << 30)  # 3 GiB, sparse: reading it whole would need 3 GiB of memory
    with pytest.raises(Refused, match=r"latest: the pointer file holds 3072 MiB, more than the 4 KiB"):
        read_bounded(latest, 4096, "the pointer file", Refused)


def test_json_within_bounds_is_read(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('{"step": 3, "x": [1, 2]}')
    assert read_json(path, 1024, "the state") == {"step": 3, "x": [1, 2]}
    assert read_bounded(path, 1024, "the state") == path.read_bytes()


def test_deeply_nested_json_is_one_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(Refused, match=r"deep\.json: the state is JSON nested too deeply to be read"):
        read_json(path, MIB, "the state", Refused)
    path.write_text("{not json")
    with pytest.raises(Refused, match=r"deep\.json: the state is not valid JSON"):
        read_json(path, MIB, "the state", Refused)
