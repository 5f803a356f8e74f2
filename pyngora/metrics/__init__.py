"""Prometheus metrics for every pyngora process (SPEC section 8).

Modules (this package imports none of them, so the master can import ``multiproc`` alone):

- ``multiproc`` (stdlib only; master side): the metrics directory (``prepare_dir``), dead
  processes (``mark_process_dead``: live gauges dropped, counters archived exactly), the
  master's own metrics (``workers``, ``record_master_event``, ``build_info``, ``master_exit``),
  the metric definitions (``METRICS``) and the file format.
- ``registry`` (workers): cheap hot-path recorders (``service_metrics``, ``upstream_metrics``,
  ``set_backend_healthy``) counted in plain Python numbers and written by ``flush()``.
- ``exporter`` (the prometheus service's process only; imports prometheus_client):
  ``render(metrics_dir, accept_encoding)`` -> the text exposition summed over all processes.
- ``service``: the ``prometheus`` service type that answers ``GET /metrics``.
"""
