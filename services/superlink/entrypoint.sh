#!/bin/bash
# SuperLink container: `superlink [EXTRA FLAGS]` (default), `health`, or any command.
#
# Environment: SUPERLINK_HOST/SUPERLINK_PORT (where Fleet, Control and Runtime API listen:
# one HTTPS port), FEDSD_CERTS (ca.crt, superlink.crt, superlink.key), SUPERLINK_DATABASE
# (state: keep it on a volume, or restarted SuperNodes with auth cannot reconnect),
# FEDSD_SUPEREXEC_SECRET (the secret shared with the ServerApp SuperExec: only a SuperExec
# holding it gets a run's ServerApp task) [/run/secrets/fedsd/superexec-auth].
set -euo pipefail
certs=${FEDSD_CERTS:-/certs}
secret=${FEDSD_SUPEREXEC_SECRET:-/run/secrets/fedsd/superexec-auth}

case ${1:-superlink} in
superlink)
    shift || true
    for f in ca.crt superlink.crt superlink.key; do
        if [ ! -r "$certs/$f" ]; then
            echo "superlink: $certs/$f is missing or unreadable (uid $(id -u)); create the" \
                "certificates with: fedsd certs --out certs/ (compose: the certs service)" >&2
            exit 78
        fi
    done
    if [ ! -s "$secret" ] || [ ! -r "$secret" ]; then
        echo "superlink: the SuperExec secret $secret is missing, empty or unreadable (uid" \
            "$(id -u)); create it with: fedsd certs --out certs/ (compose: the certs" \
            "service; Kubernetes: the certs Job, Secret fedsd-superexec-auth)" >&2
        exit 78
    fi
    exec flower-superlink \
        --ssl-ca-certfile "$certs/ca.crt" \
        --ssl-certfile "$certs/superlink.crt" \
        --ssl-keyfile "$certs/superlink.key" \
        --enable-supernode-auth \
        --database "${SUPERLINK_DATABASE:-/data/state.db}" \
        --isolation process \
        --superexec-auth-secret-file "$secret" \
        --disable-runtime-dependency-installation \
        --host "${SUPERLINK_HOST:-0.0.0.0}" \
        --port "${SUPERLINK_PORT:-9092}" \
        "$@"
    ;;
health)
    # fedsd is not installed here: its sources in /opt/fedsd/lib (the health check needs
    # the standard library and fedsd.common.health only)
    exec env PYTHONPATH=/opt/fedsd/lib python -m fedsd.deploy.containers.healthcheck https \
        "https://127.0.0.1:${SUPERLINK_PORT:-9092}/health" --ca "$certs/ca.crt"
    ;;
*)
    exec "$@"
    ;;
esac
