#!/bin/bash
# Last build step of the supernode and serverapp images (shared, so the two Dockerfiles
# stay identical up to here and share every layer before it).
#
#   finish-image.sh ROLE      ROLE: supernode or serverapp; run from the build context
#
# Installs fedsd itself (its dependencies are already in /opt/venv), keeps the Flower app
# (pyproject.toml + fedsd/) in /app for `flwr run`, writes the warm-start shims, puts the
# role's entrypoint and the shared scripts in /opt/fedsd, and removes pip.
set -euo pipefail
role=$1
src=$(cd "$(dirname "$0")/.." && pwd)
install -d /app
cp -a "$src/pyproject.toml" "$src/fedsd" /app/
/opt/venv/bin/python -m pip install -q --no-cache-dir --no-deps /app
rm -rf /app/build /app/*.egg-info
/opt/venv/bin/python - <<'PY'
from fedsd.warmstart import install_shim

for entry in ("flwr-clientapp", "flwr-serverapp"):
    install_shim("/opt/fedsd/shim", entry)
PY
install -m 0755 "$src/services/$role/entrypoint.sh" /opt/fedsd/entrypoint.sh
install -m 0644 "$src/docker/healthcheck.py" "$src/docker/launch.py" "$src/docker/supervise.sh" \
    "$src/docker/k8s_certs.py" /opt/fedsd/
/opt/venv/bin/python -m pip uninstall -q -y pip
case $role in
supernode) install -d -o app -g app -m 0750 /data /data/cache ;;
serverapp) install -d -o app -g app -m 0750 /out ;;
*) echo "finish-image.sh: unknown role $role" >&2; exit 2 ;;
esac
