#!/usr/bin/env bash
# Install everything the test suite needs, then run lint, types and the whole suite.
# Used by the README's second command and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
# the fleet store's PostgreSQL 15, Prometheus for the metrics test, Chromium for the
# dashboard's browser test (driven by Playwright through executable_path, no download)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
# the broker runs from the tests, never as a system service
# (so do PostgreSQL and Prometheus: each test starts its own on a free loopback port)
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now mosquitto postgresql prometheus >/dev/null 2>&1 || true
fi

# the aarch64 test's cross compiler, qemu-user and arm64 Python sysroot (apt-get; cached)
bash scripts/aarch64_env.sh >/dev/null

# device/native (toma-edge-native: the torch-free ExecuTorch adapter) is built here with
# scikit-build-core; the main package requires it
python -m pip install -q ./device/native -e ".[test]"

python -m ruff check toma_edge host device tests bench scripts
python -m mypy toma_edge tests
python -m pytest -q -p no:cacheprovider "$@"
