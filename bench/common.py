"""Shared helpers for the fedsd benchmarks: models, data, environment, JSON output.

Not a benchmark itself. Every benchmark prints exactly one JSON object to stdout (via
:func:`emit`) and its progress to stderr (via :func:`say`), builds what it needs in a
temporary directory, and never downloads anything.

Models (``--model``):

* ``tiny``: ``fedsd.ml.model.write_tiny_pipeline``, a few-hundred-kB random pipeline.
  Fast; its compute balance (VAE vs text encoder vs UNet) says nothing about a real
  model.
* ``sd-shape``: a *randomly initialised* pipeline with the real shapes: the Segmind
  Tiny-SD / BK-SDM-Tiny UNet (323,384,964 parameters, checked when it is built), the
  SD-1.x VAE (83.7M) and the CLIP ViT-L/14 text encoder (123M). Same FLOPs and memory
  traffic as Tiny-SD, so timings transfer; losses do not (random weights).
* a directory: any diffusers Stable Diffusion 1.x pipeline already on disk (for example
  a saved copy of ``segmind/tiny-sd``), used as is.

The model is written with ``StableDiffusionPipeline.save_pretrained`` and read back by
fedsd's own loaders, so the real loading path is what runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Offline and quiet before torch, diffusers, transformers or flwr are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

MODEL_KINDS = ("tiny", "sd-shape")
# Segmind Tiny-SD (BK-SDM-Tiny): the UNet parameter count its shape must reproduce.
TINY_SD_UNET_PARAMS = 323_384_964

_T0 = time.perf_counter()


def bench_parser(doc: str, model: str = "tiny") -> argparse.ArgumentParser:
    """The arguments every model bench shares: ``--model`` and ``--resolution``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=model,
        help=f"one of {', '.join(MODEL_KINDS)} (random weights) or a diffusers SD-1.x directory",
    )
    p.add_argument("--resolution", type=int, default=64, help="training resolution (px)")
    return p


def say(msg: str) -> None:
    """A progress line on stderr (stdout is reserved for the JSON result)."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print the benchmark's one JSON object to stdout."""
    print(json.dumps(result, indent=2, default=_json_default), flush=True)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


@contextmanager
def timed() -> Iterator[dict[str, float]]:
    """``with timed() as t: ...`` then ``t["s"]`` holds the elapsed seconds."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start


def set_threads(threads: int) -> None:
    """Use ``threads`` torch threads (0: leave torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def environment(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    env: dict[str, Any] = {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return env


def round_floats(obj: Any, digits: int = 6) -> Any:
    """Round floats in nested lists/dicts to ``digits`` significant digits for the JSON."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {k: round_floats(v, digits) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [round_floats(v, digits) for v in obj]
    return obj


# --------------------------------------------------------------------------- models


def build_model(model: str, work_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """Return (pipeline directory, kind) for ``--model`` (tiny, sd-shape or a directory)."""
    from fedsd.ml.model import resolve_model, write_tiny_pipeline

    if model == "tiny":
        return write_tiny_pipeline(work_dir / "tiny-model", seed=seed), "tiny"
    if model == "sd-shape":
        return write_sd_shape_pipeline(work_dir / "sd-shape-model", seed=seed), "sd-shape"
    return Path(resolve_model(model)), "directory"


def sd_shape_unet() -> Any:
    """The Segmind Tiny-SD (BK-SDM-Tiny) UNet shape with random weights (seed torch first);
    its parameter count is checked against Tiny-SD's."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(320, 640, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        mid_block_type=None,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    n_unet = sum(p.numel() for p in unet.parameters())
    if n_unet != TINY_SD_UNET_PARAMS:
        raise AssertionError(f"sd-shape UNet has {n_unet:,} parameters, not Tiny-SD's")
    return unet


def write_sd_shape_pipeline(out: str | Path, seed: int = 0) -> Path:
    """A random pipeline with Tiny-SD's UNet, the SD-1.x VAE and the ViT-L/14 text encoder.

    NOT a real model (random weights). The tokenizer is fedsd's offline byte-level CLIP
    BPE (no merges, 514 tokens): one token per byte instead of per word piece, which
    only changes which of the 77 padded positions hold text, not the text encoder's
    cost (it always runs on 77 positions).
    """
    import torch
    from diffusers import AutoencoderKL

    from fedsd.ml.model import write_random_pipeline

    out = Path(out)
    torch.manual_seed(seed)
    say("building a random sd-shape pipeline (Tiny-SD UNet, SD-1.x VAE, ViT-L/14 text)")
    unet = sd_shape_unet()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text = {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    }
    readme = (
        "# random sd-shape pipeline (bench/common.py)\n\nNOT A REAL MODEL: random weights "
        "with Segmind Tiny-SD's shapes, for timing only.\n"
    )
    write_random_pipeline(out, unet=unet, vae=vae, text_config=text, readme=readme)
    say(f"sd-shape pipeline written to {out}")
    return out


def component_parameters(model_path: Path) -> dict[str, int]:
    """Parameter counts of the UNet, VAE and text encoder (configs only, no weights)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(
            UNet2DConditionModel.load_config(str(model_path), subfolder="unet")
        )
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(model_path), subfolder="vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(str(model_path / "text_encoder")))
    return {
        name: sum(p.numel() for p in m.parameters())
        for name, m in (("unet", unet), ("vae", vae), ("text_encoder", text))
    }


# --------------------------------------------------------------------------- data


def synthetic_shards(
    out: Path,
    *,
    num_shards: int,
    images: int,
    resolution: int,
    partitioner: str = "iid",
    alpha: float = 0.5,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Path], dict[str, Any]]:
    """Write fedsd shards of the synthetic flower set; return shard dirs and manifest."""
    from fedsd.ml.data import write_shards

    manifest = write_shards(
        source="synthetic",
        num_shards=num_shards,
        partitioner=partitioner,
        alpha=alpha,
        val_fraction=val_fraction,
        seed=seed,
        out=out,
        image_size=resolution,
        synthetic_images=images,
    )
    return [out / s["name"] for s in manifest["shards"]], manifest


# --------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU seconds, reaped children's CPU seconds) from /proc, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    own = (int(fields[11]) + int(fields[12])) / tick
    children = (int(fields[13]) + int(fields[14])) / tick
    return int(fields[1]), own, children


def _pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between their users): the memory a
    process adds, without counting a launcher's copy-on-write pages once per fork."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def service_role(name: str) -> str:
    """A deployment service's role: its name without the index (``supernode-3`` ->
    ``supernode``, ``launcher-apps-2`` -> ``launcher-apps``)."""
    head, _, tail = name.rpartition("-")
    return head if head and tail.isdigit() else name


class ProcessMeter:
    """Samples the process trees of a running deployment (Linux ``/proc``) in a thread:
    peak PSS and CPU seconds per role (``service_role`` of each service; a process counts
    for the service it descends from, e.g. a ClientApp for its launcher).

    CPU of a root service includes its reaped children (a forked ClientApp that ended);
    ``cpu()`` is cumulative, so ``cpu()`` after minus before gives a phase's share.
    """

    def __init__(self, services: Any, interval: float = 1.0) -> None:
        self._services = services  # name -> object with .pid (LocalDeployment.services)
        self.interval = interval
        self.peak_pss: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Any = None

    def _trees(self) -> dict[str, list[tuple[int, int]]]:
        """Role -> (root pid, pid) of every process in its services' trees."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
                children.setdefault(st[0], []).append(int(entry))
        trees: dict[str, list[tuple[int, int]]] = {}
        for name, svc in list(self._services.items()):
            todo = [svc.pid]
            while todo:
                pid = todo.pop()
                trees.setdefault(service_role(name), []).append((svc.pid, pid))
                todo += children.get(pid, [])
        return trees

    def cpu(self) -> dict[str, float]:
        """CPU seconds per role so far: each root with its reaped children, plus its live
        descendants."""
        out: dict[str, float] = {}
        for role, pids in self._trees().items():
            for root, pid in pids:
                if (st := _proc_stat(pid)) is not None:
                    out[role] = out.get(role, 0.0) + st[1] + (st[2] if pid == root else 0.0)
        return out

    def sample(self) -> None:
        """One PSS sample: each role's processes summed; the peak per role kept."""
        for role, pids in self._trees().items():
            pss = sum(_pss_bytes(pid) for _, pid in pids)
            with self._lock:
                self.peak_pss[role] = max(self.peak_pss.get(role, 0), pss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ProcessMeter:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="process-meter", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------- federation


class InProcessGrid:
    """A Flower Grid in one process: each message goes straight to the ClientApp handler
    (``fedsd.client_app.train`` / ``evaluate`` / ``quality``) of its destination node,
    through the node-policy mod as a SuperNode runs it. The ServerApp's round loop runs
    unchanged on it; only the transport is missing. A node's error is raised, not turned
    into an error reply: an honest benchmark node must not fail."""

    def __init__(self, contexts: dict[int, Any]) -> None:
        self.contexts = contexts
        self.replies: list[Any] = []
        self.sent = 0  # messages handled: their ids

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Any) -> list[str]:
        """Handle every message at once; its reply waits for :meth:`pull_messages`."""
        from fedsd import client_app
        from fedsd.quality import MESSAGE_TYPE

        handlers = {
            "train": client_app.train,
            "evaluate": client_app.evaluate,
            MESSAGE_TYPE: client_app.quality,
        }
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{self.sent}"
            self.sent += 1
            ids.append(msg.metadata.message_id)
            handler = handlers[msg.metadata.message_type]
            context = self.contexts[msg.metadata.dst_node_id]
            self.replies.append(client_app.node_policy(msg, context, handler))
        return ids

    def pull_messages(self, ids: Any) -> list[Any]:
        wanted = set(ids)
        got = [r for r in self.replies if r.metadata.reply_to_message_id in wanted]
        self.replies = [r for r in self.replies if r.metadata.reply_to_message_id not in wanted]
        return got


def in_process_contexts(
    run_config: dict[str, Any],
    shards: list[Path],
    cache: Path,
    node_config: dict[str, Any] | None = None,
) -> dict[int, Any]:
    """Node id -> Flower ``Context`` of node i (shard i, a shared latent cache), as a
    SuperNode would build it, for :class:`InProcessGrid`. Also gives this process the
    Flower task identity that building a ``Message`` outside a real run needs."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, attr, 1)
    return {
        101 + i: Context(
            run_id=1,
            node_id=101 + i,
            node_config={
                "partition-id": i,
                "shard-dir": str(shard),
                "cache-dir": str(cache),
                **(node_config or {}),
            },
            state=RecordDict(),
            run_config=run_config,
        )
        for i, shard in enumerate(shards)
    }
