"""The path routes match: normalised as nginx's location sees it."""
from __future__ import annotations

import pytest

from pyngora.proxy.route_path import route_path


@pytest.mark.parametrize("target,path", [
    ("/admin", "/admin"), ("/admin?q=/../x", "/admin"), ("//admin//x", "/admin/x"),
    ("/./admin", "/admin"), ("/%61dmin", "/admin"), ("/%2Fadmin", "/admin"),
    ("/a/../admin", "/admin"), ("/../../admin", "/admin"), ("/a/%2e%2e/admin", "/admin"),
    ("/admin/.", "/admin/"), ("/admin/x/..", "/admin/"), ("/admin/", "/admin/"),
    ("/admin/..", "/"), ("/%zz/admin", "/%zz/admin"), ("*", "*"), ("/ADMIN", "/ADMIN"),
])
def test_route_path(target: str, path: str) -> None:
    assert route_path(target) == path
