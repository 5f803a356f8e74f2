"""The exporter's render, and that our files are prometheus-client's format byte for byte.

The format tests are the guard against a prometheus-client upgrade changing its multiprocess
files: real prometheus-client metric objects (in a subprocess, multiprocess mode) write the
same samples we write, and the keys must be identical; our files must read back through
prometheus-client's own reader and collector.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from pyngora.metrics import exporter, multiproc, registry

SPEC_METRICS = {
    "pyngora_requests_total", "pyngora_request_duration_seconds",
    "pyngora_upstream_requests_total", "pyngora_upstream_connect_duration_seconds",
    "pyngora_upstream_errors_total", "pyngora_upstream_pool_reused_total",
    "pyngora_backend_healthy", "pyngora_connections_active",
    "pyngora_connections_accepted_total", "pyngora_request_bytes_total",
    "pyngora_response_bytes_total", "pyngora_workers", "pyngora_worker_restarts_total",
    "pyngora_upgrades_total", "pyngora_reloads_total", "pyngora_build_info",
}


@pytest.fixture
def mdir(tmp_path, monkeypatch) -> str:
    d = str(tmp_path / "metrics")
    monkeypatch.setenv(multiproc.ENV_VAR, d)
    multiproc.prepare_dir(d, fresh=True)
    monkeypatch.setattr(multiproc, "_master", None)
    registry.reset()
    registry.init_worker("web")
    yield d
    registry.reset()


def populate() -> None:
    """Touch every metric of SPEC section 8 from this process (as master and as worker)."""
    multiproc.build_info("0.1.0")
    multiproc.workers("web", 2)
    multiproc.worker_restart("web")
    multiproc.upgrade()
    multiproc.reload()
    m = registry.service_metrics("web")
    m.connection_opened()
    m.request_done(200, 0.004, 300, 5000)
    m.request_done(502, 1.5, 300, 0)
    up = registry.upstream_metrics("api")
    up.request_done("127.0.0.1:9000", 200)
    up.connect_duration(0.0007)
    up.error("127.0.0.1:9000", "ConnectRefused")
    up.pool_reused()
    registry.set_backend_healthy("api", "127.0.0.1:9000", True)
    registry.flush()


def test_render_has_every_spec_metric_with_help_and_type(mdir: str) -> None:
    populate()
    body, headers = exporter.render(mdir)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "Content-Encoding" not in headers
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    # the parser strips _total from counter family names
    names = {f.name + ("_total" if f.type == "counter" else "") for f in families.values()}
    assert SPEC_METRICS <= names, SPEC_METRICS - names
    for f in families.values():
        assert f.documentation, f.name
    text = body.decode()
    for name in SPEC_METRICS:
        assert f"# HELP {name} " in text and f"# TYPE {name} " in text
    assert "process_cpu_seconds_total" in names and "process_resident_memory_bytes" in names
    py = "%d.%d.%d" % sys.version_info[:3]
    assert f'pyngora_build_info{{python="{py}",version="0.1.0"}} 1.0' in text
    assert 'pyngora_request_duration_seconds_count{service="web"} 2.0' in text


def test_render_gzip_when_asked(mdir: str) -> None:
    populate()
    plain, _ = exporter.render(mdir, None)
    zipped, headers = exporter.render(mdir, "deflate, gzip;q=1.0, br")
    assert headers["Content-Encoding"] == "gzip" and headers["Vary"] == "Accept-Encoding"
    unzipped = gzip.decompress(zipped)
    # process_cpu_seconds and friends may move between the two renders; the pyngora part does not

    def strip(b: bytes) -> list[str]:
        return [ln for ln in b.decode().splitlines() if ln.startswith("pyngora_")]

    assert strip(unzipped) == strip(plain)
    _, headers = exporter.render(mdir, "gzip;q=0, identity")
    assert "Content-Encoding" not in headers


def test_gzip_accepted_parsing() -> None:
    assert exporter.gzip_accepted("gzip")
    assert exporter.gzip_accepted("GZIP;q=0.5")
    assert exporter.gzip_accepted("br, x-gzip")
    assert not exporter.gzip_accepted(None)
    assert not exporter.gzip_accepted("identity")
    assert not exporter.gzip_accepted("gzip;q=0")
    assert not exporter.gzip_accepted("gzip; q=0.000")


def test_render_rejects_a_missing_directory(tmp_path) -> None:
    with pytest.raises(ValueError):
        exporter.render(str(tmp_path / "nope"))


def test_promtool_check_metrics(mdir: str, tmp_path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus')")
    populate()
    body, _ = exporter.render(mdir)
    out = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                         timeout=60)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout.decode() + out.stderr.decode())


# --------------------------------------------------------------------------- format guard
_WRITE_WITH_PROMETHEUS_CLIENT = r"""
import json, os, sys
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from prometheus_client import Counter, Gauge, Histogram
for d in json.loads(sys.argv[2]):
    labels = ["x%d" % i for i in range(len(d["labels"]))]
    if d["kind"] == "counter":
        m = Counter(d["name"], d["help"], d["labels"])
        (m.labels(*labels) if labels else m).inc(3)
    elif d["kind"] == "gauge":
        m = Gauge(d["name"], d["help"], d["labels"], multiprocess_mode=d["mode"])
        (m.labels(*labels) if labels else m).set(1)
    else:
        m = Histogram(d["name"], d["help"], d["labels"], buckets=d["buckets"])
        (m.labels(*labels) if labels else m).observe(0.01)
"""


def test_keys_and_file_names_match_prometheus_client(tmp_path) -> None:
    """Real prometheus-client objects write the keys we compute, in the files we name."""
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    defs = [{"name": d.name, "kind": d.kind, "help": d.help, "labels": list(d.labels),
             "mode": d.mode, "buckets": [b for b in d.buckets if b != float("inf")]}
            for d in multiproc.METRICS.values()]
    out = subprocess.run([sys.executable, "-c", _WRITE_WITH_PROMETHEUS_CLIENT, str(theirs_dir),
                          json.dumps(defs)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    theirs: dict[str, set[str]] = {}
    for name in os.listdir(theirs_dir):
        m = multiproc.FILE_RE.match(name)
        assert m and m.group("suffix") is None, name  # their names fit our pattern
        theirs[m.group("prefix")] = {k for k, _v, _t in
                                     multiproc.read_file(str(theirs_dir / name))}
    ours: dict[str, set[str]] = {}
    for d in multiproc.METRICS.values():
        values = tuple("x%d" % i for i in range(len(d.labels)))
        keys = ours.setdefault(d.prefix, set())
        if d.kind == "histogram":
            keys.add(multiproc.sample_key(d, values, "_sum"))
            for b in d.buckets:
                keys.add(multiproc.sample_key(d, values, "_bucket", multiproc.float_to_go(b)))
        else:
            keys.add(multiproc.sample_key(d, values))
    assert ours == theirs


def test_our_files_read_back_through_prometheus_client(tmp_path) -> None:
    entries = [('["a", "a_total", {"k": "v"}, "h"]', 3.0, 0.0),
               ('["b", "b", {"k": "\u00e9\u00e9"}, "h\u00e9"]', 1.5, 1234.5),
               ('["c", "c_total", {}, "' + "x" * 5000 + '"]', 2.0**53, 0.0)]
    path = tmp_path / "counter_1-pyngora.db"
    multiproc.write_file(str(path), entries)
    assert list(MmapedDict.read_all_values_from_file(str(path))) == [
        (k, v, t, pos) for (k, v, t), (_, _, _, pos) in
        zip(entries, MmapedDict.read_all_values_from_file(str(path)))]
    assert [(k, v, t) for k, v, t, _ in MmapedDict.read_all_values_from_file(str(path))] == entries
    assert multiproc.read_file(str(path)) == entries


def test_float_to_go_matches_prometheus_client() -> None:
    for v in (*multiproc.REQUEST_BUCKETS, *multiproc.CONNECT_BUCKETS, 1e-9, 12345678.0,
              float("-inf"), float("nan"), 0.0):
        assert multiproc.float_to_go(v) == floatToGoString(v)
