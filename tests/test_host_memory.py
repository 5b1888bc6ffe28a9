"""jaxgen.utils.host_memory: with the settings applied, memory freed by the process is reused without page faults
(what keeps XLA:CPU's per-step temporaries resident); the opt-outs leave glibc's defaults alone; a release hands a
freed hole back at once; once large blocks are mapped, a freed one goes back when freed."""
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


def _clean_env():
    """This environment without the user's malloc settings or jaxgen's opt-out."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "JAXGEN_HOST_MALLOC"}


def _run(env_extra):
    env = _clean_env()
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


# the settings applied, glibc's malloc / free as XLA's allocator calls them, the process's resident MB
_HEAP = textwrap.dedent("""
    import ctypes
    from jaxgen.utils.host_memory import keep_freed_memory, map_large_blocks, release_free_memory
    keep_freed_memory()
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    def rss_mb():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
""")

_RELEASE_PROBE = _HEAP + textwrap.dedent("""
    big = libc.malloc(256 << 20)  # a compiler's working memory, say
    ctypes.memset(big, 1, 256 << 20)
    pin = libc.malloc(1 << 20)  # a live block above it: the freed one is a hole, not the heap's top
    ctypes.memset(pin, 1, 1 << 20)
    libc.free(big)
    kept = rss_mb()
    released = release_free_memory()
    print(released, kept - rss_mb())
""")


def test_release_free_memory_returns_a_hole_below_live_blocks():
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], env=env, capture_output=True, text=True, check=True)
    released, dropped_mb = out.stdout.split()
    assert released == "True" and int(dropped_mb) > 200  # kept resident by keep_freed_memory until released


_MAPPED_PROBE = _HEAP + textwrap.dedent("""
    def kept_mb_after_freeing(size):  # a sampler call's temporary buffer, with a live block above it
        before = rss_mb()
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        pin = libc.malloc(1 << 20)
        ctypes.memset(pin, 1, 1 << 20)
        libc.free(block)
        return rss_mb() - before
    heap = kept_mb_after_freeing(128 << 20)
    applied = map_large_blocks()
    print(applied, heap, kept_mb_after_freeing(128 << 20))
""")


def test_map_large_blocks_hands_large_blocks_back_when_freed():
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", _MAPPED_PROBE], env=env, capture_output=True, text=True, check=True)
    applied, heap, mapped = out.stdout.split()
    assert applied == "True"
    assert int(heap) > 100  # on the heap the freed 128 MB stays resident (keep_freed_memory)
    assert int(mapped) < 8  # its own mapping: unmapped when freed
    env["JAXGEN_HOST_MALLOC"] = "system"
    out = subprocess.run([sys.executable, "-c", _MAPPED_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"  # opted out: glibc's defaults are left alone


def test_jaxgens_own_settings_in_the_environment_are_no_opt_out():
    """bench/vs_official.py gives both sides jaxgen's malloc settings as MALLOC_* variables: large blocks must still
    get their own mappings then (on the heap, RAR-B sampling's peak grew call by call); other values opt out."""
    from jaxgen.utils.host_memory import SETTINGS

    env = _clean_env()
    env.update(SETTINGS)
    out = subprocess.run([sys.executable, "-c", _MAPPED_PROBE], env=env, capture_output=True, text=True, check=True)
    applied, heap, mapped = out.stdout.split()
    assert applied == "True" and int(heap) > 100 and int(mapped) < 8
    env["MALLOC_ARENA_MAX"] = "2"
    out = subprocess.run([sys.executable, "-c", _MAPPED_PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "False"


def test_huge_pages_env_adds_glibcs_tunable_unless_it_does_not_apply(tmp_path, monkeypatch):
    import platform

    from jaxgen.utils import host_memory

    thp = tmp_path / "enabled"
    monkeypatch.setattr(host_memory, "THP_MODE", str(thp))
    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    thp.write_text("always [madvise] never\n")
    env = host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=1", "PATH": "/bin"}
    assert host_memory.huge_pages_env({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    assert host_memory.huge_pages_env(env) is None  # set already: no second restart
    assert host_memory.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's value wins
    assert host_memory.huge_pages_env({"JAXGEN_HOST_MALLOC": "system"}) is None
    thp.write_text("always madvise [never]\n")
    assert host_memory.huge_pages_env({}) is None
    thp.write_text("[always] madvise never\n")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.31"))  # no such tunable before 2.35
    assert host_memory.huge_pages_env({}) is None


def test_restart_re_executes_the_same_command_once_with_the_tunable():
    from jaxgen.utils.host_memory import huge_pages_env

    probe = ("import os, sys; print(os.environ.get('GLIBC_TUNABLES', '-'), sys.argv[1:]); "
             "from jaxgen.utils.host_memory import restart_with_huge_pages; restart_with_huge_pages()")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXGEN_HOST_MALLOC")}
    out = subprocess.run([sys.executable, "-c", probe, "arg"], env=env, capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    if huge_pages_env(env) is None:  # a machine without glibc >= 2.35 or with THP off: nothing to restart for
        assert lines == ["- ['arg']"]
    else:
        assert lines == ["- ['arg']", "glibc.malloc.hugetlb=1 ['arg']"]
    env["JAXGEN_HOST_MALLOC"] = "system"
    out = subprocess.run([sys.executable, "-c", probe, "arg"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["- ['arg']"]
