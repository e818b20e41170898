#!/usr/bin/env bash
# Installs the few Debian packages the tests need beyond Python and Go: a Docker engine
# (image tests), debootstrap (the locally built base image, since no registry can be reached)
# and openssl (the control plane's certificates). Does nothing when they are all present.
set -euo pipefail
declare -A provides=([dockerd]=docker.io [debootstrap]=debootstrap [openssl]=openssl [gcc]=gcc)
missing=()
for cmd in "${!provides[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${provides[$cmd]}")
done
(( ${#missing[@]} )) || exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "system-deps: missing ${missing[*]}; install them: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
