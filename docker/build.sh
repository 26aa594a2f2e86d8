#!/bin/sh
# Build barlow's two images with whichever container engine works here: docker, podman or buildah.
#   the training image  IMAGE      (default barlow:<version>)             docker/Dockerfile
#   the CLI image       CLI_IMAGE  (default IMAGE's repository + "-cli", same tag: barlow-cli:<version>)
#                                                                         docker/Dockerfile.cli
# Usage: docker/build.sh [IMAGE]   (env: IMAGE, CLI_IMAGE, BASE_IMAGE, CLI_BASE_IMAGE, EXTRAS, BUILD_NETWORK)
#   EXTRAS: the training image's optional extras (default: all, mlflow,decode); BUILD_NETWORK: the builds' network
#   (host where the engine has no bridge, as in CI). It prints the engine, the bases and both images with sizes;
#   each way it fails is one line naming the fix (the build's log is kept and named).
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
    echo "make image: docker is installed but its daemon is not reachable ('docker info' failed): start it (systemctl start docker, or dockerd as root), or install podman or buildah" >&2
    exit 1
else
    echo "make image: no container engine found: install docker (with a running daemon), podman or buildah" >&2
    exit 1
fi
echo "make image: engine $engine $("$engine" version --format '{{.Server.Version}}' 2>/dev/null || "$engine" --version)"

# The FROM line's default of a Dockerfile, for the report when no BASE_IMAGE is given
default_base() { sed -n 's/^ARG BASE_IMAGE=//p' "$1"; }

# present BASE: the base is here, or can be pulled now (a missing base otherwise fails deep inside the build)
present() {
    "$engine" image inspect "$1" >/dev/null 2>&1 && return 0
    echo "make image: pulling base $1"
    "$engine" pull "$1" >/dev/null 2>&1
}

size() {
    "$engine" image inspect --format '{{.Size}}' "$1" 2>/dev/null \
        | awk '{ if ($1 >= 1e9) printf "%.2f GB", $1 / 1e9; else printf "%.0f MB", $1 / 1e6 }'
}

# build DOCKERFILE TAG BASE BASE_VARIABLE [BUILD_ARG...]: one image; BASE_IMAGE passed on only when it is set
build() {
    dockerfile=$1 tag=$2 base=${3:-$(default_base "$1")} variable=$4
    shift 4
    if ! present "$base"; then
        echo "make image: base image $base not found here and cannot be pulled: pull it, or set $variable= to one that is (tests/images/bases.sh makes stand-ins for tests)" >&2
        exit 1
    fi
    log=${TMPDIR:-/tmp}/barlow-build-$(printf %s "$tag" | tr '/:' '__').log
    start=$(date +%s)
    set -- -f "$dockerfile" -t "$tag" --build-arg "BASE_IMAGE=$base" "$@"
    [ -z "${BUILD_NETWORK:-}" ] || set -- --network "$BUILD_NETWORK" "$@"
    if ! "$engine" build "$@" . >"$log" 2>&1; then
        why=$(grep "^base image has torch " "$log" | head -1)
        [ -n "$why" ] || tail -n 15 "$log" >&2
        echo "make image: building $tag failed${why:+: $why} (full log: $log)" >&2
        exit 1
    fi
    echo "make image: built $tag ($(size "$tag"), in $(( $(date +%s) - start )) s) from $base"
}

set --
[ -z "${EXTRAS+set}" ] || set -- --build-arg "EXTRAS=$EXTRAS"
build docker/Dockerfile "$image" "${BASE_IMAGE:-}" BASE_IMAGE "$@"
build docker/Dockerfile.cli "$cli_image" "${CLI_BASE_IMAGE:-}" CLI_BASE_IMAGE
echo "make image: push both ($image, $cli_image) to your registry; a spec's cluster.image names the first"
