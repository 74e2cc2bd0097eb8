#!/usr/bin/env bash
# The Docker stage of CI: the image, docker-compose.yml and a real cluster (tests/docker).
#
#   bash deploy/ci-docker.sh             # as root; from anywhere
#
# 1. Installs docker.io, docker-compose and debootstrap from Debian when they are missing.
# 2. Starts dockerd when no engine answers, and stops it again on exit (only a dockerd it started).
# 3. Makes sure the base image python:3.11-slim exists (deploy/build-base-image.sh: pull, or build
#    it from Debian packages where no registry is reachable).
# 4. Runs `pytest -m docker tests/docker`: builds the image, a cluster of two servers and 3 then 4
#    workers, two runs trained across both servers.
# Any failure fails the script (non-zero exit, the reason on stderr); nothing is skipped.
#
# Environment: DOCKERD_LOG (default /tmp/ci-docker-dockerd.log), DOCKERD_WAIT_SECONDS (default 60),
# PYTEST_ARGS (extra pytest arguments).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERD_LOG=${DOCKERD_LOG:-/tmp/ci-docker-dockerd.log}
DOCKERD_WAIT_SECONDS=${DOCKERD_WAIT_SECONDS:-60}
VENV=${VENV:-.venv}

T0=$(date +%s)
STEP_T=$T0
STARTED_DOCKERD=0
DOCKERD_PID=""
TIMES=""

log() { echo "== ci-docker: $*"; }
die() { echo "ci-docker: ERROR: $*" >&2; exit 1; }
step_done() {  # record how long the step since the last call took
    local now; now=$(date +%s)
    TIMES="$TIMES $1=$((now - STEP_T))s"
    STEP_T=$now
}

finish() {
    local rc=$?
    if [ "$STARTED_DOCKERD" = 1 ] && kill -0 "$DOCKERD_PID" 2>/dev/null; then
        log "stopping the dockerd this script started (pid $DOCKERD_PID)"
        kill -TERM "$DOCKERD_PID" 2>/dev/null || true
        for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$DOCKERD_PID" 2>/dev/null; then
            echo "ci-docker: dockerd did not stop in 30 s: killing it" >&2
            kill -KILL "$DOCKERD_PID" 2>/dev/null || true
        fi
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    log "durations:${TIMES:- none} total=$(( $(date +%s) - T0 ))s"
    if [ "$rc" != 0 ]; then
        echo "ci-docker: FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

have_compose() {
    { command -v docker >/dev/null && docker compose version >/dev/null 2>&1; } || command -v docker-compose >/dev/null
}

# ---- 1. packages
missing=()
command -v docker >/dev/null || missing+=(docker.io)
command -v dockerd >/dev/null || missing+=(docker.io)
have_compose || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "need root to install ${missing[*]}"
    # shellcheck disable=SC2207  # package names have no spaces
    missing=($(printf '%s\n' "${missing[@]}" | sort -u))
    log "installing ${missing[*]}"
    apt-get update -q || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" || die "apt-get install ${missing[*]} failed"
fi
command -v docker >/dev/null || die "docker is still missing after the install"
have_compose || die "neither 'docker compose' nor docker-compose works after the install"
step_done packages

# ---- 2. the engine
if docker info >/dev/null 2>&1; then
    log "a Docker engine is running: using it"
else
    [ "$(id -u)" = 0 ] || die "no Docker engine answers and starting dockerd needs root"
    command -v dockerd >/dev/null || die "no Docker engine answers and there is no dockerd to start"
    log "starting dockerd (log: $DOCKERD_LOG)"
    dockerd >"$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    STARTED_DOCKERD=1
    deadline=$(( $(date +%s) + DOCKERD_WAIT_SECONDS ))
    until [ -S /var/run/docker.sock ] && docker info >/dev/null 2>&1; do
        if ! kill -0 "$DOCKERD_PID" 2>/dev/null; then
            tail -n 40 "$DOCKERD_LOG" >&2 || true
            die "dockerd exited during start-up (log above)"
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -n 40 "$DOCKERD_LOG" >&2 || true
            die "dockerd did not answer within ${DOCKERD_WAIT_SECONDS}s (log above)"
        fi
        sleep 0.5
    done
    log "dockerd is up (pid $DOCKERD_PID)"
fi
docker version --format 'docker: client {{.Client.Version}}, engine {{.Server.Version}}' || die "docker version failed"
if docker compose version >/dev/null 2>&1; then docker compose version; else docker-compose version --short; fi
step_done engine

# ---- 3. the base image
bash deploy/build-base-image.sh || die "no base image python:3.11-slim"
step_done base_image

# ---- 4. the tests
if [ ! -x "$VENV/bin/pytest" ] || [ ! -x "$VENV/bin/psctl" ]; then
    log "no $VENV with pytest and psctl: creating it (make $VENV/.installed)"
    make "$VENV/.installed" || die "could not create $VENV"
fi
log "running the docker tests"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
"$VENV/bin/pytest" -m docker tests/docker -rA -p no:cacheprovider ${PYTEST_ARGS:-} || die "the docker tests failed"
step_done tests
