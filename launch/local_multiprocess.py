"""Run N jaxgen processes on this machine, wired through jax.distributed (used by the tests; handy for debugging
multi-host code paths on a laptop).

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      -m jaxgen.main --config=configs/mar_tiny.py --workdir=runs/mp

Each process gets JAXGEN_COORDINATOR / JAXGEN_NUM_PROCESSES / JAXGEN_PROCESS_ID / JAXGEN_LOCAL_DEVICES, which
`jaxgen.parallel.mesh.maybe_initialize_distributed` reads. Exit code: the first non-zero child code, else 0.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(python_args, num_processes: int, devices_per_process: int = 1, env=None, timeout=None, log_dir=None):
    port = free_port()
    procs = []
    for pid in range(num_processes):
        child_env = dict(os.environ if env is None else env)
        child_env.update({
            "JAXGEN_COORDINATOR": f"127.0.0.1:{port}",
            "JAXGEN_NUM_PROCESSES": str(num_processes),
            "JAXGEN_PROCESS_ID": str(pid),
            "JAXGEN_LOCAL_DEVICES": str(devices_per_process),
            "JAX_PLATFORMS": "cpu",
        })
        out = open(os.path.join(log_dir, f"process_{pid}.log"), "w") if log_dir else None
        procs.append(subprocess.Popen([sys.executable, *python_args], env=child_env, stdout=out,
                                      stderr=subprocess.STDOUT if out else None))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            codes.append(124)
    return next((c for c in codes if c), 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--log_dir", default=None)
    parser.add_argument("python_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    rest = args.python_args[1:] if args.python_args[:1] == ["--"] else args.python_args
    sys.exit(launch(rest, args.num_processes, args.devices_per_process, log_dir=args.log_dir))


if __name__ == "__main__":
    main()
