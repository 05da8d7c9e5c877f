#!/usr/bin/env bash
# Emulated hosts by hand (needs root): network namespaces on one bridge, each with its own
# /dev/shm and hostname, links shaped with tc. See tests/hosts.py and tests/hosts_cli.py.
#   scripts/hosts.sh up 3 --rate 1gbit       h0, h1, h2 at 10.251.0.1-3
#   scripts/hosts.sh exec h0 -- hostname     run a command inside a host (in this directory)
#   scripts/hosts.sh cut h1 | reconnect h1 | kill h1 | status
#   scripts/hosts.sh down                    stop everything in them and remove them
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="$repo/.venv/bin/python"
[ -x "$py" ] || py=python3
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m tests.hosts_cli "$@"
