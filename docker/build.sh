#!/usr/bin/env bash
# Build the images with podman (or docker), CPU variant by default for CI:
#
#   docker/build.sh [--tag TAG] [--cuda] [SERVICE...]   SERVICE: superlink supernode serverapp fleet-proxy
#
# CI variant (default): base localhost/fedsd-base:bookworm (docker/ci-setup.sh makes it),
# torch==2.13.0+cpu from the local wheel directory that pip's configuration on these
# machines names (PIP_FIND_LINKS / pip config find-links), pip trusting the host's CA
# bundle. Both are bind-mounted into the build (podman build --volume). --cuda builds
# what compose.yaml builds (the SuperNode on Debian with PyPI's CUDA torch, the rest from
# the Dockerfiles' defaults) with docker or podman, which needs a registry or, for the base,
# FEDSD_CUDA_BASE (e.g. localhost/fedsd-base:bookworm, as built here: 345 s, 6.1 GB).
#
# supernode and serverapp are the two targets of services/app/Dockerfile; the others have
# services/<name>/Dockerfile.
#
# Prints one line per image: name, seconds, size in bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${FEDSD_IMAGE_TAG:-ci}
cuda=0
services=()
while [ $# -gt 0 ]; do
    case $1 in
    --tag) tag=$2; shift 2 ;;
    --cuda) cuda=1; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) services+=("$1"); shift ;;
    esac
done
[ ${#services[@]} -gt 0 ] || services=(superlink supernode serverapp fleet-proxy)
engine=${FEDSD_ENGINE:-$(command -v podman >/dev/null && echo podman || echo docker)}

args=()
ca=${FEDSD_HOST_CA:-/etc/ssl/certs/ca-certificates.crt}
if [ -r "$ca" ]; then  # pip in the build trusts what the host trusts (a proxy's CA)
    args+=(--volume "$ca:/run/host-ca.crt:ro" --build-arg PIP_CERT=/run/host-ca.crt)
fi
if [ "$cuda" = 0 ]; then
    base=${FEDSD_BASE_IMAGE:-localhost/fedsd-base:bookworm}
    args+=(--build-arg "BASE_IMAGE=$base" --build-arg "TORCH_SPEC=${FEDSD_TORCH_SPEC:-torch==2.13.0+cpu}"
        --build-arg PIP_EXTRA_INDEX_URL=)
    links=${FEDSD_WHEELS:-$(pip config get global.find-links 2>/dev/null || true)}
    links=${links:-${PIP_FIND_LINKS:-}}
    if [ -n "$links" ] && [ -d "$links" ]; then
        args+=(--volume "$links:/run/wheels:ro" --build-arg PIP_FIND_LINKS=/run/wheels)
    fi
fi
[ "$engine" = podman ] && args+=(--format docker)
# What the images copy from the build context (finish-image.sh): a changed file must
# invalidate the cached layer, which a bind mount alone does not.
digest=$(find pyproject.toml fedsd docker services -type f ! -name "*.pyc" -print0 | sort -z \
    | xargs -0 sha256sum | sha256sum | cut -c1-16)
args+=(--build-arg "SOURCE_DIGEST=$digest")

for svc in "${services[@]}"; do
    image=localhost/fedsd-$svc:$tag
    case $svc in
    supernode | serverapp) file=(-f services/app/Dockerfile --target "$svc") ;;
    *) file=(-f "services/$svc/Dockerfile") ;;
    esac
    if [ "$cuda" = 1 ] && [ "$svc" = supernode ]; then
        file+=(--build-arg "BASE_IMAGE=${FEDSD_CUDA_BASE:-debian:bookworm-slim}"
            --build-arg "TORCH_SPEC=${FEDSD_TORCH_SPEC:-torch==2.13.0}" --build-arg PIP_EXTRA_INDEX_URL=)
    fi
    start=$(date +%s)
    log=${TMPDIR:-/tmp}/fedsd-build-$svc.log
    if ! "$engine" build "${file[@]}" -t "$image" "${args[@]}" . >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "build of $image failed; full log: $log" >&2
        exit 1
    fi
    size=$("$engine" image inspect -f '{{.Size}}' "$image")
    echo "$image $(($(date +%s) - start))s ${size}B"
done
