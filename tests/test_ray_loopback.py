"""A local sweep's Ray session listens on loopback only.

``ensure_ray()`` starts a local session in a subprocess (as a sweep driver does) and runs one task
so that a worker exists; the test then reads, from ``/proc``, every listening TCP socket of that
driver and of the processes Ray started under it (GCS, raylet with its object manager, the
dashboard and runtime-env agents, the workers) and checks each is bound to a loopback address,
none to 0.0.0.0 / :: nor to the machine's reachable IP. The opt-out (``CXRTUNE_RAY_LOOPBACK=0``,
Ray's own default) binds to all interfaces, which shows the check can see a wildcard socket.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _sweep_fixtures import remove_ray_tmpdir, short_ray_tmpdir, subprocess_env

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/net/tcp").is_file(), reason="reads Linux's /proc/net/tcp")]

#: the sweep driver's start of Ray, then one task; prints READY and waits for stdin to close
DRIVER = """
import os, sys
import ray
from cxrtune.sweep.runner import ensure_ray
ensure_ray(num_cpus=1, log_to_driver=False)
@ray.remote
def pid():
    return os.getpid()
print("READY", os.getpid(), ray.get(pid.remote()), ray.util.get_node_ip_address(), flush=True)
sys.stdin.read()
ray.shutdown()
"""


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("PPid:"):
                    tree.setdefault(int(line.split()[1]), []).append(int(entry))
                    break
        except OSError:  # ended meanwhile
            continue
    return tree


def _descendants(root: int) -> set[int]:
    tree, found, todo = _children(), {root}, [root]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    except OSError:
        pass
    return inodes


def _address(hex_ip: str) -> ipaddress._BaseAddress:
    raw = bytes.fromhex(hex_ip)
    # /proc/net/tcp{,6} prints the address as 32-bit words in host byte order
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if sys.byteorder == "little" else raw
    return ipaddress.ip_address(words)


def _listening() -> dict[int, tuple[ipaddress._BaseAddress, int]]:
    """inode -> (address, port) of every listening TCP socket of this machine's network namespace."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).is_file():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            ip, port = fields[1].split(":")
            found[int(fields[9])] = (_address(ip), int(port, 16))
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _is_loopback(address: ipaddress._BaseAddress) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _session_sockets(extra_env: dict[str, str]) -> tuple[list[tuple[str, int, str, int]], str]:
    """(process name, pid, address, port) of each listening socket of a local session, and the
    node IP Ray reported."""
    ray_tmp = short_ray_tmpdir()
    env = subprocess_env(Path(ray_tmp) / "cache", ray_tmp, **extra_env)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("READY"):
            proc.kill()
            pytest.fail("the driver did not start Ray:\n" + line + proc.communicate(timeout=30)[1][-3000:])
        _, driver_pid, worker_pid, node_ip = line.split()
        time.sleep(1.0)  # agents open their ports while the raylet registers
        pids = _descendants(int(driver_pid))
        assert int(worker_pid) in pids, "the task's worker is not under the driver's process tree"
        listening = _listening()
        rows = []
        for pid in sorted(pids):
            for inode in _socket_inodes(pid):
                if inode in listening:
                    address, port = listening[inode]
                    rows.append((_comm(pid), pid, str(getattr(address, "ipv4_mapped", None) or address), port))
        return rows, node_ip
    finally:
        try:
            proc.communicate(input="", timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        remove_ray_tmpdir(ray_tmp)


def test_a_local_session_listens_on_loopback_only():
    rows, node_ip = _session_sockets({})
    names = {name for name, *_ in rows}
    # the GCS, the raylet (node manager and object manager) and the core workers' servers at least
    assert {"gcs_server", "raylet"} <= names, rows
    assert sum(1 for name, *_ in rows if name == "raylet") >= 2, rows
    assert ipaddress.ip_address(node_ip).is_loopback, node_ip
    wide = [r for r in rows if not _is_loopback(ipaddress.ip_address(r[2]))]
    assert not wide, f"sockets not on loopback: {wide}\nall: {rows}"


def test_the_opt_out_listens_on_all_interfaces_as_ray_does_by_default():
    rows, _ = _session_sockets({"CXRTUNE_RAY_LOOPBACK": "0"})
    wildcard = [r for r in rows if ipaddress.ip_address(r[2]).is_unspecified]
    assert any(name == "gcs_server" for name, *_ in wildcard), rows
