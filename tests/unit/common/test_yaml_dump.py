"""fedsd.common.yaml_dump: the one YAML writer of the generated files."""

from __future__ import annotations

import yaml

from fedsd.common.yaml_dump import Flow, Quoted, Tagged, comment, dump_yaml


def test_each_wrapper_writes_its_style_and_the_data_reads_back_equal():
    data = {
        "address": Quoted("127.0.0.1:9401"),
        "targets": Flow(["a", "b"]),
        "labels": Flow({"instance": "n0"}),
        "script": "line one\nline two\n",
        "jobs": [{"name": "x"}],
    }
    text = dump_yaml(data)
    assert 'address: "127.0.0.1:9401"\n' in text
    assert "targets: [a, b]\n" in text
    assert "labels: {instance: n0}\n" in text
    assert "script: |\n  line one\n  line two\n" in text
    assert "jobs:\n  - name: x\n" in text  # lists indented under their key
    back = yaml.safe_load(text)
    assert back == {
        "address": "127.0.0.1:9401",
        "targets": ["a", "b"],
        "labels": {"instance": "n0"},
        "script": "line one\nline two\n",
        "jobs": [{"name": "x"}],
    }


def test_tagged_values_as_compose_writes_them():
    text = dump_yaml(
        {"networks": Tagged("!reset", None), "ports": Tagged("!override", Flow(["9410:9410"]))}
    )
    assert text == "networks: !reset null\nports: !override ['9410:9410']\n"


def test_comment_lines():
    assert comment("a\n\nb") == "# a\n#\n# b\n"
    assert comment("") == ""
