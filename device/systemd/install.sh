#!/bin/sh
# Install toma-edge as a systemd service on Raspberry Pi OS (Debian), as root:
#   sudo sh install.sh rpi4-wheels/toma_edge-0.1.0-py3-none-any.whl dist/rpi4 [--args "--http 0.0.0.0:8080 ..."]
# With the wheel in the folder `toma-edge wheels --target rpi` wrote, everything installs
# from that folder alone (no index, no compiler, no torch).
# Creates the user toma-edge, a venv in /opt/toma-edge/venv with the wheel, copies the bundle
# to /var/lib/toma-edge/releases/<version> and points /var/lib/toma-edge/current at it,
# makes an admin token (/etc/toma-edge/admin-token) if there is none, installs the unit
# with MemoryMax = the bundle target's inference budget, and (re)starts the service.
# Run it again with a newer bundle to install a release: the running service reloads it
# (SIGHUP: verified and warmed up first; a bad bundle is refused, the old one keeps serving).
set -eu

usage() { echo "usage: $0 WHEEL BUNDLE_DIR [--args \"serve flags\"]" >&2; exit 2; }
[ $# -ge 2 ] || usage
WHEEL=$1; BUNDLE=$2; shift 2
ARGS=""
if [ $# -ge 2 ] && [ "$1" = "--args" ]; then ARGS=$2; shift 2; fi
[ $# -eq 0 ] || usage
[ "$(id -u)" -eq 0 ] || { echo "error: run as root (sudo)" >&2; exit 2; }
[ -f "$WHEEL" ] || { echo "error: no wheel at $WHEEL; build it with: python -m build --wheel" >&2; exit 2; }
[ -f "$BUNDLE/manifest.json" ] || { echo "error: $BUNDLE is not a bundle (no manifest.json); build one with toma-edge build" >&2; exit 2; }

HERE=$(cd "$(dirname "$0")" && pwd)
PREFIX=/opt/toma-edge
STATE=/var/lib/toma-edge
ETC=/etc/toma-edge
PY=${PYTHON:-python3}

command -v "$PY" >/dev/null || { echo "error: $PY not found; apt-get install python3 python3-venv" >&2; exit 2; }
"$PY" -c 'import venv' 2>/dev/null || { echo "error: python3-venv missing; apt-get install python3-venv" >&2; exit 2; }

getent group toma-edge >/dev/null || groupadd --system toma-edge
id toma-edge >/dev/null 2>&1 || useradd --system --gid toma-edge --home-dir "$STATE" \
    --no-create-home --shell /usr/sbin/nologin toma-edge
install -d -o root -g root -m 755 "$PREFIX"
install -d -o toma-edge -g toma-edge -m 750 "$STATE" "$STATE/releases"
install -d -o root -g toma-edge -m 750 "$ETC"

# the venv and the wheel: the plain (device) install, no torch or executorch package
[ -x "$PREFIX/venv/bin/python" ] || "$PY" -m venv "$PREFIX/venv"
WHEELS=$(cd "$(dirname "$WHEEL")" && pwd)
if ls "$WHEELS"/toma_edge_native-*.whl >/dev/null 2>&1; then
    "$PREFIX/venv/bin/pip" install --upgrade --quiet --no-index --find-links "$WHEELS" "$WHEEL"
else
    "$PREFIX/venv/bin/pip" install --upgrade --quiet --find-links "$WHEELS" "$WHEEL"
fi

# the release: releases/<version>, then an atomic switch of `current`
read_manifest() { "$PREFIX/venv/bin/python" -c "import json,sys; m=json.load(open(sys.argv[1])); print($1)" "$BUNDLE/manifest.json"; }
VERSION=$(read_manifest 'm["version"]')
BUDGET=$(read_manifest 'm["target"]["memory_budget_bytes"]')
case $VERSION in */*|.*|"") echo "error: bundle version '$VERSION' cannot be a folder name" >&2; exit 2;; esac
"$PREFIX/venv/bin/toma-edge" inspect "$BUNDLE" >/dev/null   # hashes (and schema) before copying
REL="$STATE/releases/$VERSION"
if [ ! -d "$REL" ]; then
    TMP="$STATE/releases/.$VERSION.tmp"
    rm -rf "$TMP"; cp -r "$BUNDLE" "$TMP"; chown -R toma-edge:toma-edge "$TMP"; mv "$TMP" "$REL"
fi
ln -sfn "$REL" "$STATE/current.new" && mv -T "$STATE/current.new" "$STATE/current"

# admin token for POST /v1/model, and the serve flags
if [ ! -s "$ETC/admin-token" ]; then
    umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$ETC/admin-token"
    chown root:toma-edge "$ETC/admin-token"; chmod 640 "$ETC/admin-token"
fi
if [ -n "$ARGS" ] || [ ! -f "$ETC/serve.env" ]; then
    umask 077; printf 'TOMA_EDGE_ARGS=%s\n' "${ARGS:---http 127.0.0.1:8080}" > "$ETC/serve.env"
    chown root:toma-edge "$ETC/serve.env"; chmod 640 "$ETC/serve.env"
fi

# the unit, its memory cap = the target's inference budget (bytes)
sed "s/^MemoryMax=.*/MemoryMax=$BUDGET/" "$HERE/toma-edge.service" > /etc/systemd/system/toma-edge.service
systemctl daemon-reload
systemctl enable toma-edge >/dev/null
if systemctl is-active --quiet toma-edge; then
    systemctl reload toma-edge
    echo "toma-edge: release $VERSION installed; the running service reloads it (journalctl -u toma-edge)"
else
    systemctl start toma-edge
    echo "toma-edge: started with release $VERSION (MemoryMax=$BUDGET bytes); curl localhost:8080/healthz"
fi
