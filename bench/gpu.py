"""The GPU path in one run: Tiny-SD's shapes at 512 px, bf16 autocast, batch 1/4/8; DP-SGD
over plain steps per Opacus mode; one fedsd round with 2 SuperNodes on the GPU.

Steps, each in its own process with a time limit cut from a 450 s budget (the round gets
at least 60 s: at most 8.5 min in all, with start-up; a step that fails or runs out of
time is reported with its output's tail, and the next one runs). Not yet run on a GPU:
none was lent to the sessions that wrote it.

1. ``model``: the ``sd-shape`` pipeline (random weights, Segmind Tiny-SD's UNet, SD-1.x
   VAE, CLIP ViT-L/14 text encoder), written once and shared by every step.
2. ``latent_cache_b{1,4,8}``: ``bench/latent_cache.py --device cuda --resolution 512``:
   training images/s with and without fedsd's latent cache, the one-time encode, and the
   peak CUDA memory (``peak_cuda_allocated_bytes``) at each batch size.
3. ``dp_modes``: ``bench/dp_modes.py --device cuda --resolution 512 --batch-size 4``:
   one DP-SGD step over one plain step for each Opacus ``grad_sample_mode`` (``hooks``,
   ``ew``, ``functorch``, ``ghost``) under bf16 autocast; a mode that fails under bf16 is
   reported as failed, which is itself the answer.
4. ``fedsd_round``: ``fedsd up --local`` (TLS SuperLink, SuperExec, 2 SuperNodes with
   ``device="cuda:0"``), 1 round at 512 px on the ``sd-shape`` model, 8 images per node:
   the round's seconds, the nodes' training seconds and peak CUDA memory from
   history.json.

Packages a CUDA PyTorch machine lacks travel with the repository as wheels: ``python
bench/gpu.py --download-wheels .whl`` here (``CARRY``: the pinned packages of
``docker/constraints.txt`` that such an image lacks, for ``--python-version``, 3.12 by
default), ``python bench/gpu.py --wheels .whl`` there (installs them with ``--no-index
--no-deps`` into a folder first on the path before anything else runs; fedsd itself runs
from this checkout, on ``PYTHONPATH`` for every process it starts). ``--out FILE`` also
writes the JSON (commit it under ``bench/results/``). Without CUDA it stops at once and
says so; the CPU tests never run it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import emit, round_floats, say  # noqa: E402

# Every package the images install, pinned and resolved together (less torch and fedsd)
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
# Those of them a CUDA PyTorch image lacks: docker/constraints.txt less the package list of
# this workplace's H200 image (read 2026-11-17: it has torch, numpy, transformers, peft,
# safetensors, torchmetrics, grpcio, protobuf, httpx, ...). ``--carry NAME ...`` to change.
CARRY = (
    "alembic", "annotated-types", "cffi", "cryptography", "datasets", "diffusers", "dill",
    "fastapi", "flwr", "flwr-datasets", "greenlet", "grpcio-health-checking", "httptools",
    "importlib-metadata", "iterators", "lazy-importer", "mako", "multiprocess", "opacus",
    "prompt-toolkit", "pycparser", "pycryptodome", "pydantic", "pydantic-core",
    "python-dotenv", "sqlalchemy", "starlette", "tomli", "tomli-w", "typing-inspection",
    "tzdata", "uv", "uvicorn", "watchfiles", "wcwidth", "websockets",
)  # fmt: skip
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
BUDGET_S = 450.0  # the whole run: under 8 minutes with start-up


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` from docker/constraints.txt for each of ``names``."""
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.strip().split("==", 1)
            pins[_norm(name)] = f"{name}=={version}"
    missing = [n for n in names if _norm(n) not in pins]
    if missing:
        raise SystemExit(f"bench/gpu.py: not pinned in {CONSTRAINTS}: {', '.join(missing)}")
    return [pins[_norm(n)] for n in names]


def download_wheels(dest: str, names: tuple[str, ...], python_version: str) -> None:
    """Wheels of ``names`` at their pinned versions for an x86-64 Linux CPython."""
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--no-deps", "--only-binary", ":all:", "--implementation", "cp",
        "--python-version", python_version, *platforms, "-d", dest, *pinned(names))  # fmt: skip


def install_wheels(wheels: str) -> None:
    """Install every wheel in ``wheels`` into a folder put first on the path of this process
    and of every process it starts (the GPU machine's own site-packages stay untouched)."""
    site = Path(tempfile.gettempdir()) / "fedsd-gpu-site"
    found = sorted(str(w) for w in Path(wheels).glob("*.whl"))
    if not found:
        raise SystemExit(f"bench/gpu.py: no wheels in {wheels}")
    pip("install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
        "--target", str(site), *found)  # fmt: skip
    sys.path.insert(0, str(site))
    for var, first in (("PYTHONPATH", site), ("PATH", site / "bin")):  # flwr's commands too
        os.environ[var] = os.pathsep.join(p for p in (str(first), os.environ.get(var, "")) if p)


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def run_step(name: str, argv: list[str], limit: float, env: dict[str, str]) -> dict[str, Any]:
    """Run one step's script; its JSON (stdout), or why there is none."""
    say(f"{name}: {' '.join(argv[1:])} (limit {limit:.0f} s)")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=limit, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-3000:]
        return {"ok": False, "why": f"over {limit:.0f} s", "stderr_tail": str(tail)}
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {
            "ok": False,
            "why": f"exit status {proc.returncode}",
            "seconds": seconds,
            "stderr_tail": proc.stderr[-3000:],
        }
    return {"ok": True, "seconds": seconds, "result": json.loads(proc.stdout)}


def fedsd_round(model: Path, work: Path, limit: float) -> dict[str, Any]:
    """One fedsd round with 2 SuperNodes on cuda:0 (``fedsd up --local``)."""
    from fedsd.deploy.up import run_local
    from fedsd.ml.data import write_shards

    write_shards(
        source="synthetic",
        num_shards=2,
        partitioner="iid",
        alpha=1.0,
        val_fraction=0.2,
        seed=0,
        out=work / "shards",
        image_size=512,
        synthetic_images=20,
    )
    out = work / "round-out"
    t0 = time.perf_counter()
    rc = run_local(
        2,
        work / "shards",
        out,
        "resolution=512 batch-size=4",
        rounds=1,
        model=str(model),
        work_dir=work / "round-work",
        stream=lambda line: say(f"  {line}"),
        timeout=limit,
        node_config='device="cuda:0"',
    )
    wall = time.perf_counter() - t0
    if rc != 0:
        return {"ok": False, "why": f"fedsd up exited {rc}", "seconds": wall}
    hist = json.loads((out / "history.json").read_text())
    rnd = hist["rounds"][0]
    return {
        "ok": True,
        "seconds": wall,
        "round_seconds": rnd["seconds"],
        "max_node_train_seconds": rnd["max_node_train_seconds"],
        "nodes": [
            {k: n.get(k) for k in ("train-seconds", "node-seconds", "gpu-peak-bytes")}
            for n in rnd.get("nodes", [])
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--download-wheels", metavar="DIR", help="fetch the wheels, then exit")
    parser.add_argument("--carry", nargs="+", default=list(CARRY), help="packages to fetch")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python")
    parser.add_argument("--wheels", metavar="DIR", help="install these wheels first")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON here")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    args = parser.parse_args()
    if args.download_wheels:
        download_wheels(args.download_wheels, tuple(args.carry), args.python_version)
        return
    if args.wheels:
        install_wheels(args.wheels)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench/gpu.py: no CUDA device (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda}); run it on a GPU machine"
        )
    start = time.perf_counter()
    # fedsd from this checkout in every process (the SuperNodes and launchers inherit it)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    bench = Path(__file__).resolve().parent
    steps: dict[str, Any] = {}

    def left() -> float:
        return BUDGET_S - (time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="fedsd-gpu-") as tmp:
        work = Path(tmp)
        from common import build_model

        t0 = time.perf_counter()
        model, _ = build_model("sd-shape", work)
        steps["model"] = {"ok": True, "seconds": time.perf_counter() - t0}
        for b in args.batch_sizes:
            steps[f"latent_cache_b{b}"] = run_step(
                f"latent_cache_b{b}",
                [sys.executable, str(bench / "latent_cache.py"), "--model", str(model),
                 "--device", "cuda", "--resolution", "512", "--batch-size", str(b),
                 "--images", str(max(16, 2 * b)), "--repeats", "1", "--threads", "0"],
                min(90.0, left() - 180),
                env,
            )  # fmt: skip
        steps["dp_modes"] = run_step(
            "dp_modes",
            [sys.executable, str(bench / "dp_modes.py"), "--model", str(model),
             "--device", "cuda", "--resolution", "512", "--batch-size", "4",
             "--steps", "3", "--repeats", "1", "--threads", "0"],
            min(120.0, left() - 120),
            env,
        )  # fmt: skip
        say(f"fedsd_round: 2 SuperNodes on cuda:0 ({left():.0f} s left)")
        steps["fedsd_round"] = fedsd_round(model, work, max(60.0, left()))
    gpu = torch.cuda.get_device_properties(0)
    result = round_floats(
        {
            "benchmark": "gpu",
            "gpu": gpu.name,
            "gpu_memory_bytes": gpu.total_memory,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "seconds": time.perf_counter() - start,
            "steps": steps,
        }
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    emit(result)


if __name__ == "__main__":
    main()
