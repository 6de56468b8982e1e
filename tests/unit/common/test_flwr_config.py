"""fedsd.common.flwr_config: the one config.toml writer, read back by Flower's own reader."""

from __future__ import annotations

import pytest

from fedsd.common.flwr_config import write_connection


@pytest.mark.parametrize("ca", ["/certs/ca.crt", None])
def test_flower_reads_the_connection_we_write(tmp_path, monkeypatch, ca):
    from flwr.cli.flower_config import read_superlink_connection

    home = tmp_path / "flwr-home"
    path = write_connection(home, "local", "127.0.0.1:9093", ca, header="Written by a test.")
    assert path == home / "config.toml"
    assert path.read_text().startswith("# Written by a test.\n")
    monkeypatch.setenv("FLWR_HOME", str(home))
    conn = read_superlink_connection()  # the default connection
    assert conn.name == "local" and conn.address == "127.0.0.1:9093"
    assert conn.root_certificates == ca
    assert bool(conn.insecure) is (ca is None)
