#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC code from proto/ (run from anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
export PATH="$(dirname "$(command -v "$py")"):$PATH"
"$py" -m grpc_tools.protoc -Iproto \
  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
  proto/blocktxn/v1/*.proto
