#!/usr/bin/env bash
# Host set-up for the observability test (tests/e2e/test_observability.py): Debian's prometheus
# (2.42) and promtool. Idempotent; needs root (apt-get). The package's service is not
# started: the test runs its own Prometheus on a free loopback port.
#
#   bash docker/ci-observability.sh
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    echo "ci-observability: $(prometheus --version 2>&1 | head -n1) already installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "ci-observability: needs root (apt-get install prometheus)" >&2
    exit 1
fi
start=$(date +%s)
# policy-rc.d exit 101: "action forbidden", so the postinst does not start a system-wide
# Prometheus on :9090 (only when no policy exists already; removed afterwards).
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    own_policy=1
fi
trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends prometheus >/dev/null
echo "ci-observability: installed $(prometheus --version 2>&1 | head -n1) ($(($(date +%s) - start)) s)"
