#!/usr/bin/env bash
# Downloads the Python packages that the GPU machine lacks into .whl/ (ignored through .git/info/exclude), for
# benchmarks/device_run.sh to install there offline. The machine's python3 (3.12, x86-64, with PyTorch) already has
# numpy, scipy, scikit-image, scikit-learn, safetensors, pillow, matplotlib, tqdm, torchvision and pytest
# (/work/.library/device/KINDS.md); the engine also needs these four, pinned to the versions of this checkout's .venv:
#
#   lpips 0.1.4          pure Python (needs torch, torchvision, numpy, scipy, tqdm: all there)
#   pydicom 3.0.2        pure Python, no requirements
#   platformdirs 4.14.9  pure Python, no requirements
#   SimpleITK 2.5.7      the abi3 manylinux wheel (53 MB); repacked as an xz tarball of its unpacked files (28 MB),
#                        because the working tree, the wheels and the bundle must travel in 64 MiB together
#
#   bash benchmarks/device_wheels.sh            # about 4 minutes (xz -9 of SimpleITK's 272 MB library, one core)
#
# Then .whl/ holds three wheels and simpleitk-2.5.7.tar.xz; the run's carry list names .whl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
LIMIT_MIB=34   # what the wheels may take of the 64 MiB (the tree is ~23 MiB, the bundle needs ~8 MiB)
PACKAGES=(lpips==0.1.4 pydicom==3.0.2 platformdirs==4.14.9 SimpleITK==2.5.7)

command -v xz >/dev/null || { echo "xz is needed to repack SimpleITK (apt-get install xz-utils)" >&2; exit 1; }
mkdir -p .git/info "$DEST"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -f "$DEST"/*.whl "$DEST"/*.tar.xz "$DEST"/*.partial

"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"

# Every wheel but SimpleITK's must need nothing beyond what the machine has (Requires-Dist, extras aside).
for whl in "$DEST"/*.whl; do
    "$PY" - "$whl" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    needs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines()
             if l.startswith("Requires-Dist:") and "extra ==" not in l]
print(f"{sys.argv[1].split('/')[-1]}: requires {', '.join(needs) or 'nothing'}")
EOF
done

sitk=$(ls "$DEST"/simpleitk-2.5.7-*.whl)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m zipfile -e "$sitk" "$tmp"
tar -C "$tmp" -cf - SimpleITK simpleitk-2.5.7.dist-info | xz -9 -T1 > "$DEST/simpleitk-2.5.7.tar.xz.partial"
mv "$DEST/simpleitk-2.5.7.tar.xz.partial" "$DEST/simpleitk-2.5.7.tar.xz"
rm "$sitk"

ls -l "$DEST"
total=$(du -cb "$DEST"/* | tail -1 | cut -f1)
echo "total: $((total / 1048576)) MiB in $DEST (limit ${LIMIT_MIB} MiB)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "the wheels take more than ${LIMIT_MIB} MiB: the tree, the wheels and the bundle would not travel" >&2
    exit 1
fi
