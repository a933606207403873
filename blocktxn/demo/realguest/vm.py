"""Boot the test guest (image.py) under QEMU: KVM when usable, else TCG."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from blocktxn.demo.lab import qmp_call
from blocktxn.demo.realguest.image import (
    AGENT_PORT_NAME,
    FAILED_MARKER,
    READY_MARKER,
    GuestImage,
    make_data_disk,
)

QEMU = "qemu-system-x86_64"
# Generous: under TCG on a busy machine the boot takes several times longer than on KVM.
BOOT_TIMEOUT = 180.0
_SUN_PATH_MAX = 100  # sockaddr_un.sun_path is 108 bytes
PR_SET_PDEATHSIG = 1
DATA_NODE = "data"  # the data disk's format node (the agent names disks by node)
ACCEL_ENV = "BLOCKTXN_GUEST_ACCEL"  # kvm, tcg or auto (the default)
# The KVM probe: a loop of this many iterations, which hardware virtualisation runs in
# milliseconds, must end within KVM_PROBE_TIMEOUT (QEMU's start-up included).
KVM_PROBE_LOOPS = 10_000_000
KVM_PROBE_TIMEOUT = 3.0


def make_qcow2_data_disk(path: Path, size_mib: int = 64) -> None:
    """A qcow2 disk holding an empty ext4 file system (made raw, then converted)."""
    raw = path.with_name(path.name + ".raw")
    make_data_disk(raw, size_mib)
    try:
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw),
                        str(path)], check=True)
    finally:
        raw.unlink(missing_ok=True)


def kvm_openable() -> bool:
    """Whether this process can open /dev/kvm read-write."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _probe_firmware(loops: int) -> bytes:
    """A 64 KiB firmware image: count *loops* down in real mode, then exit QEMU.

    The reset vector (offset 0xFFF0) jumps to offset 0: ``mov ecx, loops; 1: dec ecx;
    jnz 1b; out 0xf4, al`` (isa-debug-exit: QEMU exits with status 1).
    """
    image = bytearray(b"\xf4" * 0x10000)  # hlt
    code = (b"\x66\xb9" + struct.pack("<I", loops)  # mov ecx, imm32
            + b"\x66\x49\x75\xfc"  # 1: dec ecx; jnz 1b
            + b"\xb0\x00\xe6\xf4"  # mov al, 0; out 0xf4, al
            + b"\xf4\xeb\xfd")  # hlt; jmp .-1
    image[:len(code)] = code
    image[0xFFF0:0xFFF3] = b"\xe9\x0d\x00"  # jmp near 0x0000
    return bytes(image)


def kvm_runs_fast(timeout: float = KVM_PROBE_TIMEOUT) -> bool:
    """Whether a KVM guest runs at hardware speed here.

    Some nested set-ups give a working /dev/kvm whose guests run orders of magnitude
    slower than TCG (every guest instruction emulated): there, a Debian kernel does not
    even finish decompressing itself in minutes. The probe runs a tiny firmware loop.
    """
    with tempfile.TemporaryDirectory(prefix="btguest-probe-") as tmp:
        fw = Path(tmp) / "probe.bin"
        fw.write_bytes(_probe_firmware(KVM_PROBE_LOOPS))
        cmd = [shutil.which(QEMU) or QEMU, "-nodefaults", "-no-user-config", "-display",
               "none", "-machine", "pc", "-accel", "kvm", "-m", "16", "-bios", str(fw),
               "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:  # run() has killed and reaped it
            return False
        return proc.returncode == 1  # isa-debug-exit: (0 << 1) | 1


@functools.cache
def choose_accelerator() -> str:
    """``kvm`` if KVM is usable and fast here, else ``tcg`` (``$BLOCKTXN_GUEST_ACCEL``
    overrides with ``kvm`` or ``tcg``). Decided once per process."""
    wanted = os.environ.get(ACCEL_ENV, "auto").strip().lower() or "auto"
    if wanted in ("kvm", "tcg"):
        return wanted
    if wanted != "auto":
        raise ValueError(f"{ACCEL_ENV}={wanted!r}: expected kvm, tcg or auto")
    return "kvm" if kvm_openable() and kvm_runs_fast() else "tcg"


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies.

    The fixture stops QEMU in a ``finally``; this covers what a ``finally`` cannot (the
    test run itself killed).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class GuestVm:
    """One QEMU process running the test guest, with a QMP and a guest-agent socket.

    The accelerator is :func:`choose_accelerator`'s: KVM when it is usable and runs at
    hardware speed, else TCG (slower, never skipped); with KVM, ``-accel tcg`` follows
    as QEMU's own fallback should KVM fail to initialise after all.
    """

    def __init__(self, image: GuestImage, workdir: Path, data_disk: Path, *,
                 memory_mib: int = 256, data_format: str = "raw") -> None:
        self.image = image
        self.workdir = workdir
        self.data_disk = data_disk
        self.data_format = data_format  # raw, or qcow2 (checkpoints need qcow2)
        self.memory_mib = memory_mib
        self.console_log = workdir / "console.log"
        self.stderr_log = workdir / "qemu.stderr"
        # Unix socket paths are short; pytest's tmp_path may not be.
        sockdir = workdir
        self._sockdir_tmp: Path | None = None
        if len(str(workdir / "qmp-agent.sock")) > _SUN_PATH_MAX:
            self._sockdir_tmp = sockdir = Path(tempfile.mkdtemp(prefix="btguest-"))
        self.qmp_socket = sockdir / "qmp.sock"
        # A monitor of its own for a blocktxn agent (it keeps its connection open, and a
        # QMP socket serves one client at a time); qmp() uses the first.
        self.agent_qmp_socket = sockdir / "qmp-agent.sock"
        self.agent_socket = sockdir / "qga.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_seconds: float | None = None
        self._t0 = 0.0

    def command(self) -> list[str]:
        """The QEMU command line."""
        return [
            shutil.which(QEMU) or QEMU,
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-machine", "q35", *self.accel_args(),
            "-smp", "1", "-m", str(self.memory_mib),
            "-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd),
            # panic=-1: a guest panic reboots at once, and -no-reboot makes QEMU exit.
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{self.console_log}",
            # The disk is the format node named DATA_NODE: the agent's disk name.
            "-blockdev", f"driver=file,node-name={DATA_NODE}-file,filename={self.data_disk}",
            "-blockdev", f"driver={self.data_format},node-name={DATA_NODE},file={DATA_NODE}-file",
            "-device", f"virtio-blk-pci,drive={DATA_NODE}",
            "-device", "virtio-serial-pci,id=vser0",
            "-chardev", f"socket,id=qga0,path={self.agent_socket},server=on,wait=off",
            "-device", f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT_NAME}",
            "-qmp", f"unix:{self.qmp_socket},server=on,wait=off",
            "-qmp", f"unix:{self.agent_qmp_socket},server=on,wait=off",
        ]

    def accel_args(self) -> list[str]:
        """``-accel`` options: KVM first (TCG as QEMU's fallback), or TCG alone."""
        if choose_accelerator() == "kvm":
            return ["-accel", "kvm", "-accel", "tcg"]
        return ["-accel", "tcg"]

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Start QEMU and wait until the guest prints its ready marker."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start QEMU, not waiting for the guest (several guests boot at once: launch
        each, then :meth:`wait_ready` each). Call it from a thread that outlives QEMU:
        QEMU is killed when the thread that started it ends (PR_SET_PDEATHSIG)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log.write_bytes(b"")
        self._t0 = time.monotonic()
        with open(self.stderr_log, "wb") as err:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, preexec_fn=_die_with_parent)

    def console(self) -> str:
        """The serial console so far."""
        try:
            return self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _diagnostics(self) -> str:
        err = self.stderr_log.read_text(errors="replace") if self.stderr_log.exists() else ""
        return (f"\n--- console (last 3000 chars) ---\n{self.console()[-3000:]}"
                f"\n--- qemu stderr ---\n{err[-2000:]}")

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Wait for :data:`READY_MARKER` on the console; raise on failure, exit or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            out = self.console()
            if READY_MARKER in out:
                self.boot_seconds = time.monotonic() - self._t0
                return
            if FAILED_MARKER in out:
                raise RuntimeError(f"guest failed to start{self._diagnostics()}")
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode} before the "
                                   f"guest was ready{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest not ready after {timeout:.0f} s{self._diagnostics()}")
            time.sleep(0.1)

    def qmp(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """One QMP command over a fresh connection (10 s deadline); its return value."""
        return qmp_call(self.qmp_socket, cmd, args)

    def accelerator(self) -> str:
        """``kvm`` or ``tcg``: what QEMU actually runs the guest with."""
        return "kvm" if self.qmp("query-kvm").get("enabled") else "tcg"

    def close(self) -> None:
        """Stop QEMU: ``quit`` over QMP, else SIGTERM, else SIGKILL (this process only)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.qmp("quit")
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._sockdir_tmp is not None:
            shutil.rmtree(self._sockdir_tmp, ignore_errors=True)
            self._sockdir_tmp = None

    def __enter__(self) -> GuestVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
