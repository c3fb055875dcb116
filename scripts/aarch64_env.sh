#!/usr/bin/env bash
# Set up this x86_64 Debian 12 machine to cross-build for and run on aarch64:
#   - the aarch64 cross compiler and qemu-user (apt-get, only what is missing);
#   - a sysroot holding Debian 12 arm64 Python 3.11 (interpreter, stdlib, headers) and the
#     shared libraries it needs, at $TOMA_EDGE_CACHE/aarch64-sysroot
#     (TOMA_EDGE_CACHE defaults to ~/.cache/toma-edge).
# The arm64 .debs come from `apt-get download` run with a private apt state (own sources,
# lists, cache and an empty dpkg status), so the system's dpkg architectures and apt state
# are left alone; each .deb is unpacked with `dpkg -x`, never installed.
# Work already done is skipped (a stamp keyed on the package list). The last line printed
# is the sysroot's path. Run arm64 Python with scripts/aarch64_python.sh.
set -euo pipefail

CACHE="${TOMA_EDGE_CACHE:-$HOME/.cache/toma-edge}"
SYSROOT="$CACHE/aarch64-sysroot"
MIRROR="${TOMA_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${TOMA_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
# (bookworm has no libmpdec3: its python3.11 carries its own libmpdec)
PACKAGES=(
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libpython3.11-dev
    libc6 libstdc++6 libgcc-s1 zlib1g libexpat1 libffi8 libssl3 libbz2-1.0 liblzma5
    libuuid1 libsqlite3-0 libncursesw6 libtinfo6 libcrypt1 libreadline8 media-types
)
# bump when the sysroot's layout changes, so old stamps no longer match
LAYOUT=1

log() { echo "aarch64_env: $*" >&2; }

# 1. host tools ---------------------------------------------------------------------------
need_apt=()
for p in g++-aarch64-linux-gnu qemu-user-static; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    log "installing ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${need_apt[@]}" >&2
fi

# 2. sysroot ------------------------------------------------------------------------------
key="$(printf '%s\n' "layout=$LAYOUT" "$MIRROR" "$SECURITY_MIRROR" "${PACKAGES[@]}" | sha256sum | cut -c1-16)"
stamp="$SYSROOT/.toma-sysroot-$key"
if [ -f "$stamp" ]; then
    echo "$SYSROOT"
    exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/aarch64-sysroot.lock"
flock 9
if [ -f "$stamp" ]; then  # another run built it meanwhile
    echo "$SYSROOT"
    exit 0
fi
log "building $SYSROOT"
APT="$CACHE/apt-arm64"
rm -rf "$APT"
mkdir -p "$APT"/{lists/partial,cache/archives/partial,state,etc/sources.list.d,etc/preferences.d,debs}
: >"$APT/state/status"
cat >"$APT/etc/sources.list" <<EOF
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR bookworm-updates main
deb [arch=arm64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $SECURITY_MIRROR bookworm-security main
EOF
# the system's apt.conf.d still applies (proxies, ...), but none of its hooks may run here
cat >"$APT/etc/apt.conf" <<'EOF'
#clear APT::Update::Pre-Invoke;
#clear APT::Update::Post-Invoke;
#clear APT::Update::Post-Invoke-Success;
#clear DPkg::Pre-Invoke;
#clear DPkg::Post-Invoke;
#clear DPkg::Pre-Install-Pkgs;
EOF
apt_private=(
    -c "$APT/etc/apt.conf"
    -o APT::Architecture=arm64
    -o APT::Architectures::=arm64
    -o Dir::Etc::SourceList="$APT/etc/sources.list"
    -o Dir::Etc::SourceParts="$APT/etc/sources.list.d"
    -o Dir::Etc::Preferences="$APT/etc/preferences"
    -o Dir::Etc::PreferencesParts="$APT/etc/preferences.d"
    -o Dir::State="$APT/state"
    -o Dir::State::Lists="$APT/lists"
    -o Dir::State::status="$APT/state/status"
    -o Dir::Cache="$APT/cache"
    -o Dir::Cache::pkgcache="$APT/cache/pkgcache.bin"
    -o Dir::Cache::srcpkgcache="$APT/cache/srcpkgcache.bin"
    -o APT::Sandbox::User=root
    -o Acquire::Languages=none
)
apt-get "${apt_private[@]}" update -qq >&2
(cd "$APT/debs" && apt-get "${apt_private[@]}" download -qq "${PACKAGES[@]/%/:arm64}" >&2)

part="$SYSROOT.part$$"
rm -rf "$part"
mkdir -p "$part"
for deb in "$APT"/debs/*.deb; do
    dpkg -x "$deb" "$part"
done
# not needed to build against or to run: docs, man pages, the static libpython
rm -rf "$part"/usr/share/{doc,man,lintian}
find "$part" -name 'libpython3.11*.a' -delete
# qemu-user shows the guest the host's /proc/cpuinfo unless the -L prefix has one; an x86
# cpuinfo makes ARM cpu-feature parsers (cpuinfo/XNNPACK) misbehave, so give it a Pi 4's.
mkdir -p "$part/proc"
{
    for i in 0 1 2 3; do
        printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: c03111\nSerial\t\t: 10000000a1b2c3d4\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n'
} >"$part/proc/cpuinfo"

# check: the interpreter starts and the stdlib's native modules load
qemu-aarch64-static -cpu cortex-a72 -L "$part" "$part/usr/bin/python3.11" -s -c \
    "import ssl, sqlite3, ctypes, json, zlib, hashlib, uuid, decimal, lzma, bz2, readline; \
     assert ctypes.sizeof(ctypes.c_void_p) == 8; print('aarch64_env: python', __import__('sys').version.split()[0], __import__('platform').machine())" >&2
[ -f "$part/usr/include/python3.11/Python.h" ] \
    && [ -f "$part/usr/include/aarch64-linux-gnu/python3.11/pyconfig.h" ] \
    || { log "Python headers missing from the sysroot"; exit 1; }

touch "$part/.toma-sysroot-$key"
rm -rf "$SYSROOT"
mv "$part" "$SYSROOT"
rm -rf "$APT"  # the package lists and .debs (~100 MB) are not needed any more
log "sysroot $(du -sh "$SYSROOT" | cut -f1)"
echo "$SYSROOT"
