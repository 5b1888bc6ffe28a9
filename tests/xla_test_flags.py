"""XLA flags every test process compiles with (pytest itself and the jaxgen processes the tests start)."""
from __future__ import annotations

import os

# LLVM's optimisation passes are most of XLA:CPU's compile time for the suite's tiny programs, and they change
# how fast the code runs, not what it computes (no fast-math reassociation either way).
FAST_COMPILE = "--xla_backend_optimization_level=0"
OPT_OUT = "JAXGEN_TEST_XLA_OPT"  # =default: compile the tests with XLA's default pipeline


def with_test_xla_flags(flags: str) -> str:
    """`flags` plus the suite's compile flags (unless opted out or the caller already chose an optimisation level)."""
    if os.environ.get(OPT_OUT, "") == "default" or "--xla_backend_optimization_level" in flags:
        return flags
    return f"{flags} {FAST_COMPILE}".strip()
