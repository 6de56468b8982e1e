#!/bin/bash
# ServerApp image: `superexec [EXTRA FLAGS]` (default), `certs`, `launch`,
# `superlink-exporter`, `health`, `metrics-health`, or any command.
#
#   superexec  flower-superexec for ServerApps: polls the SuperLink's Runtime API and starts
#              one ServerApp process per run (forked from a warm launcher, FEDSD_WARM_START)
#   certs      fedsd certs --out $FEDSD_CERTS --nodes $FEDSD_NUM_NODES [--host H ...
#              from FEDSD_CERT_HOSTS], then each consumer's part in its own folder (so a
#              container mounts only what it needs): superlink/ (ca.crt, superlink.crt,
#              superlink.key), superexec/ (superexec-auth: the SuperLink's and the
#              SuperExec's shared secret), node-<i>/ (ca.crt, node-key), public/ (ca.crt,
#              nodes/node-<i>.pub). As root it hands the files to APP_UID (10001).
#   k8s-certs  the Kubernetes certs Job: create the Secrets fedsd-tls, fedsd-ca,
#              fedsd-node-keys, fedsd-node-pubkeys when missing
#              (fedsd/deploy/containers/k8s_certs.py)
#   superlink-exporter
#              fedsd superlink-exporter: the SuperLink's health, nodes and runs (asked over
#              its Control API with the CA) as Prometheus metrics on
#              FEDSD_METRICS_HOST:FEDSD_METRICS_PORT [0.0.0.0:9400], every
#              FEDSD_PROBE_INTERVAL seconds [10]
#   launch register|run
#              register the node keys / flwr run --stream and exit with the run's status
#              (fedsd/deploy/containers/launch.py; settings from FEDSD_* variables, see there)
#
# Environment: SUPERLINK_ADDRESS (Runtime/Control API, host:port) [superlink:9092],
# FEDSD_CERTS [/certs], FEDSD_CA_CERT [$FEDSD_CERTS/ca.crt], SUPEREXEC_HEALTH_PORT [9096],
# FEDSD_SUPEREXEC_SECRET (superexec: the secret the SuperLink was started with; without
# it the SuperLink refuses every task) [/run/secrets/fedsd/superexec-auth],
# FEDSD_METRICS_PORT (superexec: the ServerApp's metrics exporter, off when empty or 0;
# see docker/supervise.sh).
set -euo pipefail
# shellcheck source=docker/supervise.sh
. /opt/fedsd/supervise.sh
certs=${FEDSD_CERTS:-/certs}
ca=${FEDSD_CA_CERT:-$certs/ca.crt}
secret=${FEDSD_SUPEREXEC_SECRET:-/run/secrets/fedsd/superexec-auth}

case ${1:-superexec} in
superexec)
    shift || true
    require_file "$ca" "CA certificate"
    require_file "$secret" "SuperExec secret (made by fedsd certs or the certs Job)"
    supervise flwr-serverapp flower-superexec \
        --runtime-api-address "${SUPERLINK_ADDRESS:-superlink:9092}" \
        --root-certificates "$ca" \
        --superexec-auth-secret-file "$secret" \
        --health-server-address "127.0.0.1:${SUPEREXEC_HEALTH_PORT:-9096}" \
        "$@"
    ;;
certs)
    shift
    hosts=()
    for h in ${FEDSD_CERT_HOSTS:-}; do hosts+=(--host "$h"); done
    nodes=${FEDSD_NUM_NODES:-2}
    fedsd certs --out "$certs" --nodes "$nodes" "${hosts[@]}" "$@"
    umask 022
    install -d "$certs/superlink" "$certs/public/nodes"
    install -m 0644 "$certs/ca.crt" "$certs/superlink.crt" "$certs/superlink/"
    install -m 0600 "$certs/superlink.key" "$certs/superlink/"
    install -d -m 0700 "$certs/superexec"
    install -m 0600 "$certs/superexec-auth.secret" "$certs/superexec/superexec-auth"
    install -m 0644 "$certs/ca.crt" "$certs/public/"
    for ((i = 0; i < nodes; i++)); do
        install -d "$certs/node-$i"
        install -m 0644 "$certs/ca.crt" "$certs/node-$i/ca.crt"
        install -m 0600 "$certs/nodes/node-$i" "$certs/node-$i/node-key"
        install -m 0644 "$certs/nodes/node-$i.pub" "$certs/public/nodes/"
    done
    if [ "$(id -u)" = 0 ]; then
        chown -R "${APP_UID:-10001}:${APP_UID:-10001}" "$certs"
    fi
    echo "certs: $certs/superlink, $certs/superexec, $certs/public and" \
        "$certs/node-0..$((nodes - 1)) ready"
    ;;
launch)
    shift
    exec python -m fedsd.deploy.containers.launch "$@"
    ;;
k8s-certs)
    shift
    exec python -m fedsd.deploy.containers.k8s_certs "$@"
    ;;
superlink-exporter)
    shift
    require_file "$ca" "CA certificate"
    exec fedsd superlink-exporter \
        --port "${FEDSD_METRICS_PORT:-9400}" \
        --host "${FEDSD_METRICS_HOST:-0.0.0.0}" \
        --address "${SUPERLINK_ADDRESS:-superlink:9092}" \
        --root-certificates "$ca" \
        --interval "${FEDSD_PROBE_INTERVAL:-10}" \
        "$@"
    ;;
metrics-health)
    exec python -m fedsd.deploy.containers.healthcheck http \
        "http://127.0.0.1:${FEDSD_METRICS_PORT:-9400}/metrics"
    ;;
health)
    exec python -m fedsd.deploy.containers.healthcheck grpc "127.0.0.1:${SUPEREXEC_HEALTH_PORT:-9096}"
    ;;
*)
    exec "$@"
    ;;
esac
