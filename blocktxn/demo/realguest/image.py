"""Build a minimal Linux guest (kernel + initramfs) from Debian packages, cached.

The guest is the Debian kernel, a static busybox, qemu-guest-agent with the shared
libraries it needs (taken from the Debian packages, not from the host), the kernel
modules for virtio and ext4, and an ``/init`` that mounts the data disk ``/dev/vda``
(ext4) at ``/data``, starts qemu-ga on the virtio-serial port
``org.qemu.guest_agent.0``, starts a writer appending ``1\\n2\\n3\\n...`` to
``/data/log`` and prints :data:`READY_MARKER` on the serial console.

Everything is fetched with ``apt-get download`` into a cache directory
(``$BLOCKTXN_GUEST_CACHE``, default ``/var/cache/blocktxn-guest``) and built once per
set of package versions (and version of this file): the build directory's name is a
hash of both, so a second run only asks apt for the candidate versions.

The initramfs (newc cpio, gzip) is written in Python, so the host needs neither
``cpio`` nor root (device nodes are cpio entries). Host tools: ``apt-get``,
``apt-cache``, ``dpkg-deb`` and, for the data disk, ``mkfs.ext4`` (e2fsprogs).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "BLOCKTXN_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/blocktxn-guest")
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
# Loaded in this order (each after the modules it depends on); a module the kernel
# has built in is skipped. crc32c: ext4/jbd2 checksums ask the crypto API for it at
# mount time (a soft dependency, not a "depends=", and there is no modprobe helper).
MODULES = ("virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4")
READY_MARKER = "BLOCKTXN_GUEST_READY"
FAILED_MARKER = "BLOCKTXN_GUEST_FAILED"
AGENT_PORT_NAME = "org.qemu.guest_agent.0"
GUEST_LOG = "/data/log"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib64",
             "lib", "usr/lib")
_GUEST_LIB_DIR = "lib/x86_64-linux-gnu"

INIT_SCRIPT = r"""#!/bin/sh
# blocktxn test guest: PID 1.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
fail() { echo "@FAILED@: $*"; while :; do sleep 3600; done; }
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
for m in @MODULES@; do
  insmod "/lib/modules/$m" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1)); [ $i -gt 300 ] && fail "no /dev/vda"; sleep 0.1
done
mount -t ext4 /dev/vda /data || fail "mount /dev/vda on /data"
# No udev: make /dev/virtio-ports/<name> from sysfs, as udev's rule would.
port=""; i=0
while [ -z "$port" ]; do
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "@PORT@" ] && port="/dev/${p##*/}"
  done
  [ -n "$port" ] && [ -c "$port" ] && break
  port=""; i=$((i + 1)); [ $i -gt 300 ] && fail "no virtio port @PORT@"; sleep 0.1
done
mkdir -p /dev/virtio-ports
ln -sf "$port" "/dev/virtio-ports/@PORT@"
LD_LIBRARY_PATH=/@LIBDIR@ /usr/sbin/qemu-ga -m virtio-serial \
  -p "/dev/virtio-ports/@PORT@" -t /run &
# The writer: one sequence number per line, every 10 ms; sync every 10 lines.
(
  n=0
  while :; do
    n=$((n + 1))
    echo "$n" >> @LOG@
    [ $((n % 10)) -eq 0 ] && sync
    usleep 10000
  done
) &
echo "@READY@ kernel=$(uname -r)"
while :; do sleep 3600; done
"""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    kernel_release: str
    key: str
    packages: dict[str, str]


def cache_dir() -> Path:
    """The package and build cache: ``$BLOCKTXN_GUEST_CACHE``, else the default, else
    (a user who may not write the default) ``~/.cache/blocktxn-guest``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    with contextlib.suppress(OSError):
        DEFAULT_CACHE.mkdir(parents=True, exist_ok=True)
    if os.access(DEFAULT_CACHE, os.W_OK | os.X_OK):
        return DEFAULT_CACHE
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "blocktxn-guest"


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run *cmd*, return its stdout; on failure raise with its stderr."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def tool(name: str) -> str:
    """Path of a host tool, also looking in the sbin directories (not in PATH for users)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise RuntimeError(f"{name} is not installed")
    return found


# ------------------------------------------------------------------ apt
def resolve_kernel_package() -> str:
    """The versioned kernel package the meta package depends on (``linux-image-6.1.0-N-amd64``)."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        dep = line.strip().removeprefix("|")
        if dep.startswith("Depends:"):
            name = dep.split(":", 1)[1].strip()
            if name.startswith("linux-image-") and not name.startswith("<"):
                return name
    raise RuntimeError(f"no linux-image-* dependency in apt-cache depends {KERNEL_META_PACKAGE}:"
                       f"\n{out}\n(run apt-get update?)")


def dependency_closure(package: str) -> list[str]:
    """*package* and everything it Depends on, recursively (no pre-depends or recommends).

    For qemu-guest-agent these are its shared libraries' packages (libc6, libglib2.0-0,
    ...); the pre-dependency init-system-helpers would pull in perl and is not needed.
    """
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests",
                "--no-conflicts", "--no-breaks", "--no-replaces", "--no-enhances",
                "--no-pre-depends", package])
    names = {line.strip() for line in out.splitlines()
             if line and not line[0].isspace() and not line.startswith("<")}
    return sorted(names)


def candidate_versions(packages: list[str]) -> dict[str, str]:
    """Package → the version ``apt-get download`` would fetch (apt's candidate)."""
    out = _run(["apt-cache", "show", "--no-all-versions", *packages])
    versions: dict[str, str] = {}
    name = ""
    for line in out.splitlines():
        if line.startswith("Package: "):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Version: ") and name:
            versions[name] = line.split(":", 1)[1].strip()
    missing = set(packages) - set(versions)
    if missing:
        raise RuntimeError(f"no candidate version for {sorted(missing)} (run apt-get update?)")
    return {p: versions[p] for p in packages}


def _apt_fingerprint() -> str:
    """A hash of what apt's candidates depend on: its package lists and configuration.

    Only sizes and modification times (cheap): ``apt-get update`` and any change of
    sources, pinning or configuration change it.
    """
    files: list[Path] = []
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        if d.is_dir():
            files.extend(p for p in d.rglob("*") if p.is_file() and p.name != "lock"
                         and "partial" not in p.parts and "auxfiles" not in p.parts)
    h = hashlib.sha256()
    for p in sorted(files):
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_packages(cache: Path, recipe: str) -> tuple[str, dict[str, str]]:
    """(kernel package, package → candidate version) of everything the guest is built from.

    Asking apt-cache takes seconds when apt keeps no binary cache (Debian container
    images), so the answer is kept in *cache* until apt's lists or configuration, or
    *recipe* (this file), change.
    """
    stamp = hashlib.sha256(f"{_apt_fingerprint()}\0{recipe}".encode()).hexdigest()
    saved = cache / "resolved.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        data = json.loads(saved.read_text())
        if data["stamp"] == stamp:
            return str(data["kernel"]), {str(k): str(v) for k, v in data["versions"].items()}
    kernel_pkg = resolve_kernel_package()
    wanted = [kernel_pkg, BUSYBOX_PACKAGE, *dependency_closure(AGENT_PACKAGE)]
    versions = candidate_versions(sorted(set(wanted)))
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".resolved-{os.getpid()}.json"
    tmp.write_text(json.dumps({"stamp": stamp, "kernel": kernel_pkg, "versions": versions}))
    os.replace(tmp, saved)
    return kernel_pkg, versions


def _deb_path(debs: Path, package: str, version: str) -> Path | None:
    """The cached .deb of *package* at *version*, if downloaded (apt names it so)."""
    quoted = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{quoted}_*.deb"))
    return found[0] if found else None


def download(versions: dict[str, str], debs: Path) -> dict[str, Path]:
    """``apt-get download`` every package not yet in *debs*; package → .deb path."""
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p, v in versions.items() if _deb_path(debs, p, v) is None]
    if missing:
        with tempfile.TemporaryDirectory(dir=debs, prefix=".dl-") as tmp:
            cmd = ["apt-get", "download", "-q"]
            if os.geteuid() == 0:  # _apt cannot write into our directory: say so, no warning
                cmd += ["-o", "APT::Sandbox::User=root"]
            _run([*cmd, *(f"{p}={versions[p]}" for p in missing)], cwd=Path(tmp))
            for f in Path(tmp).glob("*.deb"):
                os.replace(f, debs / f.name)
    paths: dict[str, Path] = {}
    for p, v in versions.items():
        path = _deb_path(debs, p, v)
        if path is None:
            raise RuntimeError(f"apt-get download {p}={v} left no .deb in {debs}")
        paths[p] = path
    return paths


# ------------------------------------------------------------------ ELF
def _elf_info(path: Path) -> tuple[str | None, list[str]]:
    """(PT_INTERP, DT_NEEDED sonames) of an ELF64 little-endian file."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not an ELF64 little-endian file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    interp: str | None = None
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
        elif p_type == 3:  # PT_INTERP
            interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
    if dynamic is None:
        return interp, []

    def offset_of(vaddr: int) -> int:
        for v, o, n in loads:
            if v <= vaddr < v + n:
                return vaddr - v + o
        raise ValueError(f"{path}: address {vaddr:#x} is in no PT_LOAD segment")

    strtab = 0
    needed: list[int] = []
    off, size = dynamic
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            needed.append(val)
        elif tag == 5:  # DT_STRTAB
            strtab = offset_of(val)
    names = [data[strtab + n:data.index(b"\0", strtab + n)].decode() for n in needed]
    return interp, names


def _resolve_in(root: Path, path: str) -> Path:
    """*path* (absolute or relative to *root*) with symlinks followed inside *root*."""
    current = root / path.lstrip("/")
    for _ in range(40):
        if not current.is_symlink():
            return current
        target = os.readlink(current)
        current = root / target.lstrip("/") if target.startswith("/") else current.parent / target
    raise RuntimeError(f"symlink loop at {path} in {root}")


def shared_libraries(root: Path, binary: Path) -> tuple[Path, dict[str, Path]]:
    """The dynamic loader and soname → file of every library *binary* needs, found in *root*."""
    interp, needed = _elf_info(binary)
    if interp is None:
        raise RuntimeError(f"{binary} is not dynamically linked")
    loader = _resolve_in(root, interp)
    if not loader.is_file():
        raise RuntimeError(f"loader {interp} not in {root}")
    libs: dict[str, Path] = {}
    todo = list(needed)
    while todo:
        soname = todo.pop()
        if soname in libs:
            continue
        for d in _LIB_DIRS:
            candidate = _resolve_in(root, f"{d}/{soname}")
            if candidate.is_file():
                libs[soname] = candidate
                todo.extend(_elf_info(candidate)[1])
                break
        else:
            raise RuntimeError(f"{soname} (needed by {binary.name}) is in none of the "
                               f"extracted packages under {root}")
    return loader, libs


# ------------------------------------------------------------------ kernel modules
def _module_name(path: str) -> str:
    """A module's name from its file name (``virtio-pci.ko.xz`` → ``virtio_pci``)."""
    base = path.rsplit("/", 1)[-1]
    for ext in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        base = base.removesuffix(ext)
    return base.replace("-", "_")


def modinfo(data: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module's ELF bytes (key → value, first wins)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not an ELF64 little-endian kernel module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # (name offset, file offset, size)
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, names_off, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[names_off + name:data.index(b"\0", names_off + name)] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    return {}


def module_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Module files to insmod, dependencies first; modules the kernel has built in skipped.

    The package has no modules.dep (depmod makes it when the package is installed), so
    the dependencies are read where depmod's come from in the end: each module's
    ``.modinfo`` ``depends=`` list, which the kernel build wrote from the symbols it uses.
    """
    files = {_module_name(p.name): p for p in (moddir / "kernel").rglob("*.ko*")}
    builtin_file = moddir / "modules.builtin"
    builtin = ({_module_name(x) for x in builtin_file.read_text().split()}
               if builtin_file.exists() else set())
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in chain:
            raise RuntimeError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in files:
            if name in builtin:
                return
            raise RuntimeError(f"kernel module {name} is neither in {moddir} nor built in")
        for dep in modinfo(_module_bytes(files[name])).get("depends", "").split(","):
            if dep:
                visit(_module_name(dep), (*chain, name))
        order.append(name)

    for w in wanted:
        visit(_module_name(w), ())
    return [files[n] for n in order]


def _module_bytes(path: Path) -> bytes:
    """A module's ELF bytes (busybox insmod wants them uncompressed)."""
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if path.name.endswith(".ko"):
        return path.read_bytes()
    raise RuntimeError(f"cannot decompress {path}")


# ------------------------------------------------------------------ cpio
class Initramfs:
    """An in-memory newc cpio archive: directories, files, symlinks, device nodes."""

    def __init__(self) -> None:
        # path (no leading slash) → (mode, data or link target, rdev major, rdev minor)
        self.entries: dict[str, tuple[int, bytes, int, int]] = {}

    def _parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", 0, 0))

    def dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory (and its parents)."""
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFDIR | mode, b"", 0, 0)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file (and its parent directories)."""
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFREG | mode, data, 0, 0)

    def symlink(self, path: str, target: str) -> None:
        """Add a symlink *path* → *target*."""
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        """Add a character device node (no root needed: it is only an archive entry)."""
        path = path.strip("/")
        self._parents(path)
        self.entries[path] = (stat.S_IFCHR | mode, b"", major, minor)

    def to_bytes(self) -> bytes:
        """The archive, gzip-compressed, reproducible (mtime 0, sorted, fixed inodes)."""
        out = bytearray()

        def entry(ino: int, name: str, mode: int, data: bytes, rmaj: int, rmin: int) -> None:
            nlink = 2 if stat.S_ISDIR(mode) else 1
            fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin,
                      len(name) + 1, 0)
            out.extend(b"070701" + "".join(f"{f:08x}" for f in fields).encode())
            out.extend(name.encode() + b"\0")
            out.extend(b"\0" * (-len(out) % 4))
            out.extend(data)
            out.extend(b"\0" * (-len(out) % 4))

        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data, rmaj, rmin = self.entries[name]
            entry(ino, name, mode, data, rmaj, rmin)
        entry(0, "TRAILER!!!", 0, b"", 0, 0)
        return gzip.compress(bytes(out), compresslevel=6, mtime=0)


# ------------------------------------------------------------------ build
def _extract(deb: Path, dest: Path) -> None:
    """Unpack a package's files into *dest* (``dpkg-deb -x``, no scripts run)."""
    _run(["dpkg-deb", "-x", str(deb), str(dest)])


def build_initramfs(root: Path, kernel_release: str) -> bytes:
    """The gzip'd newc initramfs from the packages extracted into *root*."""
    ramfs = Initramfs()
    for d in ("proc", "sys", "dev", "run", "tmp", "data", "etc", "var", "lib/modules"):
        ramfs.dir(d)
    ramfs.dir("tmp", 0o1777)
    ramfs.symlink("var/run", "/run")
    ramfs.chardev("dev/console", 5, 1)
    ramfs.chardev("dev/null", 1, 3, 0o666)

    busybox = root / "bin" / "busybox"
    ramfs.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet.strip("/") != "bin/busybox":
            ramfs.symlink(applet, "/bin/busybox")

    qga = root / "usr" / "sbin" / "qemu-ga"
    ramfs.file("usr/sbin/qemu-ga", qga.read_bytes(), 0o755)
    loader, libs = shared_libraries(root, qga)
    interp, _ = _elf_info(qga)
    assert interp is not None
    ramfs.file(interp, loader.read_bytes(), 0o755)
    for soname, path in libs.items():
        if path == loader:  # libc needs the loader by its soname: the same file
            ramfs.symlink(f"{_GUEST_LIB_DIR}/{soname}", interp)
        else:
            ramfs.file(f"{_GUEST_LIB_DIR}/{soname}", path.read_bytes(), 0o755)

    moddir = root / "lib" / "modules" / kernel_release
    names: list[str] = []
    for mod in module_load_order(moddir, MODULES):
        name = f"{_module_name(mod.name)}.ko"
        ramfs.file(f"lib/modules/{name}", _module_bytes(mod))
        names.append(name)

    script = (INIT_SCRIPT.replace("@MODULES@", " ".join(names))
              .replace("@PORT@", AGENT_PORT_NAME).replace("@LIBDIR@", _GUEST_LIB_DIR)
              .replace("@LOG@", GUEST_LOG).replace("@READY@", READY_MARKER)
              .replace("@FAILED@", FAILED_MARKER))
    ramfs.file("init", script.encode(), 0o755)
    return ramfs.to_bytes()


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on *directory* (two test runs building at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_guest_image(cache: Path | None = None) -> GuestImage:
    """Download (if needed) and build (if needed) the guest; return its kernel and initrd.

    The build lives in ``<cache>/build-<key>``, *key* hashing the exact package versions
    and this file, so a new kernel, qemu-ga or recipe makes a new build and an unchanged
    one is reused as is.
    """
    cache = cache or cache_dir()
    recipe = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    kernel_pkg, versions = resolve_packages(cache, recipe)
    key = hashlib.sha256(json.dumps({"packages": versions, "recipe": recipe},
                                    sort_keys=True).encode()).hexdigest()[:16]
    build = cache / f"build-{key}"
    with _locked(cache):
        meta_file = build / "image.json"
        if not meta_file.exists():
            debs = download(versions, cache / "debs")
            tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".build-"))
            try:
                root = tmp / "root"
                for deb in debs.values():
                    _extract(deb, root)
                vmlinuz = sorted((root / "boot").glob("vmlinuz-*"))
                if len(vmlinuz) != 1:
                    raise RuntimeError(f"expected one kernel in {kernel_pkg}: {vmlinuz}")
                release = vmlinuz[0].name.removeprefix("vmlinuz-")
                out = tmp / "out"
                out.mkdir()
                shutil.copyfile(vmlinuz[0], out / "vmlinuz")
                (out / "initrd.img").write_bytes(build_initramfs(root, release))
                (out / "image.json").write_text(json.dumps(
                    {"kernel_release": release, "packages": versions}, indent=1))
                shutil.rmtree(build, ignore_errors=True)
                os.replace(out, build)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        meta = json.loads(meta_file.read_text())
    return GuestImage(kernel=build / "vmlinuz", initrd=build / "initrd.img",
                      kernel_release=meta["kernel_release"], key=key,
                      packages=dict(meta["packages"]))


def make_data_disk(path: Path, size_mib: int = 64) -> None:
    """A raw disk image holding an empty ext4 file system (no root, no mount needed)."""
    with open(path, "wb") as f:
        f.truncate(size_mib * 1024 * 1024)
    _run([tool("mkfs.ext4"), "-F", "-q", "-L", "data", str(path)])
