#!/bin/bash
# Shared by every image: a Python venv in /opt/venv with pinned packages, and the app user.
#
#   install-python.sh [-r REQUIREMENTS_FILE] REQUIREMENT...
#
# REQUIREMENT: pip specs, e.g. "flwr==1.41.0" or "$TORCH_SPEC"; -r adds the lines of a
# requirements file (docker/requirements.txt: fedsd's dependencies; the project itself is
# installed later, so that a code change does not reinstall torch).
#
# Works on Debian and Ubuntu bases (debian:bookworm-slim, nvidia/cuda:*-ubuntu24.04, the
# CI base from debootstrap): python3 and its venv module come from apt only when the base
# lacks them. Every package is pinned by docker/constraints.txt; torch by TORCH_SPEC
# (a build argument). Empty pip settings from build arguments are dropped, not passed on.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for var in PIP_CERT PIP_FIND_LINKS PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    if [ -z "${!var:-}" ]; then unset "$var"; fi
done

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
    rm -rf /var/lib/apt/lists/*
fi
python3 -m venv /opt/venv
reqs=()
while [ $# -gt 0 ]; do
    case $1 in
    -r)
        mapfile -t deps < <(grep -v -E '^\s*(#|$)' "$2")
        reqs+=("${deps[@]}")
        shift 2
        ;;
    *)
        reqs+=("$1")
        shift
        ;;
    esac
done
# torch first, all its specs together: TORCH_SPEC (e.g. torch==2.13.0+cpu) and pyproject's
# torch==2.13.0 must agree, and with the rest pip must not pick another torch build.
torch=()
rest=()
for r in "${reqs[@]}"; do
    case $r in torch==* | torch\ * | torch) torch+=("$r") ;; *) rest+=("$r") ;; esac
done
pip=(/opt/venv/bin/python -m pip install -q --no-cache-dir --constraint "$here/constraints.txt")
if [ ${#torch[@]} -gt 0 ]; then "${pip[@]}" "${torch[@]}"; fi
"${pip[@]}" "${rest[@]}"
# The bytecode pip compiled stays: read-only containers could not write it, and every
# process would compile torch's modules again. (pip itself is removed by each Dockerfile's
# last install step: nothing installs packages into a running container.)

# The app user: fixed uid (host volumes are made writable for it) and a writable Flower home.
uid=${APP_UID:-10001}
if ! getent passwd app >/dev/null; then
    groupadd --gid "$uid" app
    useradd --uid "$uid" --gid "$uid" --home-dir /home/app --create-home --shell /usr/sbin/nologin app
fi
chown app:app /home/app  # a WORKDIR instruction may have created it as root
install -d -o app -g app -m 0750 /home/app/.flwr
