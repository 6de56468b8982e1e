# shellcheck shell=bash
# Sourced by the supernode and serverapp entrypoints (bash): run a Flower service in the
# foreground of this shell (PID 1 of the container), optionally next to a metrics exporter
# and a warm app launcher, forward SIGTERM/SIGINT to it and exit with its status.
#
#   supervise ENTRY COMMAND...     ENTRY: flwr-clientapp or flwr-serverapp
#
# With FEDSD_METRICS_PORT set (not empty, not 0) `fedsd metrics-exporter` serves on
# FEDSD_METRICS_HOST:FEDSD_METRICS_PORT [0.0.0.0] what the app processes write into
# PROMETHEUS_MULTIPROC_DIR [a fresh folder in /tmp]; the launcher and the apps inherit it.
#
# With FEDSD_WARM_START=1 (the default) `fedsd app-launcher` imports torch, diffusers, peft
# and opacus once and forks each ENTRY process that COMMAND starts (the shim in
# /opt/fedsd/shim is first on PATH and finds the launcher through FEDSD_LAUNCHER_SOCKET).
# Until the launcher listens, or if it dies, the shim runs the command in a fresh
# interpreter: nothing depends on it. Either way a flwr-clientapp is Flower's behind the
# node's app check (fedsd/deploy/pinning.py). See fedsd/deploy/warmstart.py.
#
# With FEDSD_METRICS_PORT set, the apps write prometheus-client multiprocess files
# (PROMETHEUS_MULTIPROC_DIR) and `fedsd metrics-exporter` serves their aggregate on
# FEDSD_METRICS_HOST [0.0.0.0]:FEDSD_METRICS_PORT (docs/metrics.md).
supervise() {
    local entry=$1
    shift
    local launcher="" exporter="" main status
    if [ -n "${FEDSD_METRICS_PORT:-}" ] && [ "${FEDSD_METRICS_PORT}" != 0 ]; then
        if [ -z "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
            PROMETHEUS_MULTIPROC_DIR=$(mktemp -d "${TMPDIR:-/tmp}/fedsd-metrics.XXXXXX")
        fi
        export PROMETHEUS_MULTIPROC_DIR
        fedsd metrics-exporter --port "$FEDSD_METRICS_PORT" \
            --host "${FEDSD_METRICS_HOST:-0.0.0.0}" --multiproc-dir "$PROMETHEUS_MULTIPROC_DIR" &
        exporter=$!
    fi
    if [ "${FEDSD_WARM_START:-1}" = 1 ]; then
        local run_dir
        run_dir=$(mktemp -d "${TMPDIR:-/tmp}/fedsd-launcher.XXXXXX")
        fedsd app-launcher --socket "$run_dir/$entry.sock" &
        launcher=$!
        export FEDSD_LAUNCHER_SOCKET="$run_dir/$entry.sock"
        export PATH="/opt/fedsd/shim:$PATH"
    fi
    "$@" &
    main=$!
    # shellcheck disable=SC2064  # expand the pids now
    trap "kill -TERM $main 2>/dev/null || true" TERM INT
    set +e
    wait "$main"
    status=$?
    while kill -0 "$main" 2>/dev/null; do  # a trapped signal interrupted wait: wait again
        wait "$main"
        status=$?
    done
    for helper in $launcher $exporter; do
        kill -TERM "$helper" 2>/dev/null
        wait "$helper" 2>/dev/null
    done
    return "$status"
}

require_file() {  # PATH WHAT: exit 78 (configuration error) naming what is missing
    if [ ! -r "$1" ]; then
        echo "$(basename "$0"): $2 $1 is missing or unreadable by uid $(id -u)" >&2
        exit 78
    fi
}
