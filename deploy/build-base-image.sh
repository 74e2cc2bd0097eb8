#!/usr/bin/env bash
# Make sure the Dockerfile's base image (python:3.11-slim) exists in the local Docker engine.
#
#   deploy/build-base-image.sh            # present -> nothing to do; else pull; else build it
#
# 1. `docker image inspect python:3.11-slim` succeeds: done.
# 2. `docker pull python:3.11-slim` succeeds (a registry is reachable): done.
# 3. Otherwise (no image registry, as on the CI machines) build a stand-in from Debian packages:
#    debootstrap a minimal bookworm (its python3 is 3.11) with python3-venv and pip, copy this
#    host's CA bundle in (pip inside a build needs the certificates the host trusts), and
#    `docker import` it under the same tag. The Dockerfile only assumes `python3 -m venv` works,
#    so it builds on the official image and on this one alike.
#
# Needs root, docker and (for step 3) debootstrap. Environment:
#   BASE_IMAGE        tag to provide (default python:3.11-slim)
#   DEBIAN_SUITE      suite to bootstrap (default bookworm: python 3.11)
#   DEBIAN_MIRROR     mirror for debootstrap (default: debootstrap's own default)
#   PULL_TIMEOUT      seconds to give `docker pull` before building instead (default 60)
#   FORCE_BUILD=1     skip 1 and 2: always rebuild from Debian packages
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-}
PULL_TIMEOUT=${PULL_TIMEOUT:-60}
FORCE_BUILD=${FORCE_BUILD:-0}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

log() { echo "== build-base-image: $*" >&2; }
die() { echo "build-base-image: ERROR: $*" >&2; exit 1; }

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running?)"

if [ "$FORCE_BUILD" != 1 ]; then
    if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        log "$BASE_IMAGE is present"
        exit 0
    fi
    log "pulling $BASE_IMAGE (at most ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" docker pull "$BASE_IMAGE" >&2; then
        log "pulled $BASE_IMAGE"
        exit 0
    fi
    log "no registry answered: building $BASE_IMAGE from Debian $DEBIAN_SUITE packages"
fi

[ "$(id -u)" = 0 ] || die "debootstrap needs root"
command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install -y debootstrap)"
[ -s "$CA_BUNDLE" ] || die "no CA bundle at $CA_BUNDLE"

ROOTFS=$(mktemp -d /tmp/ps-base-rootfs.XXXXXX)
cleanup() { rm -rf --one-file-system "$ROOTFS"; }
trap cleanup EXIT

start=$(date +%s)
# shellcheck disable=SC2086  # an empty mirror must vanish, not become ""
debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$DEBIAN_SUITE" "$ROOTFS" $DEBIAN_MIRROR >/tmp/ps-base-debootstrap.log 2>&1 \
    || { tail -n 30 /tmp/ps-base-debootstrap.log >&2; die "debootstrap failed (log: /tmp/ps-base-debootstrap.log)"; }

install -m 0644 "$CA_BUNDLE" "$ROOTFS/etc/ssl/certs/ca-certificates.crt"
# Slim it like the official image: no package caches, lists, docs or man pages.
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* 2>/dev/null || true
# What the official image sets (LANG, CMD); PATH is the Debian default, so python3 is /usr/bin/python3.
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change "LABEL org.opencontainers.image.description=\"$BASE_IMAGE stand-in: Debian $DEBIAN_SUITE python3, by deploy/build-base-image.sh\"" \
    --change 'CMD ["python3"]' \
    - "$BASE_IMAGE" >/dev/null

docker run --rm "$BASE_IMAGE" python3 -c 'import sys, venv, ensurepip; assert sys.version_info[:2] >= (3, 11), sys.version' \
    || die "the imported $BASE_IMAGE has no usable python3 >= 3.11"
log "built $BASE_IMAGE from Debian $DEBIAN_SUITE in $(( $(date +%s) - start ))s ($(docker image inspect -f '{{.Size}}' "$BASE_IMAGE" | awk '{printf "%d MB", $1/1e6}'))"
