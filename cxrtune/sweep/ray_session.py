"""Starting or joining Ray for a sweep, with a local session reachable from this machine only.

A local session (no ``address``) binds its GCS, raylet, object manager, runtime-env agent and
worker gRPC ports to the loopback interface instead of all interfaces. Ray chooses the address
its servers listen on from the node's IP: the servers listen on loopback only when that IP is
loopback. ``ray.init(_node_ip_address="127.0.0.1")`` alone does not get there, since ``ray.init``
turns a loopback address into the machine's reachable IP unless Ray runs in its single-machine
mode, which it uses by default on macOS and Windows (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
ray issue #18730) and which :func:`ensure_ray` turns on for the start of a local session on Linux
too. A session started this way cannot be joined by other machines (use ``ray start`` and
``--address`` for a cluster); token authentication, on by default since Ray 2.59, still guards
every port against other users of this machine.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import ray

#: set to 0 to start a local session on the machine's reachable IP (Ray's Linux default)
LOOPBACK_ENV = "CXRTUNE_RAY_LOOPBACK"


@contextlib.contextmanager
def _single_machine_mode() -> Iterator[None]:
    """Ray's single-machine mode for the duration of a local ``ray.init``: the node's IP resolves
    to loopback. Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when it is imported (before
    this module runs, in any script that imports ``ray.tune`` first), so the constant it was read
    into is set here too; where a Ray version lacks it, the session starts as Ray would start it."""
    from ray._private import ray_constants

    name = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_env = os.environ.get(name)
    had_flag = hasattr(ray_constants, "ENABLE_RAY_CLUSTER")
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    try:
        if had_flag:
            ray_constants.ENABLE_RAY_CLUSTER = False
        os.environ[name] = "0"  # the Python processes Ray starts (agents, workers) read it at import
        yield
    finally:
        if had_flag:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


def loopback_wanted() -> bool:
    """Whether a local session binds to loopback: yes unless ``CXRTUNE_RAY_LOOPBACK=0``."""
    return os.environ.get(LOOPBACK_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def ensure_ray(address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True,
               loopback: bool | None = None) -> None:
    """Start (or join) Ray once per process. Without ``log_to_driver`` the workers' output stays
    out of the driver's console (each trial keeps its own in ``<trial>/trial.log``): Ray forwards
    it in batches, late enough to print after the sweep's summary otherwise.

    With no ``address`` a local session starts; with ``loopback`` (default: on, unless
    ``CXRTUNE_RAY_LOOPBACK=0``) its ports listen on 127.0.0.1 only. Joining a cluster
    (``address``) leaves the cluster's own settings alone."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
        return
    kwargs = dict(num_cpus=num_cpus, include_dashboard=False, object_store_memory=256 * 1024**2,
                  log_to_driver=log_to_driver)
    if loopback is None:
        loopback = loopback_wanted()
    if not loopback:
        ray.init(**kwargs)
        return
    with _single_machine_mode():
        ray.init(_node_ip_address="127.0.0.1", **kwargs)
