"""The fedsd command line: tiny model, shards, generate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fedsd.cli import main


def test_tiny_model_says_it_is_not_real(tmp_path, capsys):
    assert main(["tiny-model", "--out", str(tmp_path / "m")]) == 0
    assert "NOT a real model" in capsys.readouterr().out
    assert (tmp_path / "m" / "model_index.json").is_file()
    assert "NOT A REAL MODEL" in (tmp_path / "m" / "README.md").read_text()


def test_shards_cli_writes_manifest_and_refuses_bad_args(tmp_path, capsys):
    out = tmp_path / "shards"
    assert main(["shards", "--source", "synthetic", "--num-shards", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == ["shard-0", "shard-1"]
    assert (
        main(["shards", "--source", "synthetic", "--num-shards", "0", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "num-shards" in capsys.readouterr().err


def test_generate_grid_base_vs_adapted(tiny_model, tmp_path):
    from fedsd.config import RunConfig
    from fedsd.ml.model import init_lora_arrays, lora_shapes, save_adapter

    cfg = RunConfig.from_mapping({"model": str(tiny_model), "resolution": 64})
    arrays = init_lora_arrays(lora_shapes(str(tiny_model), cfg), 0)
    rng = np.random.default_rng(0)
    arrays = {
        k: v if ".lora_A." in k else rng.standard_normal(v.shape).astype(np.float32)
        for k, v in arrays.items()
    }
    save_adapter(arrays, tmp_path / "adapter", cfg, {"round": 1})
    png = tmp_path / "grid.png"
    argv = [
        "generate",
        "--model",
        str(tiny_model),
        "--adapter",
        str(tmp_path / "adapter"),
        "--prompt",
        "a photo of a rose",
        "--seed",
        "0",
        "--seed",
        "1",
        "--steps",
        "2",
        "--out",
        str(png),
    ]
    assert main(argv) == 0
    grid = np.asarray(Image.open(png).convert("RGB")).astype(int)
    h, w = grid.shape[0] // 2, grid.shape[1] // 2
    assert grid.shape[1] == 2 * 64  # base | adapted
    base, adapted = grid[:h, :w], grid[:h, w:]
    assert np.abs(base - adapted).mean() > 1.0  # the adapter changes the image
    seed0, seed1 = grid[:h, :w], grid[h:, :w]
    assert np.abs(seed0 - seed1).mean() > 1.0  # rows are different seeds
    # Same seed, same model: generation is reproducible.
    assert main([*argv[:-1], str(tmp_path / "again.png")]) == 0
    again = np.asarray(Image.open(tmp_path / "again.png").convert("RGB")).astype(int)
    assert np.array_equal(grid, again)


def _shards(tmp_path, n):
    out = tmp_path / "shards"
    main(["shards", "--source", "synthetic", "--num-shards", str(n), "--out", str(out)])
    return out


@pytest.mark.parametrize(
    ("nodes", "privacy", "run_config", "message"),
    [
        (3, "dp-sample+dp-central", "", "dp-central together with dp-sample adds noise twice"),
        (3, "dp-local", "", "dp-local"),
        (3, "dp-sample", "", "needs dp-target-epsilon > 0"),
        (3, "dp-output", "dp-output-clip=0.1", "needs dp-output-epsilon"),
        (3, "dp-central", "dp-central-clip=0.1", "needs dp-central-noise-multiplier"),
        (3, "secagg", "secagg-num-shares=2", "an integer > 2"),
        (
            3,
            "secagg",
            "secagg-num-shares=3 secagg-reconstruction-threshold=3",
            "< secagg-num-shares=3",
        ),
        (
            5,
            "secagg",
            "secagg-num-shares=0.5 secagg-reconstruction-threshold=4 min-nodes=5",
            "Flower would abort every round",
        ),
        (
            3,
            "secagg",
            "secagg-quantization-range=2147483648 secagg-modulus-range=4294967296",
            "wraps around",
        ),
        (1, "secagg", "min-nodes=1", "min-nodes"),
        (3, "none", "dp-outptu-clip=1.0", "unknown key(s) dp-outptu-clip"),
    ],
)
def test_up_refuses_bad_privacy_before_starting_anything(
    tmp_path, capsys, nodes, privacy, run_config, message
):
    shards = _shards(tmp_path, nodes)
    argv = ["up", "--local", "--nodes", str(nodes), "--shards", str(shards)]
    argv += ["--out", str(tmp_path / "out"), "--privacy", privacy]
    if run_config:
        argv += ["--run-config", run_config]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "out" / ".deploy").exists()  # no process was started
