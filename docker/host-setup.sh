#!/bin/sh
# Prepare a Debian host with no container registry for `make docker-e2e` (run as root).
#
# 1. Installs docker.io, docker-compose and debootstrap from Debian when missing.
# 2. Starts dockerd with --iptables=false when no daemon answers. With iptables on, Docker sets
#    the FORWARD policy to DROP, which breaks the network-namespace tests (examples/multihost.py).
# 3. Picks the base image: python:3.11-slim when it is present or can be pulled; otherwise a
#    stand-in built with debootstrap (Debian bookworm ships Python 3.11) and `docker import`,
#    with this host's CA bundle so pip inside the build trusts what pip on the host trusts.
# 4. Copies a local torch CPU wheel from pip's find-links into docker/wheels/ (the Dockerfile
#    installs it from there; without one it uses PyTorch's CPU index).
#
# Prints the base image to use on stdout; everything else goes to stderr.
set -eu

BASE_IMAGE=${FEDGRPC_BASE_IMAGE:-python:3.11-slim}
STANDIN=${FEDGRPC_STANDIN_IMAGE:-fedgrpc-base:bookworm}
DOCKERD_LOG=${FEDGRPC_DOCKERD_LOG:-/var/log/fedgrpc-dockerd.log}
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

say() { echo "docker-e2e: $*" >&2; }

have_compose() { docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; }

if ! command -v docker >/dev/null 2>&1 || ! command -v dockerd >/dev/null 2>&1 || ! have_compose \
    || ! command -v debootstrap >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || { say "Docker is missing and this is not root: install Docker Engine" \
        "with the compose plugin, or run as root on Debian"; exit 1; }
    say "installing docker.io docker-compose debootstrap"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >&2
fi

if ! docker info >/dev/null 2>&1; then
    say "starting dockerd --iptables=false (log: $DOCKERD_LOG)"
    setsid nohup dockerd --iptables=false >"$DOCKERD_LOG" 2>&1 </dev/null &
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -le 120 ] || { say "dockerd did not answer within 60 s; see $DOCKERD_LOG"; exit 1; }
        sleep 0.5  # polling the daemon's socket; there is nothing to wait on
    done
elif ! pgrep -a dockerd | grep -q -- '--iptables=false'; then
    say "note: dockerd was already running without --iptables=false (FORWARD policy: " \
        "$(iptables -S FORWARD 2>/dev/null | head -n 1))"
fi

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    :
elif timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "pulled $BASE_IMAGE"
elif docker image inspect "$STANDIN" >/dev/null 2>&1; then
    say "$BASE_IMAGE cannot be pulled; using the local stand-in $STANDIN"
    BASE_IMAGE=$STANDIN
else
    say "$BASE_IMAGE cannot be pulled; building the stand-in $STANDIN with debootstrap (minutes)"
    root=$(mktemp -d /var/tmp/fedgrpc-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" http://deb.debian.org/debian >&2
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | docker import - "$STANDIN" >&2
    BASE_IMAGE=$STANDIN
fi

# A torch CPU wheel on this host's pip find-links (none on most machines: fine).
version=$(sed -n 's/^torch==//p' "$HERE/../constraints.txt")
links=$("$PYTHON" -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*find-links='\(.*\)'$/\1/p")
for dir in $links; do
    for wheel in "$dir"/torch-"$version"+cpu-cp311-cp311-*linux*_x86_64.whl; do
        [ -f "$wheel" ] || continue
        if ! cmp -s "$wheel" "$HERE/wheels/$(basename "$wheel")"; then
            say "torch wheel for the image: $wheel"
            cp "$wheel" "$HERE/wheels/"
        fi
    done
done

echo "$BASE_IMAGE"
