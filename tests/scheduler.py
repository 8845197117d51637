"""The order and the scheduler of the test run (a pytest plugin, loaded by conftest.py): modules that do not need the
golden project first, longest first (tests/durations.json), handed to the two xdist workers one module at a time.

It subclasses pytest-xdist's LoadScopeScheduling and overrides its private `_reschedule` (using `_pending_of`,
`_assign_work_unit`, `assigned_work` and `workqueue`), written against pytest-xdist 3.8: with another major version
the run falls back to xdist's own loadscope scheduler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests and benchmarks run the same tools on the same copies.

ROOT = Path(__file__).resolve().parents[1]


def module_of(nodeid: str) -> str:
    """The test module of a test id (tests/x/test_y.py::test_z[case] -> tests/x/test_y.py)."""
    return nodeid.split("::")[0]


XDIST_MAJOR = "3"  # the pytest-xdist whose private scheduler API _one_module_at_a_time relies on
DURATIONS = ROOT / "tests/durations.json"  # seconds per module, from a full run with --store-durations
_measured: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption(
        "--store-durations",
        action="store_true",
        help="write each test module's measured seconds to tests/durations.json: the order modules are handed out",
    )


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle
def pytest_collection_modifyitems(session, config, items):
    """The modules none of whose tests need the golden project first, so they run while it trains in the
    background; then the others. Within each part the longest module first (tests/durations.json; one not there
    counts as short): pytest-xdist (--dist loadscope, with the scheduler below) hands a worker a whole module
    at a time in this order, so the last ones, running while the other worker may have nothing left, are short. Tests
    keep pytest-randomly's order within their module."""
    known = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    modules: dict[str, set[str]] = {}
    for item in items:
        modules.setdefault(module_of(item.nodeid), set()).update(getattr(item, "fixturenames", ()))

    def order(item) -> tuple[bool, float]:
        module = module_of(item.nodeid)
        return "golden" in modules[module], -known.get(module, 0.0)

    items.sort(key=order)


def pytest_xdist_make_scheduler(config, log):
    """--dist loadscope, handing out modules in the order above and one at a time (see _one_module_at_a_time)."""
    from importlib.metadata import version

    if config.getoption("dist") == "loadscope" and version("pytest-xdist").split(".")[0] == XDIST_MAJOR:
        return _one_module_at_a_time(config, log)
    return None


def _one_module_at_a_time(config, log):
    """xdist's loadscope scheduler, except that a worker gets its next module only on the last test of the one it
    has (xdist gives it when three tests are left, and two modules at the start): a worker never holds a module
    queued behind a long test while the other worker has nothing to do. And the modules keep the collection's order
    (xdist sorts them by their number of tests unless told --no-loadscope-reorder)."""
    from xdist.scheduler import LoadScopeScheduling

    class OneModuleAtATime(LoadScopeScheduling):
        def _reschedule(self, node) -> None:
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
            elif self._pending_of(self.assigned_work[node]) <= 1:  # its last test waits for the next to be known
                self._assign_work_unit(node)

    config.option.loadscopereorder = False
    return OneModuleAtATime(config, log)


def pytest_runtest_logreport(report):
    """Setup, call and teardown of every test, summed by module (under xdist the controller sees every worker's)."""
    module = module_of(report.nodeid)
    _measured[module] = _measured.get(module, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if session.config.getoption("store_durations") and not os.environ.get("PYTEST_XDIST_WORKER") and _measured:
        rounded = {module: round(seconds, 1) for module, seconds in sorted(_measured.items())}
        DURATIONS.write_text(json.dumps(rounded, indent=1) + "\n")
