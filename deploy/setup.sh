#!/usr/bin/env bash
# One-stop set-up for a fresh Debian machine, then run something:
#   bash deploy/setup.sh demo [ARGS...]   install, then run the self-contained demo cluster
#   bash deploy/setup.sh test [ARGS...]   install, then run the whole test suite (pytest)
#   bash deploy/setup.sh install          install only
# Installs (only what is missing): Debian qemu-utils, qemu-system-common (qemu-storage-daemon),
# qemu-system-x86, etcd-server, nftables, prometheus (the metrics tests' server and
# promtool), restic (what the benchmark compares an incremental with), libvirt
# (libvirt-daemon-system: the libvirt backend's tests start libvirtd; libvirt-dev, pkg-config
# and gcc: the libvirt-python binding is built against the host's libvirt); a virtualenv in
# .venv with blocktxn, its libvirt binding and its dev tools, at the exact versions of
# constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v qemu-storage-daemon >/dev/null || need+=(qemu-system-common)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)  # lab VMs that can pause
command -v qemu-img >/dev/null && command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v etcd >/dev/null || need+=(etcd-server)
command -v nft >/dev/null || need+=(nftables)
command -v stdbuf >/dev/null || need+=(coreutils)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)  # metrics tests
command -v restic >/dev/null || need+=(restic)  # the benchmark's incremental comparison
command -v libvirtd >/dev/null || need+=(libvirt-daemon-system)  # the libvirt backend
pkg-config --exists libvirt 2>/dev/null || need+=(libvirt-dev pkg-config)  # its binding
command -v gcc >/dev/null || need+=(gcc)
[ -f "$(${PYTHON:-python3} -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] \
  || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
# Exact versions from constraints.txt (also for the build backend: PIP_CONSTRAINT
# reaches pip's isolated build environment), so two installs are the same.
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  export PIP_CONSTRAINT="$PWD/constraints.txt"
  .venv/bin/pip install -q "pip==$(sed -n 's/^pip==//p' constraints.txt)"
  .venv/bin/pip install -q -e ".[dev,libvirt]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi

what=${1:-install}
shift || true
case "$what" in
  install) ;;
  demo) exec .venv/bin/blocktxn demo "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: $0 install|demo|test [ARGS...]" >&2; exit 2 ;;
esac
