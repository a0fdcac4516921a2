"""The memory bound of the refusals: every small file that declares gigabytes is refused with one line
naming it by a process limited to 1.5 GiB of address space (importing torch and ucfvit takes about
0.9 GiB of it), while reading any of them whole would need more. The refusals one by one, in process:
tests/unit/test_bounded_inputs.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bombs import deep_json, nifti_gz_declaring, png_declaring, pth_declaring, yaml_aliases

LIMIT = 3 << 29  # 1.5 GiB of address space

# Run under the limit: each call must raise its expected error, one line; prints those lines as JSON.
REFUSE = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from ucfvit.data.readers import DataError, ImageFolderReader, Item, NiftiReader
from ucfvit.interop import WeightsError, read_weights
from ucfvit.train.config import ConfigError, read_config_file

calls = [
    (DataError, ImageFolderReader().header, Item(sys.argv[1])),
    (DataError, ImageFolderReader().read, Item(sys.argv[1])),
    (DataError, NiftiReader().header, Item(sys.argv[2])),
    (DataError, NiftiReader().read, Item(sys.argv[2]), (slice(0, 16),) * 3),
    (WeightsError, read_weights, sys.argv[3]),
    *[(ConfigError, read_config_file, path) for path in sys.argv[4:]],
]
said = []
for error, fn, *args in calls:
    try:
        fn(*args)
    except error as err:
        said.append(str(err))
    else:
        sys.exit(f"{{fn.__qualname__}}{{tuple(args)}} went ahead")
print(json.dumps(said))
"""


def test_every_bomb_is_refused_within_a_stated_memory_bound(tmp_path):
    png = png_declaring(tmp_path / "bomb.png", 30000, 30000)  # 0.9 GB decoded, 3.6 GB as float32
    nii = nifti_gz_declaring(tmp_path / "bomb.nii.gz", (1400, 1400, 1400))  # 2.7 GB decompressed
    pth = pth_declaring(tmp_path / "bomb.pth", 1 << 28)  # 1 GiB of float32 zeros
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as f:
        f.truncate(3 << 30)
    configs = [deep_json(tmp_path / "deep.json"), sparse]
    try:
        import yaml  # noqa: F401 -- optional: the trainer reads YAML configs only with PyYAML
    except ImportError:
        pass
    else:
        configs.append(yaml_aliases(tmp_path / "aliases.yaml"))
    assert max(os.path.getsize(p) for p in (png, nii, pth, *configs[:1])) < 3 << 20
    res = subprocess.run(
        [sys.executable, "-c", REFUSE.format(limit=LIMIT), str(png), str(nii), str(pth), *map(str, configs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    said = json.loads(res.stdout.splitlines()[-1])
    expected = [png, png, nii, nii, pth, *configs]
    assert len(said) == len(expected)
    for line, path in zip(said, expected, strict=True):
        assert str(path) in line and "\n" not in line, line
    assert "more than the 268,435,456 that ucfvit decodes" in said[0]
    assert "gunzip it" in said[2] and "zip members declare 1,024 MiB" in said[4]
    assert "nested too deeply" in said[5] and "more than the 1 MiB" in said[6]
    assert all("YAML aliases are not supported" in line for line in said[7:])
    assert Path(png).stat().st_size < 1 << 20  # the case: under 1 MiB
