#!/usr/bin/env bash
# Build the toma-edge-native wheel (device/native) for x86_64 or aarch64 into OUTDIR.
#   scripts/build_native.sh x86_64 OUTDIR     native build on this machine
#   scripts/build_native.sh aarch64 OUTDIR    cross build on x86_64 Debian 12, with the
#                                             toolchain and sysroot of scripts/aarch64_env.sh
# Only CPython 3.11 is cross-built (the sysroot's Python, Debian 12's and Raspberry Pi OS
# 12's). The executorch runtime libraries of the target architecture are fetched and
# cached by device/native/prepare_executorch.py; builds are incremental in
# device/native/build/<wheel tag>/. The last line printed is the wheel's path.
set -euo pipefail
cd "$(dirname "$0")/.."

arch="${1:?usage: build_native.sh x86_64|aarch64 OUTDIR}"
out="${2:?usage: build_native.sh x86_64|aarch64 OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PY="${PYTHON:-python}"

args=()
case "$arch" in
    x86_64|amd64)
        arch=x86_64
        [ "$(uname -m)" = x86_64 ] || { echo "build_native: x86_64 builds only on x86_64" >&2; exit 2; }
        ;;
    aarch64|arm64)
        arch=aarch64
        if [ "$(uname -m)" != aarch64 ]; then
            pyver="$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
            # the build's host Python only runs CMake and prepare_executorch.py, but its
            # version must match the target's, whose headers it is found next to
            [ "$pyver" = 311 ] || { echo "build_native: aarch64 cross builds need a host Python 3.11 (got $pyver)" >&2; exit 2; }
            sysroot="$(scripts/aarch64_env.sh | tail -n 1)"
            export TOMA_AARCH64_SYSROOT="$sysroot"
            # _PYTHON_HOST_PLATFORM and SETUPTOOLS_EXT_SUFFIX go through scikit-build-core's
            # env table, not pip's environment: pip would otherwise also install the
            # build's own tools (the cmake wheel) for aarch64.
            args=(
                -C cmake.toolchain-file="$PWD/device/native/cmake/aarch64-linux-gnu.cmake"
                -C env._PYTHON_HOST_PLATFORM=linux-aarch64
                -C env.SETUPTOOLS_EXT_SUFFIX=.cpython-311-aarch64-linux-gnu.so
            )
        fi
        ;;
    *) echo "build_native: unknown architecture '$arch' (x86_64 or aarch64)" >&2; exit 2 ;;
esac

rm -f "$out"/toma_edge_native-*-linux_"$arch".whl
"$PY" -m pip wheel device/native --no-deps -q -w "$out" "${args[@]}" >&2
whl="$(ls "$out"/toma_edge_native-*-linux_"$arch".whl)"

# the wheel must hold the module for the target and the executorch libraries beside it
so="$("$PY" - "$whl" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
mods = [n for n in names if n.startswith("toma_edge_native/_et.") and n.endswith(".so")]
libs = {"libexecutorch.so", "libexecutorch_kernels_optimized.so",
        "libexecutorch_backend_xnnpack.so", "libexecutorch_threadpool.so"}
missing = sorted(libs - {n.rsplit("/", 1)[-1] for n in names if n.startswith("toma_edge_native/")})
if len(mods) != 1 or missing:
    sys.exit(f"build_native: bad wheel {sys.argv[1]}: modules {mods}, missing {missing}")
print(mods[0])
EOF
)"
case "$arch" in
    x86_64) want_suffix="-x86_64-linux-gnu.so"; want_machine="X86-64" ;;
    aarch64) want_suffix="-aarch64-linux-gnu.so"; want_machine="AArch64" ;;
esac
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])" "$whl" "$so" "$tmp"
[[ "$so" == *"$want_suffix" ]] || { echo "build_native: $so is not named for $arch" >&2; exit 1; }
readelf -h "$tmp/$so" | grep -q "Machine:.*$want_machine" \
    || { echo "build_native: $so is not an $want_machine binary" >&2; exit 1; }
readelf -d "$tmp/$so" | grep -q 'RUNPATH.*\[\$ORIGIN\]' \
    || { echo "build_native: $so's RUNPATH is not just \$ORIGIN: $(readelf -d "$tmp/$so" | grep RUNPATH)" >&2; exit 1; }
echo "$whl"
