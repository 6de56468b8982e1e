"""The Flower control client (fedsd.deploy.control): how ``flwr ... --format json`` answers are
read (the CLI exits 0 on failure too). Against a real SuperLink: tests/e2e/test_deploy.py."""

from __future__ import annotations

from fedsd.deploy.control import _json_payload


def test_json_payload_skips_what_flwr_prints_before_the_json():
    assert _json_payload('Loading...\n{"success": true, "nodes": []}') == {
        "success": True,
        "nodes": [],
    }
    assert _json_payload("no json here") is None
    assert _json_payload("{not json") is None
    assert _json_payload("[1, 2]") is None  # a list is no answer
