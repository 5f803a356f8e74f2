"""What an operator's files look like on a real host, with real pyngora processes:

- a TLS key only root may read (``/etc/ssl/private``, ``/etc/letsencrypt``) with ``user:``
  set: the workers read it before they drop to that user, and so does the next generation;
- TLS certificate and key paths relative to the configuration file: ``-t`` from anywhere,
  ``-d`` (which changes to ``/``) and ``-s`` agree on them;
- ``-s stop`` and ``-s reopen`` from a directory where the file's ``app:`` modules cannot be
  imported: they still reach the master (they need its pid_file, nothing else);
- a Python program (``Server(Opt.parse_args())``, the examples) answering ``-t``, ``-s`` and
  ``--version`` as the ``pyngora`` command does, instead of starting a second server.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, alive, children_of, free_port, get, kill_daemon, port_open, \
    self_signed_cert, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None,
                                reason="openssl and curl are needed")


def _curl_tls(port: int) -> str:
    """The body curl gets over TLS (certificate not verified: it is self-signed)."""
    out = subprocess.run(["curl", "-sSk", "--max-time", "10", f"https://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _tls_static(tmp: Path, port: int, cert: str, key: str, extra: str = "") -> str:
    return (f"pid_file: {tmp}/p.pid\nupgrade_sock: {tmp}/u.sock\nerror_log: {tmp}/e.log\n"
            f"metrics_dir: {tmp}/m\n{extra}"
            f"services:\n  - name: origin\n    type: static\n    body: over tls\n"
            f"    listeners:\n"
            f"      - {{address: '127.0.0.1:{port}', tls: {{cert: {cert}, key: {key}}}}}\n")


def _run(args: list[str], cwd: Path | str, env: dict | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env or dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_key_only_root_reads_serves_with_user_and_after_reload(tmp_path, pyngora_factory):
    keys = tmp_path / "private"
    keys.mkdir(mode=0o700)
    cert, key = self_signed_cert(keys, "tls.test")
    os.chmod(key, 0o600)
    port = free_port()
    p = pyngora_factory(_tls_static(tmp_path, port, cert, key,
                                    "user: nobody\ngroup: nogroup\n"))
    assert p.run("-t").returncode == 0
    p.start()
    p.wait_serving(port)
    assert _curl_tls(port) == "over tls"
    old = set(wait_for(lambda: p.workers(), 10, "the workers"))
    for worker in old:  # the workers did drop: the key is not theirs to read now
        uid = next(line for line in open(f"/proc/{worker}/status").read().splitlines()
                   if line.startswith("Uid:")).split()[1]
        assert uid != "0"
    p.signal(signal.SIGHUP)  # the next generation reads the key again, as root
    wait_for(lambda: p.workers() and not (old & set(p.workers())), 30, "the next generation")
    assert _curl_tls(port) == "over tls"
    log = (tmp_path / "e.log").read_text()
    assert "failed to boot" not in log and "PermissionError" not in log, log


def test_relative_tls_paths_are_read_from_the_config_files_directory(tmp_path):
    (tmp_path / "tls").mkdir()
    self_signed_cert(tmp_path / "tls", "rel.test")
    port = free_port()
    conf = tmp_path / "c.yaml"
    conf.write_text(_tls_static(tmp_path, port, "tls/rel.test.pem", "tls/rel.test.key"))
    cmd = [sys.executable, "-m", "pyngora", "-c", str(conf)]
    try:
        t = _run([*cmd, "-t"], cwd="/")
        assert t.returncode == 0, t.stderr
        assert "is ok" in t.stdout
        d = _run([*cmd, "-d"], cwd="/")  # the daemon serves from /
        assert d.returncode == 0, d.stderr
        assert _curl_tls(port) == "over tls"
        master = int((tmp_path / "p.pid").read_text())
        assert os.readlink(f"/proc/{master}/cwd") == "/"
        s = _run([*cmd, "-s", "stop"], cwd="/")
        assert s.returncode == 0, s.stderr
        wait_for(lambda: not alive(master), 30, "the master to stop")
    finally:
        kill_daemon(tmp_path / "p.pid")


APP = '''
class Quiet:
    async def start(self, shutdown):
        await shutdown.wait()
'''


def test_signals_do_not_import_the_apps(tmp_path):
    """A master started from the app's directory; ``-s reopen`` and ``-s stop`` from
    elsewhere, where ``quietapp`` cannot be imported (logrotate's ``-s reopen`` runs from
    wherever cron is)."""
    appdir = tmp_path / "app"
    appdir.mkdir()
    (appdir / "quietapp.py").write_text(APP)
    port = free_port()
    conf = tmp_path / "c.yaml"
    conf.write_text(f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
                    f"error_log: {tmp_path}/e.log\nmetrics_dir: {tmp_path}/m\n"
                    f"services:\n  - {{name: bg, type: background, app: 'quietapp:Quiet'}}\n"
                    f"  - name: origin\n    type: static\n    listeners: ['127.0.0.1:{port}']\n")
    cmd = [sys.executable, "-m", "pyngora", "-c", str(conf)]
    try:
        d = _run([*cmd, "-d"], cwd=appdir)
        assert d.returncode == 0, d.stderr
        master = int((tmp_path / "p.pid").read_text())
        elsewhere = _run([*cmd, "-t"], cwd="/")
        assert elsewhere.returncode == 1 and "quietapp" in elsewhere.stderr  # -t does import
        r = _run([*cmd, "-s", "reopen"], cwd="/")
        assert r.returncode == 0, r.stderr
        s = _run([*cmd, "-s", "stop"], cwd="/")
        assert s.returncode == 0, s.stderr
        wait_for(lambda: not alive(master), 30, "the master to stop")
    finally:
        kill_daemon(tmp_path / "p.pid")


def test_a_python_program_answers_t_s_and_version(tmp_path):
    """``python -m pyngora.examples.load_balancer`` (``Server(Opt.parse_args())``,
    ``bootstrap()``): ``-t`` checks and exits without binding, ``--version`` prints, ``-s
    stop`` stops the running program, and ``-s upgrade`` starts the same program again, which
    takes the sockets over."""
    port = free_port()
    conf = tmp_path / "lb.yaml"
    conf.write_text(f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
                    f"error_log: {tmp_path}/e.log\nmetrics_dir: {tmp_path}/m\n"
                    f"grace_period_seconds: 2\n")
    prog = [sys.executable, "-m", "pyngora.examples.load_balancer", "--listen",
            f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9", "-c", str(conf)]
    try:
        t = _run([*prog, "-t"], cwd=tmp_path, timeout=30)
        assert t.returncode == 0, t.stderr
        assert f"configuration {conf} is ok" in t.stdout and not port_open(port)
        conf.write_text(conf.read_text() + "user: no-such-user-here\n")
        bad = _run([*prog, "-t"], cwd=tmp_path, timeout=30)
        assert bad.returncode == 1 and "no such user 'no-such-user-here'" in bad.stderr
        assert "test failed" in bad.stderr
        conf.write_text(conf.read_text().replace("user: no-such-user-here\n", ""))
        v = _run([*prog, "--version"], cwd=tmp_path, timeout=30)
        assert v.returncode == 0 and v.stdout.startswith("pyngora ")

        d = _run([*prog, "-d"], cwd=tmp_path)
        assert d.returncode == 0, d.stderr
        wait_for(lambda: port_open(port), 20, "the program to serve")
        first = int((tmp_path / "p.pid").read_text())
        up = _run([*prog, "-s", "upgrade"], cwd="/")
        assert up.returncode == 0, up.stdout + up.stderr
        second = int((tmp_path / "p.pid").read_text())
        assert second != first
        wait_for(lambda: not alive(first), 30, "the old master to drain")
        assert port_open(port)
        # The same program, not pyngora's own command (whose file would have no service):
        # its one upstream refuses, so the load balancer answers 502.
        assert get(port)[0] == 502
        s = _run([*prog, "-s", "stop"], cwd="/")
        assert s.returncode == 0, s.stderr
        wait_for(lambda: not alive(second), 30, "the program to stop")
    finally:
        kill_daemon(tmp_path / "p.pid")


def _static_daemon_file(tmp_path: Path) -> tuple[Path, list[str]]:
    """A file for a master with one static service, its files in ``tmp_path``; and the
    command that names it."""
    conf = tmp_path / "c.yaml"
    conf.write_text(f"pid_file: {tmp_path}/p.pid\nupgrade_sock: {tmp_path}/u.sock\n"
                    f"error_log: {tmp_path}/e.log\nmetrics_dir: {tmp_path}/m\n"
                    f"services:\n  - name: origin\n    type: static\n"
                    f"    listeners: ['127.0.0.1:{free_port()}']\n")
    return conf, [sys.executable, "-m", "pyngora", "-c", str(conf)]


def test_signals_reach_a_master_whose_file_no_longer_passes(tmp_path):
    """A master started from a valid file, which then gets values this pyngora refuses (as
    after a package upgrade that checks more, under a running master): ``-s reopen`` and
    ``-s stop`` still reach the master, saying why (logrotate's ``-s reopen`` must not stop
    working); ``-s upgrade`` does not (the new master would refuse the file)."""
    conf, cmd = _static_daemon_file(tmp_path)
    good = conf.read_text()
    try:
        assert _run([*cmd, "-d"], cwd=tmp_path).returncode == 0
        master = int((tmp_path / "p.pid").read_text())
        conf.write_text(good.replace("services:", "threads: 5000\nservices:"))
        up = _run([*cmd, "-s", "upgrade"], cwd="/")
        assert up.returncode == 1 and "threads: must be" in up.stderr, up.stderr
        assert int((tmp_path / "p.pid").read_text()) == master
        r = _run([*cmd, "-s", "reopen"], cwd="/")
        assert r.returncode == 0 and "signalling the running master anyway" in r.stderr, r.stderr
        wait_for(lambda: "SIGUSR1: logs reopened" in (tmp_path / "e.log").read_text(), 20,
                 "the master's reopen")
        s = _run([*cmd, "-s", "stop"], cwd="/")
        assert s.returncode == 0, s.stderr
        wait_for(lambda: not alive(master), 30, "the master to stop")
    finally:
        kill_daemon(tmp_path / "p.pid")


@pytest.mark.parametrize("spelling", [["-supgrade"], ["--sig", "upgrade"], ["-u", "-s", "stop"]])
def test_an_upgrade_command_that_would_signal_again_is_refused(tmp_path, spelling):
    """``-s upgrade`` starts this command again with ``-u -d``, without its ``-s``: spelled
    as one word (``-supgrade``) or abbreviated (``--sig``), the ``-s`` used to be copied
    into the new master, which upgraded in turn, without end (16 processes in 4 s). Such a
    command is refused (exit 2), as ``-s`` with ``-u`` is; the master is left alone."""
    conf, cmd = _static_daemon_file(tmp_path)
    try:
        assert _run([*cmd, "-d"], cwd=tmp_path).returncode == 0
        master = int((tmp_path / "p.pid").read_text())
        before = set(children_of(master))
        r = _run([*cmd, *spelling], cwd=tmp_path)
        assert r.returncode == 2, r.stdout + r.stderr
        assert int((tmp_path / "p.pid").read_text()) == master and alive(master)
        assert set(children_of(master)) == before  # no hand-over began
        assert not [p for p in os.listdir("/proc") if p.isdigit() and
                    "-u" in _cmdline(int(p)) and str(conf) in _cmdline(int(p))]
    finally:
        kill_daemon(tmp_path / "p.pid")


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
