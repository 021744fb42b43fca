#!/bin/sh
# Prepare a Debian host with no container registry for `make docker-e2e` (run as root).
#
# 1. Installs docker.io, docker-compose and debootstrap from Debian when missing.
# 2. Starts a Docker daemon of the test's own, beside whatever daemon the host runs and without
#    touching it: own socket ($FEDGRPC_DOCKER_HOST, unix:///run/fedgrpc-docker/docker.sock by
#    default),
#    data root, exec root, pid file and containerd namespace, and no default bridge (compose
#    makes its own networks; the image builds on the host network). It runs with
#    --iptables=false: with iptables on, Docker sets the FORWARD policy to DROP, which would
#    break the network-namespace tests (examples/multihost.py) and change every other
#    container's traffic on the host.
# 3. Picks the base image: python:3.11-slim when it is present or can be pulled; otherwise a
#    stand-in built with debootstrap (Debian bookworm ships Python 3.11) and `docker import`,
#    from this host's own Debian mirror (its apt sources; debootstrap's default without one),
#    with this host's CA bundle so pip inside the build trusts what pip on the host trusts.
# 4. Copies a local torch CPU wheel from pip's find-links into docker/wheels/ (the Dockerfile
#    installs it from there; without one it uses PyTorch's CPU index).
#
# Prints the base image to use on stdout; everything else goes to stderr. Every docker call
# (here, compose's and the test's) goes to that socket: the script exports it as DOCKER_HOST,
# and the Makefile passes the same value to the test.
# `host-setup.sh --mirror` only prints the Debian mirror debootstrap would use (empty: its
# default); FEDGRPC_APT_DIR (/etc/apt) is where the apt sources are read.
set -eu

BASE_IMAGE=${FEDGRPC_BASE_IMAGE:-python:3.11-slim}
STANDIN=${FEDGRPC_STANDIN_IMAGE:-fedgrpc-base:bookworm}
APT_DIR=${FEDGRPC_APT_DIR:-/etc/apt}
# The daemon's own files: nothing here is shared with a daemon the host already runs.
RUN_DIR=${FEDGRPC_DOCKER_RUN:-/run/fedgrpc-docker}
DATA_ROOT=${FEDGRPC_DOCKER_ROOT:-/var/lib/fedgrpc-docker}
DOCKERD_LOG=${FEDGRPC_DOCKERD_LOG:-/var/log/fedgrpc-dockerd.log}
DOCKER_HOST=${FEDGRPC_DOCKER_HOST:-unix://$RUN_DIR/docker.sock}
export DOCKER_HOST
HERE=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python3}

say() { echo "docker-e2e: $*" >&2; }

# "URI SUITE" for every `deb` entry of this host's apt sources: one-line sources.list files
# (options in [...] skipped) and deb822 *.sources files (every URI times every suite).
apt_entries() {
    for f in "$APT_DIR/sources.list" "$APT_DIR"/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk '$1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
            print $i, $(i + 1)
        }' "$f"
    done
    for f in "$APT_DIR"/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk 'function flush(   n, m, i, j, u, s) {
                if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
                    n = split(uris, u, /[ \t]+/); m = split(suites, s, /[ \t]+/)
                    for (i = 1; i <= n; i++) for (j = 1; j <= m; j++)
                        if (u[i] != "" && s[j] != "") print u[i], s[j]
                }
                types = uris = suites = enabled = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:" { sub(/^[^:]*:[ \t]*/, ""); types = $0 }
            tolower($1) == "uris:" { sub(/^[^:]*:[ \t]*/, ""); uris = $0 }
            tolower($1) == "suites:" { sub(/^[^:]*:[ \t]*/, ""); suites = $0 }
            tolower($1) == "enabled:" { sub(/^[^:]*:[ \t]*/, ""); enabled = tolower($0) }
            END { flush() }' "$f"
    done
}

# The first Debian archive (a release suite, not security or updates) this host installs from:
# a local mirror or an apt proxy works for debootstrap too. Empty when the host has none (an
# Ubuntu host, say); debootstrap then uses its own default.
host_mirror() {
    apt_entries | awk '
        $1 !~ /security/ &&
        $2 ~ /^(oldoldstable|oldstable|stable|testing|unstable|sid|bullseye|bookworm|trixie|forky)$/ {
            print $1; exit
        }'
}

if [ "${1:-}" = "--mirror" ]; then
    host_mirror
    exit 0
fi

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
    case $DOCKER_HOST in
        unix://*) socket=${DOCKER_HOST#unix://} ;;
        *) say "DOCKER_HOST=$DOCKER_HOST does not answer and is no local socket to start"; exit 1 ;;
    esac
    [ "$(id -u)" = 0 ] || { say "starting the test's dockerd needs root"; exit 1; }
    mkdir -p "$RUN_DIR" "$DATA_ROOT" "$(dirname "$socket")"
    say "starting the test's own dockerd on $DOCKER_HOST (log: $DOCKERD_LOG; the host's" \
        "daemon, if any, is left alone)"
    setsid nohup dockerd \
        --host "unix://$socket" \
        --data-root "$DATA_ROOT" \
        --exec-root "$RUN_DIR/exec" \
        --pidfile "$RUN_DIR/dockerd.pid" \
        --containerd-namespace fedgrpc-e2e \
        --containerd-plugins-namespace fedgrpc-e2e-plugins \
        --bridge none \
        --iptables=false \
        >"$DOCKERD_LOG" 2>&1 </dev/null &
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -le 120 ] || { say "dockerd did not answer within 60 s; see $DOCKERD_LOG"; exit 1; }
        sleep 0.5  # polling the daemon's socket; there is nothing to wait on
    done
    say "dockerd pid $(cat "$RUN_DIR/dockerd.pid"); stop it with: kill \$(cat $RUN_DIR/dockerd.pid)"
fi

if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    :
elif timeout 60 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    say "pulled $BASE_IMAGE"
elif docker image inspect "$STANDIN" >/dev/null 2>&1; then
    say "$BASE_IMAGE cannot be pulled; using the local stand-in $STANDIN"
    BASE_IMAGE=$STANDIN
else
    mirror=$(host_mirror)
    say "$BASE_IMAGE cannot be pulled; building the stand-in $STANDIN with debootstrap" \
        "(minutes) from ${mirror:-debootstrap's default mirror}"
    root=$(mktemp -d /var/tmp/fedgrpc-rootfs.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    # $mirror unquoted on purpose: empty means no argument, i.e. debootstrap's default.
    # shellcheck disable=SC2086
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$root" $mirror >&2
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
