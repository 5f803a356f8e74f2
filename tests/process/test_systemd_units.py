"""The deployment kit, statically: unit files, production config, logrotate, Kubernetes.

- ``systemd-analyze verify`` on every unit in systemd/, failing on ANY stderr
  output (it exits 0 on unknown or misspelled keys and only warns).
- The units agree with each other and with deploy/pyngora.yaml: one ExecReload=
  line, paths, TimeoutStopSec >= the drain time, hardening.
- deploy/pyngora.yaml, the Kubernetes ConfigMap's config and the e2e config pass
  ``pyngora -t``.
- The Kubernetes manifests parse and carry what a drain needs: readiness probe,
  preStop hook, terminationGracePeriodSeconds >= preStop + drain, a PDB, a
  Service and a ServiceMonitor whose selectors and ports line up.
The behaviour under a real systemd is tests/process/test_systemd_e2e.py.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("pyngora*.*"))
SERVICES = [u for u in UNITS if u.suffix == ".service"]
EXE = "/opt/pyngora/bin/pyngora"  # where the units expect the console script
CONF = "/etc/pyngora/pyngora.yaml"
PROD = ROOT / "deploy" / "pyngora.yaml"
K8S = ROOT / "deploy" / "kubernetes"
PYNGORA = ROOT / ".venv" / "bin" / "pyngora"


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    """A systemd time span ("75", "75s", "1min 15s") in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "ms": 0.001}
    total = 0.0
    for num, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(num) * units[suffix]
    return total


def test_units_exist() -> None:
    names = {u.name for u in UNITS}
    assert {"pyngora.service", "pyngora-forking.service", "pyngora.socket"} <= names


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    """No error and no warning. verify needs ExecStart= binaries to exist HERE, so
    the copies point at this checkout's console script instead of /opt/pyngora."""
    assert PYNGORA.exists(), f"{PYNGORA} missing: install the venv first (bin/test does)"
    for u in UNITS:  # the socket unit needs its service beside it
        (tmp_path / u.name).write_text(u.read_text().replace(EXE, str(PYNGORA)))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / path.name)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", f"systemd-analyze verify warns:\n{r.stderr}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_systemd_analyze_security(path: Path, tmp_path: Path) -> None:
    """The hardening holds: exposure at most 3.0 of 10 ("OK" in systemd's words)."""
    copy = tmp_path / path.name
    copy.write_text(path.read_text().replace(EXE, str(PYNGORA)))
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(copy)],
                       capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", r.stdout + r.stderr)
    if found is None and "offline" in r.stderr:
        pytest.skip(f"systemd-analyze security --offline unsupported: {r.stderr.strip()}")
    assert found, r.stdout[-2000:] + r.stderr
    assert float(found.group(1)) <= 3.0, r.stdout


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_service_unit_design(path: Path) -> None:
    svc = unit(path)["Service"]
    # $MAINPID is expanded as each ExecReload= line starts: a second line would
    # signal the NEW master. The whole upgrade is one command.
    assert svc["ExecReload"] == [f"{EXE} -c {CONF} -s upgrade"]
    assert svc["ExecStart"][0].startswith(f"{EXE} -c {CONF}")
    assert svc["ExecStartPre"] == [f"{EXE} -c {CONF} -t"]
    # control-group: an old master still draining after a reload is signalled and
    # waited for at stop too (mixed would SIGKILL it once the main process exits)
    assert svc["KillMode"] == ["control-group"] and svc["KillSignal"] == ["SIGTERM"]
    assert svc["RuntimeDirectory"] == ["pyngora"] and svc["LogsDirectory"] == ["pyngora"]
    for key, value in {
        "DynamicUser": "yes", "ProtectSystem": "strict", "NoNewPrivileges": "yes",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "SystemCallFilter": "@system-service",
    }.items():
        assert svc.get(key) == [value], key
    assert int(svc["LimitNOFILE"][0]) >= 65536


def test_notify_unit() -> None:
    svc = unit(ROOT / "systemd" / "pyngora.service")["Service"]
    assert svc["Type"] == ["notify"]
    # MAINPID= comes from the upgraded master before it is the main PID
    assert svc["NotifyAccess"] == ["all"]
    assert svc["ExecStart"] == [f"{EXE} -c {CONF}"]


def test_forking_unit_pidfile_is_pid_file() -> None:
    svc = unit(ROOT / "systemd" / "pyngora-forking.service")["Service"]
    assert svc["Type"] == ["forking"]
    assert svc["ExecStart"] == [f"{EXE} -c {CONF} -d"]
    assert "NotifyAccess" not in svc
    prod = yaml.safe_load(PROD.read_text())
    assert svc["PIDFile"] == [prod["pid_file"]]


def test_socket_unit_matches_a_listener() -> None:
    sock = unit(ROOT / "systemd" / "pyngora.socket")["Socket"]
    assert sock["Service"] == ["pyngora.service"]
    prod = yaml.safe_load(PROD.read_text())
    addresses = {(lst if isinstance(lst, str) else lst["address"])
                 for s in prod["services"] for lst in s.get("listeners", [])}
    # the master adopts a passed socket for the listener with the same address
    assert sock["ListenStream"][0] in addresses


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_stop_timeout_covers_the_drain(path: Path) -> None:
    svc = unit(path)["Service"]
    prod = yaml.safe_load(PROD.read_text())
    drain = prod["grace_period_seconds"] + prod["graceful_shutdown_timeout_seconds"]
    assert seconds(svc["TimeoutStopSec"][0]) > drain
    assert seconds(svc["TimeoutStartSec"][0]) > prod.get("upgrade_timeout_seconds", 30)
    for key in ("pid_file", "upgrade_sock", "error_log"):
        assert prod[key].startswith(("/run/pyngora/", "/var/log/pyngora/")), key


def _check_config(path: Path, tmp_path: Path) -> None:
    """-t as the unit's ExecStartPre runs it, after LogsDirectory= made /var/log/pyngora: a
    directory of the test's own stands in for it (the file is copied beside it)."""
    logs = tmp_path / "log"
    logs.mkdir()
    as_installed = tmp_path / path.name
    as_installed.write_text(path.read_text().replace("/var/log/pyngora", str(logs)))
    r = subprocess.run([sys.executable, "-m", "pyngora", "-c", str(as_installed), "-t"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "is ok" in r.stdout


def test_production_config_is_valid(tmp_path: Path) -> None:
    """Where /var/log/pyngora is missing, -t on the file as it is says so, and says nothing
    else (as nginx -t would fail to open its logs)."""
    _check_config(PROD, tmp_path)
    if not Path("/var/log/pyngora").is_dir():
        r = subprocess.run([sys.executable, "-m", "pyngora", "-c", str(PROD), "-t"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        issues = r.stderr.splitlines()[:-1]
        assert r.returncode == 1 and issues, r.stderr
        assert all(i.endswith("directory /var/log/pyngora does not exist") for i in issues), issues


def test_e2e_config_is_valid(tmp_path: Path) -> None:
    _check_config(ROOT / "tests" / "systemd" / "e2e.yaml", tmp_path)


def test_logrotate_reopens() -> None:
    text = (ROOT / "deploy" / "logrotate" / "pyngora").read_text()
    assert "/var/log/pyngora/" in text
    assert re.search(r"postrotate\s.*-s reopen.*\sendscript", text, re.S)
    if shutil.which("logrotate"):
        r = subprocess.run(["logrotate", "-d", str(ROOT / "deploy" / "logrotate" / "pyngora")],
                           capture_output=True, text=True, timeout=30)
        assert "error" not in (r.stdout + r.stderr).lower(), r.stdout + r.stderr


# --------------------------------------------------------------------------- Kubernetes
def manifests() -> dict[str, dict[str, Any]]:
    """Every document under deploy/kubernetes, by kind (one of each)."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in out, f"two {doc['kind']}s"
                assert doc.get("apiVersion") and doc.get("metadata", {}).get("name"), path
                out[doc["kind"]] = doc
    return out


def test_kubernetes_kinds() -> None:
    assert set(manifests()) >= {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "ServiceMonitor"}


def test_kubernetes_deployment_drains() -> None:
    m = manifests()
    dep = m["Deployment"]
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (c,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probe = c["readinessProbe"]
    target = (probe.get("httpGet") or probe.get("tcpSocket"))["port"]
    assert target in ports or target in ports.values()
    assert "livenessProbe" in c
    pre = c["lifecycle"]["preStop"]
    cmd = " ".join(pre["exec"]["command"]) if "exec" in pre else ""
    sleep = int(re.search(r"sleep (\d+)", cmd).group(1)) if "sleep" in cmd else int(pre["sleep"]["seconds"])
    conf = yaml.safe_load(m["ConfigMap"]["data"]["pyngora.yaml"])
    drain = conf["grace_period_seconds"] + conf["graceful_shutdown_timeout_seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > sleep + drain
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # the config is mounted where the command reads it
    mounts = {v["mountPath"]: v["name"] for v in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert c["command"][-2:] == ["-c", "/etc/pyngora/pyngora.yaml"]
    assert vols[mounts["/etc/pyngora"]]["configMap"]["name"] == m["ConfigMap"]["metadata"]["name"]
    # pid_file, upgrade_sock and metrics_dir live on a writable volume (read-only root)
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for key in ("pid_file", "upgrade_sock", "metrics_dir"):
        assert any(conf[key].startswith(p + "/") for p in mounts if p != "/etc/pyngora"), key
    # the readiness port is a listener of the configured server
    listen_ports = {int(str(lst if isinstance(lst, str) else lst["address"]).rsplit(":", 1)[1])
                    for s in conf["services"] for lst in s.get("listeners", [])}
    assert set(ports.values()) <= listen_ports


def test_kubernetes_service_pdb_servicemonitor_line_up() -> None:
    m = manifests()
    pod_labels = m["Deployment"]["spec"]["template"]["metadata"]["labels"]
    svc = m["Service"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in m["Deployment"]["spec"]["template"]["spec"]["containers"][0]["ports"]}
    for p in svc["spec"]["ports"]:
        assert p["targetPort"] in container_ports
    pdb = m["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert "maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"]
    sm = m["ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}


def test_kubernetes_config_is_valid(tmp_path: Path) -> None:
    conf = tmp_path / "configmap" / "pyngora.yaml"
    conf.parent.mkdir()
    conf.write_text(manifests()["ConfigMap"]["data"]["pyngora.yaml"])
    _check_config(conf, tmp_path)


def test_unit_parser_agrees_with_configparser() -> None:
    """Our tiny parser must see what configparser sees for non-repeated keys."""
    for path in UNITS:
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str  # type: ignore[assignment,method-assign]
        cp.read_string(path.read_text())
        mine = unit(path)
        for section in cp.sections():
            for key, value in cp[section].items():
                assert value.splitlines()[-1].strip() == mine[section][key][-1]
