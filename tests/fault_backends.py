"""A fault-injection backend for the hardening tests: no model, black frames, faults on demand.

Loaded through the backend plugin setting (`I2V_EXTRA_BACKENDS=fault_backends:FaultInjection`), so it
never ships in the product's registry. The prompt picks the behaviour, which lets one server exercise
every fault:

- `fault:oom`        raises torch's CUDA out-of-memory error at the first denoising step (a CPU box has no
                     GPU to fill; this is the exact exception type the pipeline would raise)
- `fault:disk-full`  returns its frames with the process's file-size limit (RLIMIT_FSIZE) set to a few KB, so
                     writing the mp4 fails part-way with EFBIG, as a full disk fails with ENOSPC
- `fault:slow`       takes about 0.2 s per step for 20 steps (long enough to kill or cancel it mid-run);
                     `fault:slow:N` for N steps (a run that lasts until the test cancels it)
- `fault:hold=PATH`  runs its first step, then waits until the file PATH exists (the test's event, not a
                     timer: the prediction stays `processing` exactly as long as the test needs)
- `fault:tally=PATH`  appends a line "<worker pid> <prompt>" to PATH as it starts (then goes on with the rest
                     of the prompt): how many times each prediction ran, and where, counted at the workers
- anything else      returns black frames at once: the service is under test, not the model
"""

from __future__ import annotations

import os
import re
import resource
import signal
import time
from pathlib import Path

import numpy as np
import torch

from i2v.backends.base import Backend, BackendSpec, Clip, ModelInputs, StepCallback
from i2v.geometry import Grid

DISK_FULL_BYTES = 4096


class FaultInjection(Backend):
    spec = BackendSpec(
        name="fault-injection",
        source="none",
        fps=24,
        grid=Grid(max_area=64 * 64, multiple=16),
        frame_multiple=4,
        takes_end_frame=True,
        steps=2,
        guidance=1.0,
        shift=None,
        modes=("standard", "pro"),
    )
    tiny_grid = spec.grid

    def load(self) -> None:
        self._fsize = resource.getrlimit(resource.RLIMIT_FSIZE)

    def generate(self, inputs: ModelInputs, on_step: StepCallback) -> Clip:
        resource.setrlimit(resource.RLIMIT_FSIZE, self._fsize)  # undo an earlier disk-full fault
        prompt = inputs.prompt
        if "fault:tally=" in prompt:
            tally = prompt.split("fault:tally=", 1)[1].split()[0]
            fd = os.open(tally, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, f"{os.getpid()} {prompt}\n".encode())  # one write: whole lines under O_APPEND
            finally:
                os.close(fd)
        if "fault:hold=" in prompt:
            release = Path(prompt.split("fault:hold=", 1)[1].split()[0])
            on_step(1, self.spec.steps)
            while not release.exists():
                time.sleep(0.02)
        slow = re.search(r"fault:slow(?::(\d+))?", prompt)
        steps = int(slow.group(1) or 20) if slow else self.spec.steps
        for step in range(1, steps + 1):
            if "fault:oom" in prompt:
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 18.00 GiB (fault injected by the test backend)"
                )
            if "fault:slow" in prompt:
                time.sleep(0.2)
            on_step(step, steps)
        if "fault:disk-full" in prompt:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
            resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FULL_BYTES, self._fsize[1]))
            noise = np.random.default_rng(0).integers(
                0, 256, (inputs.model_frames, inputs.height, inputs.width, 3)
            )
            return Clip(frames=noise.astype(np.uint8), fps=self.spec.fps)  # noise: a file far over the limit
        frames = np.zeros((inputs.model_frames, inputs.height, inputs.width, 3), dtype=np.uint8)
        return Clip(frames=frames, fps=self.spec.fps)

    @classmethod
    def build_tiny(cls, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model_index.json").write_text("{}")
