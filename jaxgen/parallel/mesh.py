"""Mesh construction from the config and multi-controller (jax.distributed) start-up."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from jaxgen.errors import ConfigError


def maybe_initialize_distributed() -> None:
    """Start JAX's multi-controller runtime when the environment asks for it.

    TPU pods and SLURM are detected by jax itself (`jax.distributed.initialize()` with no args); a plain
    cluster or the local multi-process launcher sets JAXGEN_COORDINATOR / JAXGEN_NUM_PROCESSES / JAXGEN_PROCESS_ID.
    """
    if jax.distributed.is_initialized():  # jax's own state: calling twice (notebooks, tests) is harmless
        return
    coord = os.environ.get("JAXGEN_COORDINATOR")
    if coord:
        n = int(os.environ["JAXGEN_NUM_PROCESSES"])
        pid = int(os.environ["JAXGEN_PROCESS_ID"])
        local = os.environ.get("JAXGEN_LOCAL_DEVICES")
        if local:  # simulated CPU devices per process (tests)
            jax.config.update("jax_num_cpu_devices", int(local))
        jax.distributed.initialize(coordinator_address=coord, num_processes=n, process_id=pid)
    elif os.environ.get("JAXGEN_DISTRIBUTED", "") == "auto":
        jax.distributed.initialize()  # TPU pod / SLURM: everything from the environment


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
    shape = list(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise ConfigError(f"mesh.shape {tuple(shape)} has more than one -1; use at most one (it takes the remaining devices)")
    known = int(np.prod([s for s in shape if s != -1])) if shape else 1
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"mesh.shape {tuple(shape)} does not divide {num_devices} devices; "
                              f"make the product of the fixed axes divide the device count")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(f"mesh.shape {tuple(shape)} uses {int(np.prod(shape))} devices but {num_devices} are present; "
                          f"set --config.mesh.shape so the product is {num_devices} (or use -1 for one axis)")
    return tuple(shape)


def make_mesh(mesh_cfg, log: bool = True) -> Mesh:
    axes = tuple(mesh_cfg.axes)
    shape = mesh_shape(mesh_cfg.shape, jax.device_count())
    if len(shape) != len(axes):
        raise ConfigError(f"mesh.shape {shape} and mesh.axes {axes} differ in length; give one size per axis name")
    # Auto axes: classic sharding propagation + with_sharding_constraint (logical rules drive the layout).
    mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
    if log:
        logging.debug("mesh %s over %d devices (%d processes)", dict(zip(axes, shape)), jax.device_count(),
                      jax.process_count())
    return mesh


def data_parallel_size(mesh: Mesh, rules) -> int:
    """Number of ways the batch dimension is split (product of the mesh axes 'batch' maps to)."""
    axes = dict(rules).get("batch")
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))
