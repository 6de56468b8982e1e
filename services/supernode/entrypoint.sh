#!/bin/bash
# SuperNode container: `supernode [EXTRA FLAGS]` (default), `health`, or any command.
#
# Environment (defaults in brackets):
#   SUPERLINK_ADDRESS      the SuperLink's Fleet API as host:port [superlink:9092]; in
#                          compose.yaml the fleet proxy, which passes only Fleet paths
#   FEDSD_CA_CERT          CA certificate that signed the SuperLink's [$FEDSD_CERTS/ca.crt]
#   FEDSD_NODE_KEY         this node's auth private key [/run/fedsd/node-key]
#   FEDSD_NODE_INDEX       partition-id of this node [0]; FEDSD_NUM_NODES [1]
#   FEDSD_SHARD_DIR        the node's shard, mounted read-only [/data/shard]
#   FEDSD_CACHE_DIR        latent cache and DP ledgers, writable [/data/cache]
#   FEDSD_NODE_CONFIG      extra node-config pairs, e.g. 'device="cuda:0"' []
#   FEDSD_TRUSTED_APPS     the apps this node runs (node config trusted-apps, unless
#                          FEDSD_NODE_CONFIG sets it): FAB SHA-256 hashes (`fedsd
#                          app-hash`) and/or self, the FAB of this image's own app in
#                          FEDSD_APP_DIR [self]; see fedsd/deploy/pinning.py
#   FEDSD_APP_DIR          this image's copy of the app [/app]
#   SUPERNODE_HOST         where the SuperNode's own Runtime API listens [127.0.0.1];
#                          0.0.0.0 in Kubernetes, whose probes dial the pod IP
#   SUPERNODE_PORT         the SuperNode's own Runtime API port [9094]
#   SUPERNODE_HEALTH_PORT  gRPC health server on 127.0.0.1 [9095]
#   FEDSD_WARM_START       1: fork ClientApps from a launcher with torch imported [1]
#   FEDSD_METRICS_PORT     the node's metrics exporter (off when empty or 0) []; and
#   FEDSD_METRICS_HOST     its address [0.0.0.0]: see docker/supervise.sh
set -euo pipefail
# shellcheck source=docker/supervise.sh
. /opt/fedsd/supervise.sh

case ${1:-supernode} in
supernode)
    shift || true
    ca=${FEDSD_CA_CERT:-${FEDSD_CERTS:-/certs}/ca.crt}
    key=${FEDSD_NODE_KEY:-/run/fedsd/node-key}
    shard=${FEDSD_SHARD_DIR:-/data/shard}
    cache=${FEDSD_CACHE_DIR:-/data/cache}
    require_file "$ca" "CA certificate"
    require_file "$key" "node key"
    require_file "$shard/train/metadata.jsonl" "shard (fedsd shards --out DIR writes DIR/shard-<i>/):"
    mkdir -p "$cache"
    trusted=${FEDSD_TRUSTED_APPS:-self}
    if [[ ! $trusted =~ ^[0-9A-Za-z,[:space:]]+$ ]]; then
        echo "entrypoint.sh: FEDSD_TRUSTED_APPS='$trusted': want SHA-256 hashes and/or self" >&2
        exit 78
    fi
    # Every ClientApp passes the app check (fedsd.deploy.pinning): the image's flwr-clientapp is
    # the guarded one, and self is the FAB of this image's /app.
    export FEDSD_APP_DIR=${FEDSD_APP_DIR:-/app}
    config="partition-id=${FEDSD_NODE_INDEX:-0} num-partitions=${FEDSD_NUM_NODES:-1}"
    config+=" shard-dir=\"$shard\" cache-dir=\"$cache\""
    if [[ ${FEDSD_NODE_CONFIG:-} != *trusted-apps=* ]]; then  # a key twice: Flower refuses
        config+=" trusted-apps=\"$trusted\""
    fi
    config+=" ${FEDSD_NODE_CONFIG:-}"
    # Flower's flower-supernode with paced waits (fedsd/deploy/supernode.py), same flags
    supervise flwr-clientapp python -m fedsd.deploy.supernode \
        --superlink "${SUPERLINK_ADDRESS:-superlink:9092}" \
        --root-certificates "$ca" \
        --auth-supernode-private-key "$key" \
        --isolation subprocess \
        --host "${SUPERNODE_HOST:-127.0.0.1}" \
        --port "${SUPERNODE_PORT:-9094}" \
        --health-server-address "127.0.0.1:${SUPERNODE_HEALTH_PORT:-9095}" \
        --node-config "$config" \
        "$@"
    ;;
health)
    exec python -m fedsd.deploy.containers.healthcheck grpc "127.0.0.1:${SUPERNODE_HEALTH_PORT:-9095}"
    ;;
*)
    exec "$@"
    ;;
esac
