#!/bin/sh
# Entry point of the offline redis stand-in: `redis-server ARGS` runs as `redis` with protected mode off.
set -eu
if [ "${1:-}" = redis-server ] && [ "${2:-}" != --version ] && [ "${2:-}" != -v ]; then
  shift
  chown -R redis:redis /data
  exec setpriv --reuid=redis --regid=redis --init-groups redis-server --protected-mode no "$@"
fi
exec "$@"
