"""jaxgen.utils.host_memory: with the settings applied, memory freed by the process is reused without page faults
(what keeps XLA:CPU's per-step temporaries resident); the opt-outs leave glibc's defaults alone."""
import os
import subprocess
import sys
import textwrap

_PROBE = textwrap.dedent("""
    import ctypes, resource
    from jaxgen.utils.host_memory import keep_freed_memory
    applied = keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def faults_of_fresh_256mb():  # plain malloc as XLA's allocator does (numpy would ask for huge pages)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(256 << 20)
        ctypes.memset(p, 1, 256 << 20)
        libc.free(p)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    faults_of_fresh_256mb()
    print(applied, faults_of_fresh_256mb())
""")


def _run(env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "JAXGEN_HOST_MALLOC"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_freed_memory_is_reused_without_faults():
    applied, faults = _run({})
    assert applied and faults < 1000  # 256 MB is 65,536 pages
    applied, faults = _run({"JAXGEN_HOST_MALLOC": "system"})
    assert not applied and faults > 30000  # glibc's default: a fresh mmap, faulted in again
    assert _run({"MALLOC_ARENA_MAX": "2"})[0] is False  # the user's own malloc settings win
