#!/bin/bash
# Fleet proxy container: `proxy` (default), `health`, or any command.
# Reads FEDSD_CERTS/{ca.crt,superlink.crt,superlink.key} (the SuperLink's certificate: its
# SANs name the SuperLink, which is what SuperNodes dial); HAProxy wants the key pair in
# one PEM file, written to a private temporary file.
set -euo pipefail
certs=${FEDSD_CERTS:-/certs}
case ${1:-proxy} in
proxy)
    shift || true
    for f in ca.crt superlink.crt superlink.key; do
        if [ ! -r "$certs/$f" ]; then
            echo "fleet-proxy: $certs/$f is missing or unreadable by uid $(id -u)" >&2
            exit 78
        fi
    done
    umask 077
    run_dir=$(mktemp -d "${TMPDIR:-/tmp}/fleet-proxy.XXXXXX")
    cat "$certs/superlink.crt" "$certs/superlink.key" >"$run_dir/fleet.pem"
    export PROXY_PEM=$run_dir/fleet.pem
    exec haproxy -W -db -f /etc/haproxy/fleet.cfg "$@"
    ;;
health)
    exec 3<>"/dev/tcp/127.0.0.1/${PROXY_HEALTH_PORT:-9099}"
    printf 'GET /healthz HTTP/1.0\r\n\r\n' >&3
    IFS= read -r status <&3
    [[ $status == *" 200 "* ]]
    ;;
*)
    exec "$@"
    ;;
esac
