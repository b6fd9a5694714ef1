#!/usr/bin/env bash
# The prepared GPU run, on the GPU machine: installs the carried packages (.whl/, from benchmarks/device_wheels.sh)
# into /tmp/site without any network, then runs `benchmarks/device_run.py run --out "$OUT"` with everything it prints
# also kept in $OUT/log.txt (which comes back even when the run is stopped at its limit).
#
#   bash benchmarks/device_run.sh [options of `device_run.py run`, e.g. --budget 420 or --phases a,b]
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
mkdir -p "$OUT"
PY=${PYTHON:-python3}
SITE=/tmp/site
start=$(date +%s%N)
if compgen -G ".whl/*.whl" >/dev/null || compgen -G ".whl/*.tar.xz" >/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { echo "installing the carried wheels failed" | tee "$OUT/log.txt"; exit 3; }
    fi
    for archive in .whl/*.tar.xz; do
        [ -e "$archive" ] || continue
        tar -xJf "$archive" -C "$SITE" || { echo "unpacking $archive failed" | tee "$OUT/log.txt"; exit 3; }
    done
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "no .whl/ here: the engine's packages must already be installed (carry .whl, see benchmarks/README.md)"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
ms=$(( ($(date +%s%N) - start) / 1000000 ))
export RA_DEVICE_INSTALL_SECONDS="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" benchmarks/device_run.py run --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
