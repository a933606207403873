#!/usr/bin/env bash
# Refresh constraints.txt: resolve pyproject.toml's ranges (with the dev and libvirt extras) in a
# fresh virtualenv and record the exact version of every package installed.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --upgrade pip setuptools
"$tmp/venv/bin/pip" install -q ".[dev,libvirt]"
{
  echo "# Exact versions that CI tests and deploy/setup.sh installs (scripts/lock.sh writes this)."
  "$tmp/venv/bin/pip" freeze --all | grep -v -i '^blocktxn[= @]\|^#\|^-e' | LC_ALL=C sort -f
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages"
