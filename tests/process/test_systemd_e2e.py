"""pyngora under a real systemd (PID 1 in a systemd-nspawn container), per unit file.

For systemd/pyngora.service (Type=notify), systemd/pyngora-forking.service
(Type=forking + PIDFile) and systemd/pyngora.socket (socket activation into
pyngora.service): ``systemctl start``; requests succeed (curl); ``systemctl
reload`` (the zero-downtime upgrade) three times under a curl loop with 0 failed
requests and a new MainPID (a child of PID 1) each time; a slow request in
flight across a reload completes; a reload with a broken config fails and
changes nothing; SIGHUP (reload in place) renews the workers with 0 failed
requests; ``systemctl stop`` right after one more reload lets a slow request on
the draining old master and one on the new master complete, and ends with
Result=success, no SIGKILL, no process left. tests/systemd/scenario.py lists
every check.

One container boot serves all three (about 1 s); the scenarios run in it one
after another (tests/systemd/scenario.py), driven by tests/systemd/nspawn.py.
Skipped, with the reason, only where nspawn cannot run (not root, tools
missing). ``PYNGORA_E2E_STANDIN=1`` runs the harness against
tests/systemd/standin.py instead of the product (a self-check of the harness).
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.systemd import nspawn

REASON = nspawn.unavailable()
STANDIN = os.environ.get("PYNGORA_E2E_STANDIN") == "1"

pytestmark = pytest.mark.skipif(REASON is not None, reason=f"systemd e2e: {REASON}")


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    """Boot once, run every scenario; results by unit name (socket unit for the third)."""
    out = nspawn.run_e2e(standin=STANDIN, echo=False)
    return {r["unit"]: r for r in out}


def _explain(res: dict[str, Any]) -> str:
    failed = [f"  {c['name']}: {c['detail']}" for c in res.get("checks", []) if not c["ok"]]
    return "\n".join([
        f"{res['unit']}: {len(failed)} failed checks" + (" (the scenario did not finish)" if not res.get("checks") else ""),
        *failed,
        "--- journal (unit):", res.get("journal", "")[-3000:],
        "--- error_log:", res.get("error_log", "")[-2000:],
        "--- scenario output:", res.get("output", "")[-1500:] if not res.get("checks") else "",
    ])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("unit", [sock or svc for svc, sock in nspawn.SCENARIOS])
def test_unit_under_real_systemd(results: dict[str, dict[str, Any]], unit: str) -> None:
    if "install" in results:
        pytest.fail(_explain(results["install"]))
    res = results.get(unit)
    assert res is not None, f"no result for {unit}: {sorted(results)}"
    assert res["ok"], _explain(res)
    # a pass means the whole sequence ran, not that it stopped early without a failure
    names = {c["name"] for c in res["checks"]}
    done = {"requests succeed", "reload #3: 0 failed requests", "stop: slow request on the new master completed", "SIGHUP: 0 failed requests", "Result=success"}
    assert done <= names, f"incomplete scenario, missing {sorted(done - names)}"
