"""`blocktxn coordinator` without --etcd runs and supervises a private etcd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from blocktxn.demo.lab import free_port
from blocktxn.v1 import coordinator_pb2 as cpb
from blocktxn.v1 import coordinator_pb2_grpc as cpb_grpc


def etcd_children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-x", "etcd"], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def test_private_etcd_is_started_and_restarted(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    again: list[int] = []
    proc = subprocess.Popen([sys.executable, "-m", "blocktxn.coordinator", "--listen", address,
                             "--data-dir", str(tmp_path)], stderr=subprocess.DEVNULL)
    try:
        with grpc.insecure_channel(address) as ch:
            stub = cpb_grpc.CoordinatorServiceStub(ch)
            stub.ListAgents(cpb.ListAgentsRequest(), timeout=30, wait_for_ready=True)
            first = etcd_children(proc.pid)
            assert len(first) == 1
            os.kill(first[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while True:
                again = etcd_children(proc.pid)
                try:
                    if again and again != first:
                        stub.ListAgents(cpb.ListAgentsRequest(), timeout=5)
                        break
                except grpc.RpcError:
                    pass
                assert time.monotonic() < deadline, "private etcd was not restarted"
                time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(20)
    for pid in again:  # the coordinator stopped the etcd it started
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return True


def test_private_etcd_dies_with_a_killed_coordinator(tmp_path: Path) -> None:
    """SIGKILL leaves the coordinator no ``finally``: its etcd must not outlive it."""
    address = f"127.0.0.1:{free_port()}"
    proc = subprocess.Popen([sys.executable, "-m", "blocktxn.coordinator", "--listen", address,
                             "--data-dir", str(tmp_path)], stderr=subprocess.DEVNULL)
    etcd: list[int] = []
    try:
        with grpc.insecure_channel(address) as ch:
            stub = cpb_grpc.CoordinatorServiceStub(ch)
            stub.ListAgents(cpb.ListAgentsRequest(), timeout=30, wait_for_ready=True)
        etcd = etcd_children(proc.pid)
        assert len(etcd) == 1
    finally:
        proc.kill()
        proc.wait(20)
    deadline = time.monotonic() + 10
    while not gone(etcd[0]):
        if time.monotonic() > deadline:
            os.kill(etcd[0], signal.SIGKILL)   # do not leave it behind for the next test
            raise AssertionError("the private etcd outlived its coordinator's SIGKILL")
        time.sleep(0.1)
