#!/usr/bin/env bash
# A multi-host Ray cluster on this machine: the head plus worker hosts in their own network namespaces.
# A thin wrapper around `raylm cluster` (platform/raylm/cluster/multihost.py); needs root and iproute2.
#   sudo cluster/multihost.sh up --workers 2 --cpus-per-node 2    prints the addresses and the auth token
#   cluster/multihost.sh status
#   sudo cluster/multihost.sh down [NAME]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" -m raylm.cli cluster "$@"
