"""Flower's Control API client in-process (fedsd.common.control_api): which key bytes it
registers, and that it uses its own FLWR_HOME without leaving it in this process's
environment. Against a real SuperLink: tests/e2e/test_deploy.py (register, re-register)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from fedsd.common.control_api import ControlApi, key_bytes
from fedsd.common.errors import DeployError
from fedsd.common.flwr_config import write_connection
from fedsd.deploy.certs import ensure_node_keys


def _ssh_public(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def test_key_bytes_are_what_flwr_registers(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    (key,) = ensure_node_keys(tmp_path, 1)
    assert key_bytes(key.public_key) == try_load_public_key(key.public_key)


def test_key_bytes_refuse_what_flower_would_not_register(tmp_path):
    with pytest.raises(DeployError, match=r"node public key .*missing\.pub"):
        key_bytes(tmp_path / "missing.pub")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key\n")
    with pytest.raises(DeployError, match="is not an OpenSSH public key"):
        key_bytes(garbage)
    rsa_pub = tmp_path / "rsa.pub"
    rsa_pub.write_bytes(_ssh_public(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    with pytest.raises(DeployError, match="not on a NIST EC curve"):
        key_bytes(rsa_pub)
    ed = tmp_path / "ed25519.pub"
    ed.write_bytes(_ssh_public(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(DeployError, match="not on a NIST EC curve"):
        key_bytes(ed)


def test_each_api_reads_its_own_flwr_home_and_restores_the_callers(tmp_path, monkeypatch):
    a = write_connection(tmp_path / "a", "local", "127.0.0.1:1001", None).parent
    b = write_connection(tmp_path / "b", "local", "127.0.0.1:1002", None).parent
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "caller"))
    assert ControlApi("local", a).connection.address == "127.0.0.1:1001"
    assert ControlApi("local", b).connection.address == "127.0.0.1:1002"
    assert os.environ["FLWR_HOME"] == str(tmp_path / "caller")
    monkeypatch.delenv("FLWR_HOME")
    ControlApi("local", a)
    assert "FLWR_HOME" not in os.environ


def test_a_simulation_connection_is_refused(tmp_path):
    home = write_connection(tmp_path, "sim", ":local:", None).parent
    with pytest.raises(ValueError, match="has no SuperLink address"):
        ControlApi("sim", home)


def test_an_unreachable_superlink_is_a_deploy_error_naming_it(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = write_connection(tmp_path / "h", "local", f"127.0.0.1:{port}", None).parent
    (key,) = ensure_node_keys(tmp_path / "keys", 1)
    with pytest.raises(DeployError, match=f"SuperLink 127.0.0.1:{port} unreachable"):
        ControlApi("local", home).register_node(key.public_key)
