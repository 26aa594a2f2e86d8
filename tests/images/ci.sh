#!/bin/sh
# CI's image part (make images-ci): a container engine, the stand-in bases, both images built through
# docker/build.sh (the path `make image` takes). Where no docker daemon answers and this is root, it installs
# Debian's docker.io and starts its daemon (overlay2: the vfs driver copies every layer and fills the disk; no
# iptables or bridge, so builds and containers use the host network). Where no engine can be had it says so in
# one line and exits 0: the image tests then skip, each with that reason. Each step prints what it cost.
set -eu
cd "$(dirname "$0")/../.."
start=$(date +%s)
export TORCH_BASE=${TORCH_BASE:-barlow-standin/torch:2.14.1} PYTHON_BASE=${PYTHON_BASE:-barlow-standin/python:bookworm}

skip() { echo "images: $1: the image tests will skip"; exit 0; }

if ! docker info >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || skip "no docker daemon answers and this is not root (start one, or run CI as root)"
    if ! command -v dockerd >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
        echo "images: installing Debian's docker.io and debootstrap"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap; } \
            >/tmp/barlow-apt.log 2>&1 || skip "apt-get install docker.io debootstrap failed (log /tmp/barlow-apt.log)"
    fi
    echo "images: starting dockerd (overlay2, host network only; log /tmp/barlow-dockerd.log)"
    nohup dockerd --storage-driver=overlay2 --iptables=false --bridge=none >/tmp/barlow-dockerd.log 2>&1 &
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ "$tries" -le 60 ] || skip "dockerd did not answer within 60 s (log /tmp/barlow-dockerd.log)"
        sleep 1
    done
fi
echo "images: engine ready after $(( $(date +%s) - start )) s"

tests/images/bases.sh
IMAGE=barlow-test:ci CLI_IMAGE=barlow-test-cli:ci BASE_IMAGE=$TORCH_BASE CLI_BASE_IMAGE=$PYTHON_BASE BUILD_NETWORK=host \
    docker/build.sh
docker image prune --force >/dev/null  # the dangling layers of earlier builds of the test images
echo "images: ready in $(( $(date +%s) - start )) s; $(df -h --output=avail / | tail -1 | tr -d ' ') free on /"
