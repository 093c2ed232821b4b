#!/bin/sh
# Like the official image: the first argument may be an option, and protected mode is off
# (the official image builds Redis with it off; access is limited by the network instead).
set -e
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
  shift
  set -- redis-server "$@" --protected-mode no
fi
exec "$@"
