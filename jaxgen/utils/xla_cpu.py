"""XLA:CPU compiler flags jaxgen sets for itself at import (before jax creates its CPU client).

`--xla_cpu_enable_concurrency_optimized_scheduler=false`: XLA:CPU's default scheduler orders a program for
parallelism at the cost of keeping many buffers alive at once. On the 2-core VM the memory-ordered schedule is
both smaller and faster: RAR-B's random init needs 12 KB of temporaries instead of 936 MB (peak RSS 2.37 -> 1.38
GB), and its f32 train step at batch 4 took 10.9 s instead of 12.7 s with 7.7 instead of 9.7 GB peak RSS
(docs/benchmarks.md). It only changes the order of operations, not their arithmetic.
Opt out with JAXGEN_XLA_CPU_SCHEDULER=default.

`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`, on Intel CPUs only: convolutions through XLA's own
(Eigen) kernels instead of YNNPACK's. On the 2-core Intel Xeon (Sapphire Rapids) VM of 2026-12-04 the VQVAE decoder
of VAR-d16 (batch 2, 256 px, 701 GFLOP) took 3.30-3.43 s instead of 4.10-4.15 s, and VAR-d16 sampling 10.6 s instead
of 11.5 s; the AMD EPYC VMs of earlier days ran YNNPACK's convolutions near that CPU's peak, so they keep them.
Same convolution, another kernel: results agree to float32 rounding. Opt out with JAXGEN_XLA_CPU_CONV=default.

Nothing is set when XLA_FLAGS already names a flag.
"""
from __future__ import annotations

import os
import platform

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler"
OPT_OUT = "JAXGEN_XLA_CPU_SCHEDULER"
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CONV_OPT_OUT = "JAXGEN_XLA_CPU_CONV"


def _add(flag: str, value: str, opt_out: str) -> bool:
    flags = os.environ.get("XLA_FLAGS", "")
    if os.environ.get(opt_out, "") == "default" or flag in flags:
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {flag}={value}".strip()
    return True


def memory_ordered_scheduler() -> bool:
    """Append the scheduler flag above to XLA_FLAGS; True when this call added it."""
    return _add(SCHEDULER_FLAG, "false", OPT_OUT)


def intel_cpu() -> bool:
    """Whether this is an x86-64 Intel CPU (/proc/cpuinfo's vendor_id; False where that cannot be read)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in f)
    except OSError:
        return False


def eigen_convolutions() -> bool:
    """On Intel CPUs, append the convolution flag above to XLA_FLAGS; True when this call added it."""
    return intel_cpu() and _add(YNN_FLAG, "-individual_convolution", CONV_OPT_OUT)


def apply_defaults() -> None:
    memory_ordered_scheduler()
    eigen_convolutions()
