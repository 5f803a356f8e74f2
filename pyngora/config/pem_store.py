"""The PEM bytes of the listeners' certificates and keys, as the master checked them (a leaf:
standard library only, so the master keeps it without loading ``ssl``).

A start or a reload reads them once (``stage``), its check child (forked, so it inherits them)
judges exactly those bytes (``protocols/tls.py``), and once the check passed they become what
the workers load (``commit``). Workers are forked afterwards and inherit them: a worker the
master restarts later (a crash, kill -9) loads those again rather than what is on disk now. A
certificate replaced by a bad file (a half-written renewal, a wrong cp) without a reload used
to make every restarted worker fail to boot, and the master then gave up on the whole server.
nginx behaves the same way: its workers use what the master loaded at the last
(re)configuration.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

__all__ = ["stage", "commit", "remember", "checked", "staged"]

Pair = tuple[str, str]  # (cert path, key path)
Pem = tuple[bytes, bytes]  # their bytes

# What the workers load: the pairs of the last configuration that passed its checks.
_checked: dict[Pair, Pem] = {}
# The configuration being checked (None between checks).
_staged: Optional[dict[Pair, Pem]] = None


def stage(listeners_tls: Iterable[Any]) -> None:
    """Read the PEM bytes of each ``tls`` (a TlsConf, SNI entries included; None entries are
    skipped) for the check that follows. A pair that cannot be read is left out: the check
    reads the files itself and reports them."""
    global _staged
    found: dict[Pair, Pem] = {}
    for tls in listeners_tls:
        if tls is None:
            continue
        for entry in (tls, *tuple(getattr(tls, "sni", ()) or ())):
            try:
                with open(entry.cert, "rb") as f:
                    cert_pem = f.read()
                with open(entry.key, "rb") as f:
                    key_pem = f.read()
            except (OSError, TypeError):
                continue
            found[(entry.cert, entry.key)] = (cert_pem, key_pem)
    _staged = found


def commit(passed: bool) -> None:
    """After the check of the staged configuration: when it ``passed``, its bytes become the
    ones workers load (all of them: pairs the configuration no longer names are let go, keys
    included); otherwise the last good ones stay. Either way the stage is emptied."""
    global _checked, _staged
    if passed and _staged is not None:
        _checked = _staged
    _staged = None


def remember(listeners_tls: Iterable[Any]) -> None:
    """``stage`` and ``commit`` at once: the bytes of ``listeners_tls`` as they are now become
    the ones workers load (for a configuration checked by other means)."""
    stage(listeners_tls)
    commit(True)


def checked(cert: str, key: str) -> Optional[Pem]:
    """The bytes of this pair the last good configuration had, or None (load the files)."""
    return _checked.get((cert, key))


def staged(cert: str, key: str) -> Optional[Pem]:
    """The bytes of this pair the configuration under check has, or None (read the files)."""
    return _staged.get((cert, key)) if _staged is not None else None
