#!/usr/bin/env bash
# Fail if the committed generated protobuf/gRPC code differs from a fresh generation.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp -r blocktxn/v1 "$tmp/before"
PYTHON=${PYTHON:-.venv/bin/python} scripts/gen_protos.sh >/dev/null
if ! diff -r -x __pycache__ "$tmp/before" blocktxn/v1; then
  echo "generated protobuf code is stale: run scripts/gen_protos.sh and commit" >&2
  exit 1
fi
echo "generated protobuf code is fresh"
