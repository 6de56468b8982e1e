"""Cost of one DP-SGD step (Opacus) relative to one plain LoRA step, per grad_sample_mode.

What it measures
----------------
One training step of the UNet's LoRA adapter on a fixed random batch, timed two ways side
by side in one process:

* ``plain`` -- what ``fedsd.ml.training.train_lora`` does per step: ``zero_grad``, forward
  through ``fedsd.ml.training.denoising_loss`` (noise the latents at a random timestep,
  predict, MSE to the epsilon target; bf16 autocast on CUDA, fp32 on CPU), ``backward``,
  ``AdamW.step`` over the trainable (LoRA) parameters.
* one DP-SGD step per Opacus ``grad_sample_mode`` (``--modes``): the same UNet, LoRA and
  AdamW passed through ``opacus.PrivacyEngine().make_private(module=..., optimizer=...,
  data_loader=DataLoader(TensorDataset(arange(16 * B)), batch_size=B),
  noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
  grad_sample_mode=mode)``, then the same ``zero_grad`` / forward / ``backward`` /
  ``step``. The step therefore includes the per-sample gradients (or, for ``ghost``, the
  per-sample gradient norms and the second backward pass), flat clipping, the Gaussian
  noise and the AdamW update. The modes:

  - ``hooks``: module hooks capture activations and backprops of every trainable layer
    (here the LoRA ``nn.Linear`` A/B matrices) and form per-sample gradients with einsum.
  - ``ew``: PyTorch's ExpandedWeights (``call_for_per_sample_grads``) on the whole UNet.
    Under bf16 autocast (fedsd's CUDA path) it failed in a CPU emulation with the tiny model
    (``expected m1 and m2 to have the same dtype``: its linear does not cast to the autocast
    dtype); on CUDA expect it in ``failed_modes``.
  - ``functorch``: the same hooks, but each layer's per-sample gradient comes from
    ``torch.func`` (``vmap(grad(...))``) instead of the hand-written einsum.
  - ``ghost``: fast gradient clipping with ghost norms: a first backward pass computes
    only the per-sample gradient *norms* (for a linear layer from the Gram matrices of
    activations and backprops, no per-sample gradient is materialised), then a second
    backward pass on the loss reweighted by the clipping coefficients. It needs the loss
    per sample, so the step calls the criterion ``make_private(..., criterion=...)``
    returns, whose wrapped criterion is ``denoising_loss(..., per_sample=True)`` (the same
    loss), and ``loss.backward()`` runs both passes.

Every configuration (plain and each mode) gets its own copy of one randomly initialised
base UNet (the frozen base weights are shared, not copied, to save memory; only LoRA
trains) with a fresh LoRA from ``fedsd.ml.model.add_lora`` (rank 8, alpha 8, targets
to_q,to_k,to_v,to_out.0; same seed, so every copy starts from the same adapter), its own
AdamW (lr 1e-4, weight decay 1e-2, as ``train_lora``) and its own ``PrivacyEngine``, so
Opacus' wrapping and hooks of one mode cannot affect another. Latents ``(B, 4, r/8, r/8)``,
noise, timesteps and text conditioning ``(B, 77, cross_attention_dim)`` are random and the
same batch is used for every step of every configuration.

Schedule: ``--warmup`` untimed steps of each configuration right after it is built; then
``--repeats`` rounds in each of which every mode is measured next to a block of plain steps
(``--steps`` timed steps each), alternating which of the two goes first, so every DP timing
has a plain timing taken seconds apart. A mode that fails (in ``make_private``, the warm-up
or a timed step) is reported with its error and skipped from then on; the others go on.

How to read the JSON
--------------------
* ``plain.seconds_per_step_median``: median wall seconds of one plain step over all plain
  blocks; ``seconds_per_step_best`` the fastest one (other load only ever slows a step
  down, so on a shared machine the best is the least disturbed estimate);
  ``seconds_per_step_each``: every timed plain step, in order. On CPU also
  ``cpu_seconds_per_step_median`` / ``cpu_seconds_per_step_each``: this process's CPU time
  per step (``time.process_time``). With one thread this hardly depends on how many other
  processes want the cores (it still does somewhat through shared caches and memory
  bandwidth), so it is the steadiest measure on a busy machine.
* ``modes.<mode>.seconds_per_step_*`` / ``cpu_seconds_per_step_*``: the same for the DP
  step of that mode.
* ``modes.<mode>.ratio``: median over repeats of (median DP step of the block / median
  plain step of the plain block next to it): how many plain steps one DP step costs, in
  wall time. ``ratio_each`` lists the per-repeat ratios (if they disagree a lot, or any is
  below 1, the machine was busy); ``ratio_of_medians`` is ``seconds_per_step_median`` /
  ``plain.seconds_per_step_median``; ``ratio_best`` is ``seconds_per_step_best`` /
  ``plain.seconds_per_step_best``. On CPU, ``ratio_cpu_time`` (and ``ratio_cpu_time_each``)
  is the paired ratio computed from CPU seconds instead of wall seconds.
* ``modes.<mode>.make_private_seconds``: the one-time ``make_private`` wrapping cost.
* ``modes.<mode>.loss_last`` / ``plain.loss_last``: the loss of the last timed step (a
  sanity check that the step ran and stayed finite; random weights, so the value means
  nothing else).
* ``modes.<mode>.peak_rss_bytes`` (CPU, Linux): the process's peak resident memory while
  that configuration's steps ran (the kernel's high-water mark is reset before each block
  via ``/proc/self/clear_refs``). It includes everything resident: the shared frozen UNet,
  every configuration built so far and the allocator's cached memory, so compare the
  values *between* configurations (the difference is what the mode's step adds), not
  against zero. ``peak_cuda_allocated_bytes`` (CUDA): ``torch.cuda.max_memory_allocated``
  over the configuration's steps, reset before each block; same caveat (all models share
  the device).
* ``modes.<mode>.error``: present (and the timing fields absent) when the mode failed:
  ``ExceptionType: message`` and ``failed_in`` (make_private, warmup or step).
* ``recommended_mode``: the successful mode with the lowest ``ratio_cpu_time`` on CPU (the
  measure least disturbed by other load), the lowest ``ratio`` on CUDA. A measurement, not a
  policy: it can differ by device, resolution and batch size. ``rankings`` lists the
  successful modes from cheapest to dearest by each of ``ratio``, ``ratio_best`` and (CPU)
  ``ratio_cpu_time``: if they disagree, the difference is within the noise of this run.
* ``failed_modes``: the modes that failed (see ``error``).
* ``load_average_before_after``: 1-minute load average before and after the timed part; above
  the number of cores other processes competed for the CPU (rerun on a quiet machine or
  raise ``--repeats``). ``load_average_start``: the full ``/proc/loadavg`` triple at start.
* ``unet_parameters`` (checked against Tiny-SD's 323,384,964 for ``sd-shape``),
  ``lora_parameters`` (the trainable ones), ``tokens_top_level``: (r/8)^2, the sequence
  length of the highest-resolution attention blocks (see below), ``setup_seconds``
  (building the base UNet; the plain copy and its warm-up), ``timed_seconds`` (the timed
  part, all modes and repeats).

Reading the ratios across resolutions
-------------------------------------
The per-sample work of ``hooks``/``functorch``/``ew`` grows like tokens x LoRA size, but the
ghost norm of a linear layer applied to a sequence builds per-sample T x T Gram matrices
(T = tokens: 64 at 64 px, 4096 at 512 px in the top blocks), i.e. grows like T^2. The mode
ranking at the CPU default of 64 px therefore need not hold at 512 px; measure where you
train (``--device cuda --resolution 512``). The plain step's cost grows with the pixel count
too, so the ratios are resolution-specific in any case.

Models (``--model``): ``sd-shape`` (default) builds the Segmind Tiny-SD / BK-SDM-Tiny UNet
shape in memory with random weights (the same config as ``common.write_sd_shape_pipeline``,
parameter count checked; no VAE or text encoder is needed, so nothing is written to disk);
``tiny`` writes ``fedsd.ml.model.write_tiny_pipeline`` to a temporary directory (a toy, for a
smoke run; its ratios say nothing about a real model); a directory is any diffusers SD-1.x
pipeline, of which only the UNet is loaded (``fedsd.ml.model.load_unet``).

Usage::

    python bench/dp_modes.py                                  # sd-shape, 64 px, 1 thread
    python bench/dp_modes.py --model tiny --steps 1 --repeats 1   # smoke run, seconds
    python bench/dp_modes.py --device cuda --resolution 512 --batch-size 4
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import (
    MODEL_KINDS,
    emit,
    environment,
    round_floats,
    say,
    set_threads,
    timed,
)
from common import (
    sd_shape_unet as _sd_shape_unet,
)

ALL_MODES = ("hooks", "ew", "functorch", "ghost")
NOISE_MULTIPLIER = 1.0
MAX_GRAD_NORM = 1.0
TEXT_TOKENS = 77


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="sd-shape",
        help=f"one of {', '.join(MODEL_KINDS)} (random weights) or a diffusers SD-1.x "
        "directory (default: sd-shape)",
    )
    p.add_argument(
        "--resolution", type=int, default=64, help="pixel resolution, latents r/8 (default: 64)"
    )
    p.add_argument("--batch-size", type=int, default=4, help="samples per step (default: 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per block (default: 3)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rounds of (plain block, DP block) per mode, alternating which goes first "
        "(default: 2)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="untimed steps of each configuration after it is built (default: 1)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=ALL_MODES,
        default=list(ALL_MODES),
        help=f"Opacus grad_sample_modes to measure (default: {' '.join(ALL_MODES)})",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads (0: torch default, all cores). 1 by default: on a CPU "
        "that other processes share, more threads make timings swing by 3x or more "
        "(default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="model, LoRA and batch seed (default: 0)")
    args = p.parse_args(argv)
    if args.resolution % 8 or args.resolution <= 0:
        p.error("--resolution must be a positive multiple of 8")
    if min(args.batch_size, args.steps, args.repeats) < 1 or args.warmup < 0:
        p.error("--batch-size, --steps and --repeats must be >= 1, --warmup >= 0")
    return args


# --------------------------------------------------------------------------- model


def sd_shape_unet(seed: int) -> Any:
    """The Segmind Tiny-SD UNet shape, random weights, in memory (parameter count checked)."""
    import torch

    torch.manual_seed(seed)
    return _sd_shape_unet().requires_grad_(False)


def build_base_unet(model: str, work: Path, seed: int) -> tuple[Any, str]:
    """The frozen base UNet (no LoRA) for ``--model``, and its kind."""
    from fedsd.ml.model import load_unet, resolve_model, write_tiny_pipeline

    if model == "sd-shape":
        return sd_shape_unet(seed), "sd-shape"
    if model == "tiny":
        return load_unet(str(write_tiny_pipeline(work / "tiny-model", seed=seed))), "tiny"
    return load_unet(resolve_model(model)), "directory"


def lora_copy(base: Any, cfg: Any, device: Any) -> Any:
    """A copy of ``base`` sharing its frozen weights, with a fresh LoRA from fedsd."""
    from fedsd.ml.model import add_lora

    shared = {id(t): t for t in (*base.parameters(), *base.buffers())}
    unet = add_lora(copy.deepcopy(base, memo=shared), cfg)
    return unet.to(device).train()


# --------------------------------------------------------------------------- memory


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
    except OSError:
        pass


def _peak(device: Any) -> tuple[str, int | None]:
    import torch

    if device.type == "cuda":
        return "peak_cuda_allocated_bytes", int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return "peak_rss_bytes", int(line.split()[1]) * 1024
    except OSError:
        pass
    return "peak_rss_bytes", None


# --------------------------------------------------------------------------- steps


class DenoisingCriterion:
    """``denoising_loss`` as a criterion with a ``reduction`` attribute, for ghost clipping.

    Opacus' ``DPLossFastGradientClipping`` sets ``reduction = "none"`` around the call and
    expects one loss per sample; the forward pass runs inside the call.
    """

    def __init__(self, reduction: str = "mean") -> None:
        self.reduction = reduction

    def __call__(self, unet, scheduler, latents, noise, t, cond, device):
        from fedsd.ml.training import denoising_loss

        per = denoising_loss(unet, scheduler, latents, noise, t, cond, device, per_sample=True)
        if self.reduction == "none":
            return per
        return per.mean() if self.reduction == "mean" else per.sum()


class Config:
    """One measured configuration: a model, its optimizer and its step function."""

    def __init__(self, name: str, step: Callable[[], float], device: Any) -> None:
        self.name = name
        self._step = step
        self.device = device
        self.blocks: list[list[float]] = []  # wall seconds per step, one list per block
        self.cpu_blocks: list[list[float]] = []  # this process's CPU seconds per step
        self.peak: int | None = None
        self.peak_key = "peak_rss_bytes"
        self.loss_last: float | None = None

    def warmup(self, n: int) -> None:
        for _ in range(n):
            self.loss_last = self._step()
        self._sync()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self, steps: int) -> tuple[float, float]:
        """Run ``steps`` timed steps; return the block's median wall and CPU seconds."""
        import time

        _reset_peak(self.device)
        self._sync()
        wall, cpu = [], []
        for _ in range(steps):
            start, start_cpu = time.perf_counter(), time.process_time()
            self.loss_last = self._step()
            self._sync()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        self.peak_key, peak = _peak(self.device)
        if peak is not None:
            self.peak = max(peak, self.peak or 0)
        self.blocks.append(wall)
        self.cpu_blocks.append(cpu)
        return statistics.median(wall), statistics.median(cpu)

    def summary(self) -> dict[str, Any]:
        each = [s for b in self.blocks for s in b]
        out: dict[str, Any] = {
            "seconds_per_step_median": statistics.median(each),
            "seconds_per_step_best": min(each),
            "seconds_per_step_each": each,
        }
        if self.device.type == "cpu":
            cpu_each = [s for b in self.cpu_blocks for s in b]
            out["cpu_seconds_per_step_median"] = statistics.median(cpu_each)
            out["cpu_seconds_per_step_each"] = cpu_each
        out["loss_last"] = self.loss_last
        out[self.peak_key] = self.peak
        return out


def make_step(model, optimizer, scheduler, batch, device, criterion=None) -> Callable[[], float]:
    """One training step: zero_grad, forward (denoising loss), backward, optimizer step."""
    from fedsd.ml.training import denoising_loss

    latents, noise, t, cond = batch

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        if criterion is None:
            loss = denoising_loss(model, scheduler, latents, noise, t, cond, device)
        else:  # ghost: a DPTensorFastGradientClipping whose backward() runs both passes
            loss = criterion(model, scheduler, latents, noise, t, cond, device)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def _error(exc: BaseException) -> str:
    msg = f"{type(exc).__name__}: {exc}".strip()
    return msg if len(msg) <= 600 else msg[:600] + " ..."


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads > 0:  # before torch is imported: OpenMP sizes its pool at start-up
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["MKL_NUM_THREADS"] = str(args.threads)
    set_threads(args.threads)

    import warnings

    import torch
    from diffusers import DDPMScheduler
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fedsd.config import RunConfig
    from fedsd.ml.training import pick_device

    warnings.filterwarnings("ignore", module="opacus")  # secure-RNG and accountant notices
    # hooks on the first LoRA layers, whose inputs need no grad: harmless, once per mode
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    load_start = Path("/proc/loadavg").read_text().split()[:3] if os.name == "posix" else None
    device = pick_device(args.device)
    cfg = RunConfig.from_mapping(
        {
            "lora-rank": 8,
            "lora-alpha": 8,
            "lora-targets": "to_q,to_k,to_v,to_out.0",
            "batch-size": args.batch_size,
            "resolution": args.resolution,
            "learning-rate": 1e-4,
            "seed": args.seed,
        }
    )
    scheduler = DDPMScheduler()

    with tempfile.TemporaryDirectory(prefix="fedsd-bench-dp-") as tmp:
        say(f"building the {args.model} UNet")
        with timed() as t_build:
            base, kind = build_base_unet(args.model, Path(tmp), args.seed)
        base.to(device)
        n_unet = sum(p.numel() for p in base.parameters())
        cross_dim = base.config.cross_attention_dim
        in_ch = base.config.in_channels

        b, side = args.batch_size, args.resolution // 8
        gen = torch.Generator().manual_seed(args.seed + 1)
        batch = (
            torch.randn(b, in_ch, side, side, generator=gen).to(device),
            torch.randn(b, in_ch, side, side, generator=gen).to(device),
            torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen).to(device),
            torch.randn(b, TEXT_TOKENS, cross_dim, generator=gen).to(device),
        )

        def adamw(unet: Any) -> Any:
            params = [p for p in unet.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)

        say("plain: LoRA copy + warm-up")
        with timed() as t_plain:
            plain_unet = lora_copy(base, cfg, device)
            n_lora = sum(p.numel() for p in plain_unet.parameters() if p.requires_grad)
            plain = Config(
                "plain", make_step(plain_unet, adamw(plain_unet), scheduler, batch, device), device
            )
            plain.warmup(args.warmup)

        modes: dict[str, Config] = {}
        failed: dict[str, dict[str, Any]] = {}
        make_private_s: dict[str, float] = {}
        for mode in args.modes:
            stage = "make_private"
            try:
                say(f"{mode}: LoRA copy + make_private + warm-up")
                unet = lora_copy(base, cfg, device)
                optimizer = adamw(unet)
                loader = DataLoader(
                    TensorDataset(torch.arange(16 * args.batch_size)), batch_size=args.batch_size
                )
                engine = PrivacyEngine()
                kwargs: dict[str, Any] = {}
                if mode == "ghost":
                    kwargs["criterion"] = DenoisingCriterion()
                torch.manual_seed(args.seed + 2)
                with timed() as t_mp:
                    out = engine.make_private(
                        module=unet,
                        optimizer=optimizer,
                        data_loader=loader,
                        noise_multiplier=NOISE_MULTIPLIER,
                        max_grad_norm=MAX_GRAD_NORM,
                        poisson_sampling=False,
                        grad_sample_mode=mode,
                        **kwargs,
                    )
                make_private_s[mode] = t_mp["s"]
                criterion = out[2] if mode == "ghost" else None
                conf = Config(
                    mode, make_step(out[0], out[1], scheduler, batch, device, criterion), device
                )
                stage = "warmup"
                conf.warmup(args.warmup)
                modes[mode] = conf
            except Exception as exc:  # a failing mode must not stop the others
                failed[mode] = {"error": _error(exc), "failed_in": stage}
                say(f"{mode}: FAILED in {stage}: {_error(exc)}")

        # per mode and repeat: (DP wall, plain wall, DP CPU, plain CPU), block medians
        pairs: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in modes}
        load_before = os.getloadavg()
        with timed() as t_timed:
            for rep in range(args.repeats):
                for i, mode in enumerate(list(modes)):
                    conf = modes[mode]
                    dp_first = (rep + i) % 2 == 1
                    say(
                        f"repeat {rep + 1}/{args.repeats}, {mode}: "
                        f"{'DP then plain' if dp_first else 'plain then DP'}, {args.steps} steps"
                    )
                    try:
                        if dp_first:
                            dp_t = conf.block(args.steps)
                            pl_t = plain.block(args.steps)
                        else:
                            pl_t = plain.block(args.steps)
                            dp_t = conf.block(args.steps)
                    except Exception as exc:
                        failed[mode] = {"error": _error(exc), "failed_in": "step"}
                        say(f"{mode}: FAILED in a timed step: {_error(exc)}")
                        del modes[mode], pairs[mode]
                        continue
                    pairs[mode].append((dp_t[0], pl_t[0], dp_t[1], pl_t[1]))
                    say(
                        f"  {mode} {dp_t[0]:.3f} s/step ({dp_t[1]:.3f} s CPU), "
                        f"plain {pl_t[0]:.3f} s/step ({pl_t[1]:.3f} s CPU)"
                    )
        load_after = os.getloadavg()

    on_cpu = device.type == "cpu"
    plain_sum = plain.summary() if plain.blocks else {}
    results: dict[str, Any] = {}
    for mode in args.modes:
        if mode in failed:
            results[mode] = failed[mode]
            continue
        summ = modes[mode].summary()
        ratios = [p[0] / p[1] for p in pairs[mode]]
        res: dict[str, Any] = {
            "ratio": statistics.median(ratios),
            "ratio_each": ratios,
            "ratio_of_medians": summ["seconds_per_step_median"]
            / plain_sum["seconds_per_step_median"],
            "ratio_best": summ["seconds_per_step_best"] / plain_sum["seconds_per_step_best"],
        }
        if on_cpu:
            cpu_ratios = [p[2] / p[3] for p in pairs[mode]]
            res["ratio_cpu_time"] = statistics.median(cpu_ratios)
            res["ratio_cpu_time_each"] = cpu_ratios
        results[mode] = {**res, **summ, "make_private_seconds": make_private_s[mode]}
    ranking_keys = ("ratio", "ratio_best", "ratio_cpu_time") if on_cpu else ("ratio", "ratio_best")
    rankings = {
        key: sorted((m for m, r in results.items() if key in r), key=lambda m: results[m][key])
        for key in ranking_keys
    }
    decisive = rankings["ratio_cpu_time" if on_cpu else "ratio"]

    result = {
        "benchmark": "dp_modes",
        "model": kind if kind != "directory" else args.model,
        **environment(str(device)),
        "load_average_start": [float(x) for x in load_start] if load_start else None,
        "load_average_before_after": [load_before[0], load_after[0]],
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "noise_multiplier": NOISE_MULTIPLIER,
        "max_grad_norm": MAX_GRAD_NORM,
        "lora": {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.lora_targets},
        "unet_parameters": n_unet,
        "lora_parameters": n_lora,
        "tokens_top_level": side * side,
        "plain": plain_sum,
        "modes": results,
        "recommended_mode": decisive[0] if decisive else None,
        "rankings": rankings,
        "failed_modes": sorted(failed),
        "setup_seconds": {"build_unet": t_build["s"], "plain_copy_and_warmup": t_plain["s"]},
        "timed_seconds": t_timed["s"],
    }
    return round_floats(result, 4)


if __name__ == "__main__":
    out = main()
    emit(out)
