#!/bin/sh
# GPU check of this checkout: golden tensors on the device, full-size speed table, 2-rank torchrun (bench/device_check.py).
# Usage: bench/device_check.sh [--dry-run] [--json FILE]   (PYTHON=... to pick the interpreter)
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" bench/device_check.py "$@"
