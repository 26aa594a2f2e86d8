#!/bin/sh
# Build the barlow image with whichever container engine works here: docker, podman or buildah.
# Usage: docker/build.sh [IMAGE]   (env: IMAGE, BASE_IMAGE)
# An engine counts only if it can build now: an installed docker CLI without a reachable daemon does not.
set -eu

case $0 in */*) cd "${0%/*}/.." ;; *) cd .. ;; esac  # the repository root, without needing dirname
# No registry by default (none is everyone's): a local tag with barlow's version; push it under your registry's name
version=dev
while IFS= read -r line; do  # shell builtins only: the first `version = "..."` line of pyproject.toml
    case $line in 'version = "'*) version=${line#version = \"}; version=${version%\"}; break ;; esac
done < pyproject.toml
image=${1:-${IMAGE:-barlow:$version}}
set -- -f docker/Dockerfile -t "$image"
if [ -n "${BASE_IMAGE:-}" ]; then
    set -- "$@" --build-arg "BASE_IMAGE=$BASE_IMAGE"
fi

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    exec docker build "$@" .
elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
    exec podman build "$@" .
elif command -v buildah >/dev/null 2>&1 && buildah info >/dev/null 2>&1; then
    exec buildah build "$@" .
fi

if command -v docker >/dev/null 2>&1; then
    echo "make image: docker is installed but its daemon is not reachable ('docker info' failed); start it, or install podman or buildah" >&2
else
    echo "make image: no container engine found: install docker (with a running daemon), podman or buildah" >&2
fi
exit 1
