#!/bin/bash
# Last build step of the supernode and serverapp images: each target of
# services/app/Dockerfile runs it on the shared base stage.
#
#   finish-image.sh ROLE      ROLE: supernode or serverapp; run from the build context
#
# Installs fedsd itself (its dependencies are already in /opt/venv), keeps the Flower app
# (pyproject.toml + fedsd/) in /app for `flwr run`, writes the warm-start shims, puts the
# role's entrypoint and supervise.sh in /opt/fedsd (the Python entry points
# are fedsd's own: python -m fedsd.deploy.containers.*), and removes pip. In the
# supernode image the venv's own flwr-clientapp becomes the shim too, so that every
# ClientApp, whatever PATH starts it, passes the app check (fedsd/deploy/pinning.py).
set -euo pipefail
role=$1
src=$(cd "$(dirname "$0")/.." && pwd)
install -d /app
cp -a "$src/pyproject.toml" "$src/fedsd" /app/
/opt/venv/bin/python -m pip install -q --no-cache-dir --no-deps /app
rm -rf /app/build /app/*.egg-info
/opt/venv/bin/python - <<'PY'
from fedsd.deploy.warmstart import install_shim

for entry in ("flwr-clientapp", "flwr-serverapp"):
    install_shim("/opt/fedsd/shim", entry)
PY
install -m 0755 "$src/services/$role/entrypoint.sh" /opt/fedsd/entrypoint.sh
install -m 0644 "$src/docker/supervise.sh" /opt/fedsd/
/opt/venv/bin/python -m pip uninstall -q -y pip
case $role in
supernode)
    install -d -o app -g app -m 0750 /data /data/cache
    /opt/venv/bin/python -c 'from fedsd.deploy.warmstart import install_shim; install_shim("/opt/venv/bin")'
    ;;
serverapp) install -d -o app -g app -m 0750 /out ;;
*) echo "finish-image.sh: unknown role $role" >&2; exit 2 ;;
esac
