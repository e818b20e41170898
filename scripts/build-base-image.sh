#!/usr/bin/env bash
# Builds kdistill's pinned Python base image locally, without any registry:
# debootstrap Debian bookworm (minbase) with Debian's python3.11 and venv, then
# `docker import`. The Dockerfiles take it through `ARG BASE_IMAGE`; elsewhere,
# users pass an official image such as python:3.11-slim-bookworm instead.
#
#   scripts/build-base-image.sh            # build if the image is missing; print its tag
#   scripts/build-base-image.sh --rebuild  # debootstrap again
#
# The rootfs tarball is cached under ${KDISTILL_CACHE:-~/.cache/kdistill}/base/,
# with the list of installed package versions beside it (what "pinned" means here:
# the suite and snapshot of that day, recorded and reused until --rebuild).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${KDISTILL_CACHE:-${HOME}/.cache/kdistill}/base"
suite="${BASE_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tag="${BASE_IMAGE:-kdistill/python:3.11-${suite}}"
tarball="${cache}/${suite}-python3.11.tar"
packages="ca-certificates,python3.11,python3.11-venv,python3-venv,libpython3.11,tini"

log() { printf '[base-image %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# debootstrap mounts /proc and /sys inside the rootfs while it runs: unmount them, then delete,
# never through a mount. Under `set -e` a failing command in an EXIT trap becomes the script's
# exit status, so an umount of what is not mounted (the normal case once debootstrap is done)
# would fail a finished build with no message: nothing here may fail.
cleanup_rootfs() {
  umount -R "${work}/proc" 2>/dev/null || true
  umount -R "${work}/sys" 2>/dev/null || true
  rm -rf --one-file-system "${work}" || true
}

eval "$("${root}/scripts/dockerd.sh" env)"
"${root}/scripts/dockerd.sh" start >/dev/null

rebuild=0
[[ "${1:-}" == "--rebuild" ]] && rebuild=1

if (( rebuild == 0 )) && docker image inspect "${tag}" >/dev/null 2>&1; then
  echo "${tag}"
  exit 0
fi

if (( rebuild == 1 )) || [[ ! -s "${tarball}" ]]; then
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install -y debootstrap"; exit 1; }
  t0=$(date +%s)
  work="$(mktemp -d "${cache%/base}/rootfs.XXXXXX")"
  trap cleanup_rootfs EXIT
  mkdir -p "${cache}"
  log "debootstrap ${suite} minbase + python3.11 into ${work}"
  debootstrap --variant=minbase --include="${packages}" "${suite}" "${work}" "${mirror}" >"${cache}/debootstrap.log" 2>&1 \
    || { tail -n 30 "${cache}/debootstrap.log" >&2; exit 1; }
  # Security updates, so the base is as current as the day it was built.
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "${mirror}" "${suite}" "${mirror}" "${suite}" "${suite}" > "${work}/etc/apt/sources.list"
  chroot "${work}" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
    >>"${cache}/debootstrap.log" 2>&1
  # Shrink: package lists, caches, docs and man pages are not needed at run time.
  chroot "${work}" apt-get clean
  rm -rf "${work}"/var/lib/apt/lists/* "${work}"/var/cache/apt/*.bin "${work}"/usr/share/doc/* \
    "${work}"/usr/share/man/* "${work}"/usr/share/info/* "${work}"/usr/share/locale/* "${work}"/var/log/*.log \
    "${work}"/tmp/* "${work}"/root/.cache
  chroot "${work}" dpkg-query -W -f '${Package} ${Version}\n' > "${cache}/${suite}-python3.11.packages"
  # /usr/bin/python like the official images, so `python` works in both.
  ln -sf python3.11 "${work}/usr/bin/python"
  tar --numeric-owner --one-file-system -C "${work}" -cf "${tarball}.tmp" .
  mv -f "${tarball}.tmp" "${tarball}"
  log "rootfs: $(du -h "${tarball}" | cut -f1) in $(( $(date +%s) - t0 ))s"
fi

docker import \
  --change 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["python3"]' \
  --message "debootstrap ${suite} minbase + python3.11 ($(sha256sum "${tarball}" | cut -c1-12))" \
  "${tarball}" "${tag}" >/dev/null
log "imported ${tag}: $(docker image inspect -f '{{.Size}}' "${tag}" | awk '{printf "%.0f MB", $1/1e6}')"
echo "${tag}"
