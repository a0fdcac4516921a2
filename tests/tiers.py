"""The test tiers as a pytest plugin: each test is marked with its tier, and a failing unit tier
stops the run before the slower tiers.

The tier of a test is the folder under tests/ that holds it (``tests/unit/...`` is marked
``unit``), so ``pytest -m unit`` selects what ``pytest tests/unit`` runs. pyproject.toml's
testpaths list the tiers fastest first; when a unit test fails, the run stops at the end of the
unit tier with a one-line reason instead of spending minutes on tests that build on it.
tests/conftest.py imports these hooks; a pytest run elsewhere loads them with ``-p tiers``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "distributed", "e2e", "acceptance")


def tier_of(path: Path, rootpath: Path) -> str | None:
    """The tier folder under ``<rootdir>/tests`` that holds ``path``, or None."""
    tests = rootpath / "tests"
    if not path.is_relative_to(tests):
        return None
    top = path.relative_to(tests).parts[0]
    return top if top in TIERS else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item.path, config.rootpath)
        if tier is not None:
            item.add_marker(tier)


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("unit-tier-gate"):  # once, also if loaded twice (-p tiers)
        config.pluginmanager.register(UnitTierGate(config), "unit-tier-gate")


class UnitTierGate:
    """Counts failed unit tests; after the last unit test, stops the run if any failed."""

    def __init__(self, config: pytest.Config):
        self.rootpath, self.failed = config.rootpath, set()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed and tier_of(self.rootpath / report.fspath, self.rootpath) == "unit":
            self.failed.add(report.nodeid)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        handled = yield
        last_unit = tier_of(item.path, self.rootpath) == "unit" and (
            nextitem is not None and tier_of(nextitem.path, self.rootpath) != "unit"
        )
        if last_unit and self.failed:
            item.session.shouldfail = f"stopped after the unit tier: {len(self.failed)} unit test(s) failed"
        return handled
