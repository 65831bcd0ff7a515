"""Benchmark plumbing: devices, timing and the roofline report.

Every benchmark records, in pytest-benchmark's extra_info:
  bytes / flops   the model of what the op must move and compute (written
                  next to each benchmark), so readers can check the roofline;
  gbps, tops      achieved, from the median time;
  peak_*_frac     as a fraction of the device's peak (PEAKS; None when the
                  device is not in the table, e.g. a CPU).
Baselines run in the same session, so ratios compare like with like.
"""

from __future__ import annotations

import pytest
import torch

# Dense peaks (no sparsity) from the vendors' datasheets: HBM GB/s, INT8
# tensor-core TOPS, FP16 tensor-core TFLOPS.
PEAKS = {
    "H100 SXM": {"hbm_gbps": 3350, "int8_tops": 1979, "fp16_tflops": 989},
    "H100 PCIe": {"hbm_gbps": 2000, "int8_tops": 1513, "fp16_tflops": 756},
    "H200": {"hbm_gbps": 4800, "int8_tops": 1979, "fp16_tflops": 989},
    "A100": {"hbm_gbps": 2039, "int8_tops": 624, "fp16_tflops": 312},
    "RTX 4070": {"hbm_gbps": 504, "int8_tops": 233, "fp16_tflops": 117},
}


def device_peaks(device: str):
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    if "H100" in name:
        return PEAKS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    for key, peaks in PEAKS.items():
        if key.split()[0] in name:
            return peaks
    return None


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_benchmark(benchmark, device, fn, *, bytes_moved=0, flops=0, rounds=20, **info):
    """Time fn (warm-up excluded), then record the roofline numbers."""
    for _ in range(3):
        fn()
    sync(device)

    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=1)
    t = benchmark.stats.stats.median
    peaks = device_peaks(device)
    extra = {"device": device if device == "cpu" else torch.cuda.get_device_name(), "bytes": bytes_moved,
             "flops": flops, "median_s": t, "gbps": bytes_moved / t / 1e9 if t else None,
             "tops": flops / t / 1e12 if t else None}
    if peaks:
        extra["peak_hbm_frac"] = extra["gbps"] / peaks["hbm_gbps"]
        if flops:
            extra["peak_int8_frac"] = extra["tops"] / peaks["int8_tops"]
    extra.update(info)
    benchmark.extra_info.update(extra)
