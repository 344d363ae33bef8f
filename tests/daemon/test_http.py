"""Metrics labels: every route is one series, by its template, and unknown paths share one."""

from __future__ import annotations

import pytest

from daemon.http import route_label


@pytest.mark.parametrize(
    ("path", "label"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/admin/status", "/admin/status"),
        ("/admin/versions", "/admin/versions"),
        ("/admin/versions/v0003/promote", "/admin/versions/{version}/promote"),
        ("/admin/versions/v0003/reject", "/admin/versions/{version}/reject"),
        ("/admin/rollback", "/admin/rollback"),
        ("/admin/promotions", "/admin/promotions"),
        ("/admin/cycles", "/admin/cycles"),
        ("/admin/cycles/c-20261204-010203-abcdef", "/admin/cycles/{cycle_id}"),
        ("/reports", "/reports"),
        ("/reports/v0003", "/reports"),
        ("/admin/versions/v0003/promote/extra", "other"),
        ("/admin/cycles/a/b", "other"),
        ("/wp-login.php", "other"),
        ("/reportsx", "other"),
    ],
)
def test_route_label(path: str, label: str) -> None:
    assert route_label(path) == label
