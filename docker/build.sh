#!/bin/sh
# Build barlow's two images with whichever container engine works here: docker, podman or buildah.
#   the training image  IMAGE      (default barlow:<version>)             docker/Dockerfile
#   the CLI image       CLI_IMAGE  (default IMAGE's repository + "-cli", same tag: barlow-cli:<version>)
#                                                                         docker/Dockerfile.cli
# Usage: docker/build.sh [IMAGE]   (env: IMAGE, CLI_IMAGE, BASE_IMAGE, CLI_BASE_IMAGE)
# The CLI image's default name is the one cluster.cli_image defaults to, so pushing both is all a spec needs.
# An engine counts only if it can build now: an installed docker CLI without a reachable daemon does not.
set -eu

case $0 in */*) cd "${0%/*}/.." ;; *) cd .. ;; esac  # the repository root, without needing dirname
# No registry by default (none is everyone's): a local tag with barlow's version; push it under your registry's name
version=dev
while IFS= read -r line; do  # shell builtins only: the first `version = "..."` line of pyproject.toml
    case $line in 'version = "'*) version=${line#version = \"}; version=${version%\"}; break ;; esac
done < pyproject.toml
image=${1:-${IMAGE:-barlow:$version}}
case ${image##*/} in  # a tag follows the last ':' of the last path part (an earlier ':' is a registry's port)
    *:*) repo=${image%:*}; tag=:${image##*:} ;;
    *) repo=$image; tag= ;;
esac
cli_image=${CLI_IMAGE:-$repo-cli$tag}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    engine=docker
elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
    engine=podman
elif command -v buildah >/dev/null 2>&1 && buildah info >/dev/null 2>&1; then
    engine=buildah
elif command -v docker >/dev/null 2>&1; then
    echo "make image: docker is installed but its daemon is not reachable ('docker info' failed); start it, or install podman or buildah" >&2
    exit 1
else
    echo "make image: no container engine found: install docker (with a running daemon), podman or buildah" >&2
    exit 1
fi

# build DOCKERFILE TAG BASE: one image, with BASE_IMAGE passed on only when it is set
build() {
    if [ -n "$3" ]; then
        "$engine" build -f "$1" -t "$2" --build-arg "BASE_IMAGE=$3" .
    else
        "$engine" build -f "$1" -t "$2" .
    fi
}
build docker/Dockerfile "$image" "${BASE_IMAGE:-}"
build docker/Dockerfile.cli "$cli_image" "${CLI_BASE_IMAGE:-}"
echo "built $image and $cli_image"
