import os

# Tests run on CPU with float32 reference semantics; multi-device tests spawn their own processes.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Persistent XLA cache shared by this process and every jaxgen process a test starts (they inherit the
# environment): the CLI tests run the same tiny programs many times, and a warm start takes ~10 s instead of ~30 s.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".pytest_cache", "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from tests.cli_utils import TEST_CACHE  # noqa: E402
from tests.xla_test_flags import with_test_xla_flags  # noqa: E402

# One jaxgen cache (the digit metric's classifier, trained on first use) for this process and the CLI processes
# tests start: on a fresh machine it is then trained once, not once per cache.
os.environ.setdefault("JAXGEN_CACHE", TEST_CACHE)

# The tests' programs are tiny and compile-bound: LLVM without its optimisation passes compiles them ~30 % faster
# (a cold 8-device tiny run: 28 s instead of 40 s) and computes the same numbers (the parity and bit-exact resume
# tests run under it). JAXGEN_TEST_XLA_OPT=default tests with XLA's default pipeline instead.
os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

from jaxgen.utils.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as jaxgen.main does, before jax starts its thread pools

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
