#!/bin/sh
# Stand-in base images FOR TESTS ONLY, made from Debian's packages where no image registry is reachable (so neither
# python:3.12-slim nor pytorch/pytorch can be pulled). The Dockerfiles' production defaults stay as they are.
#   $PYTHON_BASE (barlow-standin/python:bookworm)  debootstrap --variant=minbase bookworm + python3, pip, venv,
#       ca-certificates, `python` as python3, Debian's EXTERNALLY-MANAGED marker removed (so pip behaves as in
#       the official Python images); the CLI image's CLI_BASE_IMAGE.
#   $TORCH_BASE (barlow-standin/torch:2.14.1)  that + the torch/torchvision pyproject.toml pins, installed by pip
#       from the local indexes this machine's pip is configured with (no download); the training image's BASE_IMAGE.
# Each is built once and reused while present (`docker rmi` it to rebuild). Needs root (debootstrap) and a daemon.
set -eu

PYTHON_BASE=${PYTHON_BASE:-barlow-standin/python:bookworm}
TORCH_BASE=${TORCH_BASE:-barlow-standin/torch:2.14.1}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
engine=${ENGINE:-docker}
cd "$(dirname "$0")/../.."
pins=$(grep -Eo '"torch(vision)?==[^"]+"' pyproject.toml | tr -d '"' | tr '\n' ' ')

have() { "$engine" image inspect "$1" >/dev/null 2>&1; }

if have "$PYTHON_BASE"; then
    echo "bases: $PYTHON_BASE present, reused"
else
    command -v debootstrap >/dev/null 2>&1 || { echo "bases: debootstrap missing: apt-get install debootstrap" >&2; exit 1; }
    start=$(date +%s)
    root=$(mktemp -d /var/tmp/barlow-standin.XXXXXX)
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
        bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -5 "$root.log" >&2; echo "bases: debootstrap failed (log $root.log)" >&2; exit 1; }
    rm -f "$root.log" "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
    # This machine's extra CAs (a TLS-inspecting egress), so pip inside `docker build --network host` reaches PyPI.
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1
    fi
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/* "$root"/tmp/*
    tar -C "$root" -c . | "$engine" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$PYTHON_BASE" >/dev/null
    echo "bases: built $PYTHON_BASE in $(( $(date +%s) - start )) s"
fi

if have "$TORCH_BASE"; then
    echo "bases: $TORCH_BASE present, reused"
else
    start=$(date +%s)
    # The local indexes and wheel folders this machine's pip uses (pip config), mounted read-only and named to pip
    # inside the same way: the multi-GB wheels are read from disk, never downloaded.
    mounts=; index=; links=
    for url in $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*extra-index-url='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u); do
        case $url in file://*) dir=${url#file://}; dir=${dir%/simple}; mounts="$mounts -v $dir:$dir:ro"; index="$index $url" ;; esac
    done
    for dir in $(python3 -m pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | sort -u); do
        [ -d "$dir" ] && { mounts="$mounts -v $dir:$dir:ro"; links="$links $dir"; }
    done
    name=barlow-standin-torch-$$
    log=/tmp/$name.log
    # shellcheck disable=SC2086  # $mounts is a list of options
    if ! "$engine" run --name "$name" --network host $mounts \
        -e PIP_EXTRA_INDEX_URL="${index# }" -e PIP_FIND_LINKS="${links# }" -e PIP_NO_CACHE_DIR=1 \
        -e PIP_DISABLE_PIP_VERSION_CHECK=1 -e PIP_ROOT_USER_ACTION=ignore \
        "$PYTHON_BASE" sh -c "pip install --quiet $pins && python -c 'import torch, torchvision; print(\"torch\", torch.__version__, \"torchvision\", torchvision.__version__)'" \
        >"$log" 2>&1; then
        "$engine" rm "$name" >/dev/null 2>&1
        tail -n 5 "$log" >&2
        echo "bases: installing $pins into $PYTHON_BASE failed (log $log)" >&2
        exit 1
    fi
    echo "bases: $(grep '^torch ' "$log")"
    rm -f "$log"
    "$engine" commit --change 'CMD ["python3"]' "$name" "$TORCH_BASE" >/dev/null
    "$engine" rm "$name" >/dev/null
    echo "bases: built $TORCH_BASE in $(( $(date +%s) - start )) s"
fi
