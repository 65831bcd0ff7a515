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

# Dense peaks (no sparsity): HBM / DRAM GB/s, INT8 tensor-core TOPS, FP16
# tensor-core TFLOPS with FP32 accumulation. "source" says where each figure
# comes from; a datasheet that prints only sparse figures is halved.
PEAKS = {
    "H100 SXM": {"hbm_gbps": 3350, "int8_tops": 1979, "fp16_tflops": 989, "source": "NVIDIA H100 datasheet"},
    "H100 PCIe": {"hbm_gbps": 2000, "int8_tops": 1513, "fp16_tflops": 756, "source": "NVIDIA H100 datasheet"},
    "H200": {"hbm_gbps": 4800, "int8_tops": 1979, "fp16_tflops": 989, "source": "NVIDIA H200 datasheet"},
    "H20": {"hbm_gbps": 4000, "int8_tops": 296, "fp16_tflops": 148,
            "source": "NVIDIA HGX H20 product brief, as reported (e.g. Tom's Hardware, Nov 2023): 96 GB HBM3, "
                      "4.0 TB/s, 296 INT8 TOPS, 148 FP16 TFLOPS"},
    "A100": {"hbm_gbps": 2039, "int8_tops": 624, "fp16_tflops": 312, "source": "NVIDIA A100 80GB SXM datasheet"},
    "B200": {"hbm_gbps": 8000, "int8_tops": 4500, "fp16_tflops": 2250,
             "source": "NVIDIA HGX B200 datasheet, per GPU (its 8-GPU sparse figures / 8 / 2); SKUs with other "
                       "power limits differ"},
    "L40S": {"hbm_gbps": 864, "int8_tops": 733, "fp16_tflops": 362,
             "source": "NVIDIA L40S datasheet (733 INT8 TOPS, 362.05 FP16 TFLOPS dense; GDDR6 864 GB/s)"},
    "L4": {"hbm_gbps": 300, "int8_tops": 242, "fp16_tflops": 121,
           "source": "NVIDIA L4 datasheet (485 INT8 TOPS, 242 FP16 TFLOPS with sparsity, halved; GDDR6 300 GB/s)"},
    "RTX 4090": {"hbm_gbps": 1008, "int8_tops": 660, "fp16_tflops": 165,
                 "source": "NVIDIA Ada Lovelace architecture whitepaper, appendix: 660.6 INT8 TOPS, 165.2 FP16 "
                           "TFLOPS with FP32 accumulate (GeForce rate), GDDR6X 1008 GB/s"},
    "RTX 4070": {"hbm_gbps": 504, "int8_tops": 233, "fp16_tflops": 117, "source": "NVIDIA Ada whitepaper / RTX 4070 "
                 "specifications"},
}


def device_peaks(device: str, name: str | None = None):
    """The PEAKS entry of the current CUDA device (or of a device name), or None.

    A key matches as a whole word ("L4" is not "L40S", "H20" is not "H200").
    """
    if device != "cuda":
        return None
    import re

    name = name if name is not None else torch.cuda.get_device_name()
    if re.search(r"\bH100\b", name):
        return PEAKS["H100 PCIe" if "PCIe" in name else "H100 SXM"]
    for key, peaks in PEAKS.items():
        if key.startswith("H100"):
            continue
        if re.search(r"\b" + re.escape(key) + r"\b", name):
            return peaks
    return None


def explain_quant_gemm(info: dict):
    """What a quant_gemm benchmark ran (qsvd_kernels.explain), when its info
    names M, N, K and the bits; None otherwise or without a GPU."""
    if not torch.cuda.is_available() or not all(k in info for k in ("M", "N", "K", "a_bits", "b_bits")):
        return None
    try:
        import qsvd_kernels as qk

        d = qk.explain("quant_gemm", M=info["M"], N=info["N"], K=info["K"], a_bits=info["a_bits"],
                       b_bits=info["b_bits"])
    except Exception as e:  # noqa: BLE001 - a benchmark must not fail on its record
        return {"error": str(e)[:200]}
    return {k: d[k] for k in ("config", "streamk_mode", "splits", "raster", "source", "table")}


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
    if device == "cuda" and info.get("impl", "qsvd") == "qsvd":
        ran = explain_quant_gemm(info)
        if ran is not None:
            extra["explain"] = ran
    benchmark.extra_info.update(extra)
