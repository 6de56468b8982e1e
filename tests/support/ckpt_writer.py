"""A checkpoint writer for tests/unit/fl/test_checkpoint.py to SIGKILL:
``python ckpt_writer.py OUT``.

It imports everything once (peft takes tens of seconds on a loaded machine), prints
``ready``, then for each ``go`` line on stdin forks a writer that opens OUT as a restarted
ServerApp would and saves rounds ``completed+1, completed+2, ...`` with ``expected(n)``,
printing ``saved <n>`` after each; it prints ``pid <pid>`` for the test to kill, and
``dead <status>`` once the writer is gone.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from fedsd.config import RunConfig
from fedsd.fl.checkpoint import RunDir
from fedsd.ml.model import lora_config


def expected(n: int) -> dict[str, np.ndarray]:
    """Round n's adapter: distinct per round, big enough (512 KiB) that a write takes time."""
    base = np.arange(256 * 256, dtype=np.float32).reshape(256, 256)
    return {
        "down.lora_A.weight": base + n,
        "down.lora_B.weight": np.full((256, 256), float(n), dtype=np.float32),
    }


def config(out: str) -> RunConfig:
    return RunConfig.from_mapping({"out-dir": out})


def _write_forever(out: str) -> None:
    rd = RunDir.open(config(out))
    n = rd.completed_rounds
    while True:
        n += 1
        rd.save_round(n, expected(n), {"round": n, "train_loss": 1.0 / n})
        os.write(1, f"saved {n}\n".encode())


def main(out: str) -> None:
    lora_config(config(out))  # import peft before forking
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            continue
        pid = os.fork()
        if pid == 0:  # the writer
            try:
                _write_forever(out)
            finally:
                os._exit(1)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"dead {status}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
