#!/usr/bin/env bash
# Run the sysroot's Debian 12 arm64 Python 3.11 under qemu-user as a Cortex-A72 (Pi 4):
#   PYTHONPATH=dir1:dir2 scripts/aarch64_python.sh -c "import toma_edge_native"
# Sets up the toolchain and sysroot first when needed (scripts/aarch64_env.sh), unless
# TOMA_AARCH64_SYSROOT names one. Arguments go to python3.11 (-s: no user site-packages).
set -euo pipefail
sysroot="${TOMA_AARCH64_SYSROOT:-$("$(dirname "$0")/aarch64_env.sh" | tail -n 1)}"
exec qemu-aarch64-static -cpu cortex-a72 -L "$sysroot" "$sysroot/usr/bin/python3.11" -s "$@"
