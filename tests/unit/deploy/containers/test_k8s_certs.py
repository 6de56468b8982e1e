"""fedsd.deploy.containers.k8s_certs with FEDSD_MANAGE_TLS=0: it waits, bounded, for a
fedsd-tls Secret that someone else (cert-manager) issues. The whole Job against an API
stand-in with the manifests' RBAC is tests/deploy/test_k8s.py."""

from __future__ import annotations

import pytest

from fedsd.deploy.containers import k8s_certs


class _Secrets:
    """``get`` answers None ``missing`` times, then the issued Secret."""

    def __init__(self, missing: int, tls: dict[str, bytes]) -> None:
        self.missing, self.tls, self.gets = missing, tls, 0

    def get(self, name: str) -> dict[str, bytes] | None:
        assert name == k8s_certs.TLS
        self.gets += 1
        return None if self.gets <= self.missing else self.tls

    def create(self, *args, **kwargs):  # pragma: no cover - must not be called
        raise AssertionError("FEDSD_MANAGE_TLS=0 must never create the Secret")


def test_waits_for_the_issued_secret(tmp_path, monkeypatch):
    monkeypatch.setattr(k8s_certs, "TLS_POLL_SECONDS", 0.01)
    monkeypatch.setenv("FEDSD_TLS_WAIT", "10")
    api = _Secrets(3, {"ca.crt": b"CA", "tls.crt": b"not a certificate"})
    assert k8s_certs.ensure_tls(api, tmp_path, ["superlink"], manage=False) == b"CA"
    assert api.gets == 4


def test_gives_up_after_fedsd_tls_wait_naming_the_secret(tmp_path, monkeypatch):
    monkeypatch.setattr(k8s_certs, "TLS_POLL_SECONDS", 0.01)
    monkeypatch.setenv("FEDSD_TLS_WAIT", "0.05")
    api = _Secrets(10**6, {})
    with pytest.raises(k8s_certs.ApiError, match="fedsd-tls did not appear within 0s"):
        k8s_certs.ensure_tls(api, tmp_path, ["superlink"], manage=False)
    assert api.gets > 2
