#!/usr/bin/env bash
# Wheels of the serve extra for a device machine that has no network (its Python 3.12, x86-64): run here, then
# carry .whl in the device call and install there with
#   python3 -m pip install -q --no-index --target /tmp/site --find-links .whl fastapi uvicorn prometheus_client httpx
#   export PYTHONPATH=/tmp/site:$PWD
# (.whl is git-ignored.)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q -d .whl --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    fastapi uvicorn prometheus_client httpx
ls .whl
