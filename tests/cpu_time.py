"""A pytest plugin that measures the CPU each test costs, its own and its subprocesses', to find what makes the suite
slow: `PYTHONPATH=tests python -m pytest -p cpu_time` prints the totals and the costliest tests at the end.

Wall time misleads on a CPU-bound suite: two workers slow each other down, and a test that starts processes waits
on them. CPU seconds add up across workers; a subprocess's count once it has been waited for.
"""

import os
import pathlib
import resource
import shutil
import tempfile

import pytest

# Where the workers write their tables, for the controlling process to join at the end: it makes the folder before
# pytest-xdist starts them, and they inherit its environment.
TABLES_VARIABLE = "PYTEST_CPU_TIME_TABLES"
SHOWN = int(os.environ.get("PYTEST_CPU_TIME_SHOWN", "30"))


def pytest_configure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[TABLES_VARIABLE] = tempfile.mkdtemp(prefix="pytest-cpu-time-")


def _cpu_seconds() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    own_before, children_before = _cpu_seconds()
    yield
    own_after, children_after = _cpu_seconds()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(pathlib.Path(os.environ[TABLES_VARIABLE]) / f"{worker}.tsv", "a") as table:
        table.write(f"{own_after - own_before:.2f}\t{children_after - children_before:.2f}\t{item.nodeid}\n")


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    tables, rows = pathlib.Path(os.environ[TABLES_VARIABLE]), []
    for table in sorted(tables.glob("*.tsv")):
        for line in table.read_text().splitlines():
            own, children, test = line.split("\t")
            rows.append((float(own) + float(children), float(own), float(children), test))
    total, own, children = (sum(row[index] for row in rows) for index in range(3))
    terminalreporter.write_sep("=", f"CPU time of {len(rows)} tests")
    terminalreporter.write_line(f"{total:.0f} s in all: {own:.0f} s in the test processes, {children:.0f} s "
                                f"({children / max(total, 1e-9):.0%}) in the processes they started")
    for row in sorted(rows, reverse=True)[:SHOWN]:
        terminalreporter.write_line(f"{row[0]:6.1f} s  (own {row[1]:5.1f}, started {row[2]:5.1f})  {row[3]}")
    shutil.rmtree(tables)
