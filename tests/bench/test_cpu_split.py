"""tests/bench/cpu_split.py's reading of ``perf report --sort comm,dso`` (the sampling itself
needs perf and a quiet machine: it is run by hand, see tests/bench/README.md)."""
from __future__ import annotations

import pytest

from tests.bench.cpu_split import category, shares

REPORT = """\
# Overhead  Command          Shared Object
# ........  ...............  ...................................
#
    50.00%  pyngora: worker  [kernel.kallsyms]
    30.00%  pyngora: worker  libpython3.11.so.1.0
     5.00%  pyngora: worker  loop.cpython-311-x86_64-linux-gnu.so
     2.50%  pyngora: worker  libc.so.6
     2.50%  pyngora: worker  parser.cpython-311-x86_64-linux-gnu.so
     7.00%  nginx            [kernel.kallsyms]
     3.00%  nginx            nginx
"""


def test_a_servers_samples_are_split_by_where_they_fell_and_others_ignored() -> None:
    got = shares(REPORT, ("pyngora: worker", "pyngora: master"))
    assert got["kernel"] == pytest.approx(50 / 90)
    assert got["python"] == pytest.approx(30 / 90)
    assert got["uvloop"] == pytest.approx(5 / 90)
    assert got["httptools"] == got["libc"] == pytest.approx(2.5 / 90)
    assert got["nginx"] == got["other"] == 0
    ng = shares(REPORT, ("nginx",))
    assert ng["kernel"] == pytest.approx(0.7) and ng["nginx"] == pytest.approx(0.3)


def test_no_samples_of_a_server_give_zero_shares_not_an_error() -> None:
    assert set(shares(REPORT, ("haproxy",)).values()) == {0.0}


@pytest.mark.parametrize("dso, cat", [
    ("[kernel.kallsyms]", "kernel"), ("libpython3.11.so.1.0", "python"),
    ("python3.11", "python"), ("loop.cpython-311-x86_64-linux-gnu.so", "uvloop"),
    ("nginx", "nginx"), ("libc.so.6", "libc"), ("[vdso]", "other"), ("[unknown]", "other"),
    ("[nf_conntrack]", "kernel"),
])
def test_categories(dso: str, cat: str) -> None:
    assert category(dso) == cat
