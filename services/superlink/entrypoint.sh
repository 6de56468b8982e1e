#!/bin/bash
# SuperLink container: `superlink [EXTRA FLAGS]` (default), `health`, or any command.
#
# Environment: SUPERLINK_HOST/SUPERLINK_PORT (where Fleet, Control and Runtime API listen:
# one HTTPS port), FEDSD_CERTS (ca.crt, superlink.crt, superlink.key), SUPERLINK_DATABASE
# (state: keep it on a volume, or restarted SuperNodes with auth cannot reconnect).
set -euo pipefail
certs=${FEDSD_CERTS:-/certs}

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
    exec flower-superlink \
        --ssl-ca-certfile "$certs/ca.crt" \
        --ssl-certfile "$certs/superlink.crt" \
        --ssl-keyfile "$certs/superlink.key" \
        --enable-supernode-auth \
        --database "${SUPERLINK_DATABASE:-/data/state.db}" \
        --isolation process \
        --disable-runtime-dependency-installation \
        --host "${SUPERLINK_HOST:-0.0.0.0}" \
        --port "${SUPERLINK_PORT:-9092}" \
        "$@"
    ;;
health)
    exec python /opt/fedsd/healthcheck.py https \
        "https://127.0.0.1:${SUPERLINK_PORT:-9092}/health" --ca "$certs/ca.crt"
    ;;
*)
    exec "$@"
    ;;
esac
