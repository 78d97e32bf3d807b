"""Pytest hooks shared by the unit tests and the nbval run of the notebooks.

Each notebook must run its cells within a time budget at the quick scale (DESIGN.md):
the last cell of a notebook fails when the sum of its cells' run times is over it.
"""

from collections import defaultdict

import pytest

NOTEBOOK_BUDGET_S = 40.0  # per notebook, quick scale, 2 CPU cores
_seconds = defaultdict(float)
_last_cell = {}


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if item.path.suffix == ".ipynb":
            _last_cell[item.path] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if item.path.suffix != ".ipynb" or call.when != "call":
        return
    _seconds[item.path] += call.duration
    report = outcome.get_result()
    total = _seconds[item.path]
    if _last_cell.get(item.path) == item.nodeid and total > NOTEBOOK_BUDGET_S and report.passed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.path.name} ran its cells in {total:.1f} s, over the "
            f"{NOTEBOOK_BUDGET_S:.0f} s budget of the quick scale"
        )


def pytest_terminal_summary(terminalreporter):
    if _seconds:
        terminalreporter.section("notebook run times (quick scale)")
        for path, seconds in sorted(_seconds.items()):
            terminalreporter.write_line(
                f"{path.name}: {seconds:.1f} s (budget {NOTEBOOK_BUDGET_S:.0f} s)"
            )
