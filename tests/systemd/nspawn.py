"""Boot a real systemd (PID 1) in a systemd-nspawn container, run commands in it.

Host mode (see shared docs/real-systemd.md): the container boots the host's own
/usr read-only, with a tmpfs root and a throw-away overlay of /etc, so it needs
no download and boots in about a second. Only ``lo`` exists inside
(``--private-network``): ports never clash with the host or a parallel run.

What is bound inside, and why:
- the repository, read-only, at the SAME path (e.g. /work/main): the venv's
  console script ``.venv/bin/pyngora`` has ``#!<repo>/.venv/bin/python3`` as
  its shebang and the editable install points at ``<repo>/pyngora``, so both
  only work at the path they were installed at;
- the interpreter the venv links to (``/root/.pyenv`` here), read-only.

Command line (the e2e test uses the same code)::

    python tests/systemd/nspawn.py [--standin] [--config=FILE] [--bind-ro=SRC:DST] [UNIT ...]
    python tests/systemd/nspawn.py --shell -- CMD ARG...        # any command inside

Needs root, systemd-nspawn (package systemd-container), nsenter, and
/usr/lib/systemd/systemd on the host. Everything started is stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# Where the container sees the checkout. Not its host path: a checkout under /tmp would be
# hidden from every unit with PrivateTmp= (DynamicUser= implies it).
SRC = Path("/srv/pyngora-src")


def inside(path: Path) -> Path:
    """A host path under the checkout, as the container sees it."""
    path = Path(path).resolve()
    return SRC / path.relative_to(REPO) if path.is_relative_to(REPO) else path
ENV_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# (unit to reload/stop, socket unit or None): the three e2e scenarios
SCENARIOS: list[tuple[str, str | None]] = [
    ("pyngora.service", None),
    ("pyngora-forking.service", None),
    ("pyngora.service", "pyngora.socket"),
]


def unavailable() -> str | None:
    """Why nspawn cannot run here (a skip reason), or None when it can."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "nsenter", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install systemd-container util-linux curl)"
    if not os.access("/usr/lib/systemd/systemd", os.X_OK):
        return "no /usr/lib/systemd/systemd on this host (apt-get install systemd)"
    return None


def interpreter_root() -> Path | None:
    """The directory tree the venv's python lives in (to bind read-only), or
    None when it is under /usr, which the container shares with the host."""
    real = Path(os.path.realpath(REPO / ".venv" / "bin" / "python3"))
    if real.is_relative_to("/usr") or real.is_relative_to(REPO):
        return None
    for parent in real.parents:  # /root/.pyenv/versions/3.11.7/bin -> /root/.pyenv
        if parent.name.startswith(".") or parent.parent.parent == Path("/"):
            return parent
    return real.parent.parent


def _let_others_traverse(repo: Path | str) -> None:
    """The units run as a DynamicUser that must read the checkout where the container binds
    it. A checkout cloned into a private directory (``mktemp -d`` makes it 0700) shows those
    bits there too: open the checkout's own directory to others (r-x, as git makes every
    directory inside it), and say so."""
    mode = os.stat(repo).st_mode & 0o777
    if mode & 0o005 != 0o005:
        os.chmod(repo, mode | 0o005)
        print(f"nspawn: {repo} was {mode:o}; made it {mode | 0o005:o} so the units' "
              f"DynamicUser can read the checkout", file=sys.stderr, flush=True)


class Container:
    """A booted container; use as a context manager so it always powers off."""

    def __init__(self, binds_ro: list[str] | None = None, boot_timeout: float = 60) -> None:
        _let_others_traverse(REPO)
        self.name = f"pyngora-e2e-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        interp = interpreter_root()
        self.binds_ro = [f"{REPO}:{SRC}"] + ([str(interp)] if interp else []) + (binds_ro or [])
        self.boot_timeout = boot_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console = Path(f"/tmp/{self.name}.console.log")

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.shutdown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def boot(self) -> None:
        """Start systemd-nspawn; return once systemd inside is running."""
        argv = ["systemd-nspawn", "-q", "--boot", "--register=no", "--keep-unit", "-M", self.name,
                "--private-network", "-D", "/", "--volatile=yes", "--overlay=/etc::/etc"]
        argv += [f"--bind-ro={b}" for b in self.binds_ro]
        # basic.target: multi-user.target would also start what the HOST enabled;
        # firstboot=off: with --volatile=yes it would wait for a key press.
        argv += ["systemd.unit=basic.target", "systemd.firstboot=off"]
        with open(self.console, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + self.boot_timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not start: {self.console_tail()}")
            r = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-x", "systemd"], capture_output=True, text=True)
            self.leader = int(r.stdout.split()[0]) if r.stdout.split() else 0
            if not self.leader:
                time.sleep(0.05)
        while subprocess.run(["nsenter", "-t", str(self.leader), "-m", "test", "-S", "/run/systemd/private"]).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"systemd in the container did not come up: {self.console_tail()}")
            time.sleep(0.05)
        state = self.run(["systemctl", "is-system-running", "--wait"], timeout=max(5, deadline - time.monotonic()))
        # "degraded" happens now and then when containers boot in parallel (an
        # early unit such as systemd-remount-fs fails); it does not matter here.
        if state.stdout.strip() not in ("running", "degraded"):
            raise RuntimeError(f"boot did not settle ({state.stdout.strip()}): {self.console_tail()}")

    def run(self, argv: list[str], timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside as root, clean environment, cwd = the repo."""
        envs = [f"PATH={ENV_PATH}", "HOME=/root", "LANG=C.UTF-8", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]
        envs += [f"{k}={v}" for k, v in (env or {}).items()]
        cmd = ["nsenter", "-t", str(self.leader), "-a", "/usr/bin/env", "-i", *envs,
               "/bin/sh", "-c", 'cd "$0" && exec "$@"', str(SRC), *argv]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            r = subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f}s")
        if check and r.returncode:
            raise RuntimeError(f"{argv} exited {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        return r

    def shutdown(self) -> None:
        """Power off (bounded), SIGTERM then SIGKILL nspawn if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None and self.leader:
            subprocess.run(["nsenter", "-t", str(self.leader), "-a", "systemctl", "poweroff", "--no-block"],
                           capture_output=True, timeout=15)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None and proc.poll() is None:
                proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
                break
            except subprocess.TimeoutExpired:
                continue
        self.proc = None
        self.console.unlink(missing_ok=True)

    def console_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def scenario_results(out: str) -> dict[str, Any] | None:
    """The JSON line scenario.py prints last, or None if it never got there."""
    for line in reversed(out.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def run_e2e(standin: bool = False, scenarios: list[tuple[str, str | None]] | None = None,
            echo: bool = True, config: str | None = None,
            binds_ro: list[str] | None = None) -> list[dict[str, Any]]:
    """Boot once, install, run each scenario; one result dict per scenario.

    A result has ``unit``, ``ok``, ``checks`` (name/ok/detail), ``journal``,
    ``error_log``, ``output``; a scenario that crashed has ``ok`` False and its
    output. ``standin`` runs tests/systemd/standin.py instead of the product;
    ``config`` replaces tests/systemd/e2e.yaml (a file inside the repository).
    """
    target = str(inside(HERE / "standin.py")) if standin else "pyngora"
    results: list[dict[str, Any]] = []
    with Container(binds_ro=binds_ro) as box:
        r = box.run(["/usr/bin/python3", str(inside(HERE / "scenario.py")), "install",
                     "--pyngora", target]
                    + (["--config", str(inside(Path(config)))] if config else []), timeout=60)
        if r.returncode:
            return [{"unit": "install", "ok": False, "checks": [], "output": r.stdout + r.stderr,
                     "journal": box.run(["journalctl", "-b", "--no-pager", "-n", "50"]).stdout}]
        for unit, sock in scenarios or SCENARIOS:
            argv = ["/usr/bin/python3", str(inside(HERE / "scenario.py")), "run", unit] + (
                ["--socket", sock] if sock else [])
            r = box.run(argv, timeout=150)
            if echo:
                sys.stdout.write(r.stdout)
                sys.stdout.flush()
            res = scenario_results(r.stdout) or {"unit": sock or unit, "ok": False, "checks": [], "journal": ""}
            res["output"] = r.stdout[-4000:] + r.stderr[-4000:]
            results.append(res)
    return results


def main(argv: list[str]) -> int:
    """CLI: see the module docstring."""
    reason = unavailable()
    if reason:
        print(f"nspawn: cannot run: {reason}", file=sys.stderr)
        return 2
    if argv[:1] == ["--shell"]:
        cmd = argv[2:] if argv[1:2] == ["--"] else argv[1:]
        with Container() as box:
            r = box.run(cmd or ["systemctl", "is-system-running"])
            sys.stdout.write(r.stdout)
            sys.stderr.write(r.stderr)
            return r.returncode
    standin = "--standin" in argv
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    binds = [a.split("=", 1)[1] for a in argv if a.startswith("--bind-ro=")]
    units = [a for a in argv if not a.startswith("--")]
    chosen = [s for s in SCENARIOS if not units or (s[1] or s[0]) in units]
    results = run_e2e(standin=standin, scenarios=chosen, config=config, binds_ro=binds)
    for res in results:
        if not res["ok"]:
            print(f"--- {res['unit']} failed; journal:\n{res.get('journal', '')[-3000:]}\n"
                  f"--- error_log:\n{res.get('error_log', '')}\n--- output:\n{res.get('output', '')[-2000:]}")
    print(" ".join(f"{r['unit']}={'ok' if r['ok'] else 'FAILED'} ({r.get('seconds', '?')}s)" for r in results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
