"""The tiers (tests/tiers.py) on a generated tree of tiny tests, run by pytester in this process: each
test is marked with the folder it is in, the tiers run fastest first, and a failing unit tier stops
the run before the other tiers with a one-line reason."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# pyproject.toml's settings, for a tree whose tests/ holds one file per tier. The files have names of
# their own (no tier package): this process has imported tests/unit etc. as `unit`, ... already.
INI = """[pytest]
testpaths = tests/unit tests/distributed tests/e2e tests/acceptance
markers =
    unit
    distributed
    e2e
    acceptance
"""


def tree(pytester: pytest.Pytester, unit_fails: bool) -> None:
    pytester.makefile(".ini", pytest=INI)
    files = {
        "unit/test_tier_unit.py": (
            f"def test_unit_ok():\n    pass\n\n\ndef test_unit_other():\n    assert {not unit_fails}\n"
        ),
        "distributed/test_tier_distributed.py": "def test_distributed():\n    pass\n",
        "e2e/test_tier_e2e.py": "def test_e2e():\n    pass\n",
        "acceptance/test_tier_acceptance.py": "def test_acceptance():\n    pass\n",
    }
    for name, text in files.items():
        path = pytester.path / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def ran(result: pytest.RunResult) -> list[str]:
    """The tests a verbose run reported, in the order they ran."""
    words = [line.split() for line in result.outlines if line.startswith("tests/")]
    return [w[0].split("::")[1] for w in words if len(w) > 1 and w[1] in ("PASSED", "FAILED")]


def test_the_tiers_run_fastest_first(pytester):
    tree(pytester, unit_fails=False)
    result = pytester.runpytest("-p", "tiers", "-v")
    result.assert_outcomes(passed=5)
    assert ran(result) == ["test_unit_ok", "test_unit_other", "test_distributed", "test_e2e", "test_acceptance"]


def test_a_failing_unit_test_stops_the_run_after_the_unit_tier_with_one_line(pytester):
    tree(pytester, unit_fails=True)
    result = pytester.runpytest("-p", "tiers", "-v")
    result.assert_outcomes(passed=1, failed=1)
    assert ran(result) == ["test_unit_ok", "test_unit_other"]  # the unit tier ran to its end, then nothing
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["!* stopped after the unit tier: 1 unit test(s) failed !*"])


def test_a_failing_tier_after_the_unit_tier_stops_nothing(pytester):
    tree(pytester, unit_fails=False)
    (pytester.path / "tests" / "distributed" / "test_tier_distributed.py").write_text(
        "def test_distributed():\n    assert 0\n"
    )
    result = pytester.runpytest("-p", "tiers")
    result.assert_outcomes(passed=4, failed=1)


@pytest.mark.parametrize("tier", ["unit", "distributed", "e2e", "acceptance"])
def test_the_marker_is_the_folder(pytester, tier):
    tree(pytester, unit_fails=False)
    by_marker = pytester.runpytest("-p", "tiers", "-m", tier, "--collect-only", "-q")
    by_folder = pytester.runpytest("-p", "tiers", f"tests/{tier}", "--collect-only", "-q")
    ids = [line for line in by_marker.outlines if "::" in line]
    assert ids and all(f"tests/{tier}/" in line for line in ids)
    assert ids == [line for line in by_folder.outlines if "::" in line]
