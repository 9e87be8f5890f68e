"""Run metrics, as the img2img pipelines this project grew from kept them: a run id, total and per-image seconds,
peak RAM and (on CUDA) peak GPU memory, appended to a JSONL log."""

import json
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

SAMPLER_THREAD = "sdtune-peak-rss"  # the memory sampler's thread name, so a leaked one can be found


class PeakRss:
    """Samples this process's resident memory in a background thread and keeps the peak."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak = interval, psutil.Process().memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name=SAMPLER_THREAD, daemon=True)

    def _sample(self):
        process = psutil.Process()
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, process.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, psutil.Process().memory_info().rss)


class RunRecorder:
    """Times one run (a request or a batch) and its images, used as `with RunRecorder(...) as recorder:`;
    `finish` writes and returns the record. Leaving the block stops the memory sampler, whether the run finished,
    failed or was stopped."""

    def __init__(self, kind: str, log_path, device: torch.device):
        self.kind, self.log_path, self.device = kind, Path(log_path), device
        self.run_id = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        self.image_seconds: list[float] = []
        self.failed = 0
        self._start = time.perf_counter()
        self._rss = PeakRss()

    def __enter__(self):
        self._rss.__enter__()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self._rss.__exit__(*exc)

    def image_done(self, seconds: float, failed: bool = False) -> None:
        self.image_seconds.append(seconds)
        self.failed += failed

    def finish(self, **extra) -> dict:
        peak_rss = max(self._rss.peak, psutil.Process().memory_info().rss)
        total = time.perf_counter() - self._start
        record = {
            "run_id": self.run_id, "kind": self.kind, "finished": datetime.now(timezone.utc).isoformat(),
            "images": len(self.image_seconds), "failed": self.failed, "total_seconds": round(total, 3),
            "seconds_per_image": [round(s, 3) for s in self.image_seconds],
            "mean_seconds_per_image": round(sum(self.image_seconds) / len(self.image_seconds), 3)
            if self.image_seconds else None,
            "peak_ram_mib": round(peak_rss / 2**20, 1),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
            if self.device.type == "cuda" else None,
            **extra,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(json.dumps(record) + "\n")
        return record
