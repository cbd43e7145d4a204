#!/usr/bin/env bash
# The GPU path in one table (bench/device_check.py), in under 10 minutes on one GPU.
#
#   bash bench/device_check.sh            # on a machine with CUDA: full sizes
#   bash bench/device_check.sh --quick    # small sizes; without CUDA this is what runs anyway
#
# Needs no network: it uses the first interpreter that imports torch and torchvision, in this
# order: $PYTHON, ./.venv/bin/python, python3, python. camaudit runs from this checkout
# (PYTHONPATH), nothing is installed. Wheels of missing packages (pytorch-grad-cam, sqlalchemy,
# pydantic-settings, ... for the reference and pipeline rows) may be put in ./.whl: they are
# installed from there alone (pip --no-index) into a temporary folder. A section whose packages
# are missing says so in its row. The table goes to stdout and to $OUT/device_check.md when OUT is set.
set -u
cd "$(dirname "$0")/.."

pick_python() {
    local candidate
    for candidate in "${PYTHON:-}" ./.venv/bin/python python3 python; do
        [ -n "$candidate" ] || continue
        command -v "$candidate" >/dev/null 2>&1 || [ -x "$candidate" ] || continue
        if "$candidate" -c 'import torch, torchvision, numpy, PIL' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! PY=$(pick_python); then
    echo "device_check: no Python with torch, torchvision, numpy and Pillow found" \
        "(tried \$PYTHON, ./.venv/bin/python, python3, python)" >&2
    exit 2
fi
echo "device_check: $PY ($("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)'))" >&2

extra=""
if compgen -G ".whl/*.whl" >/dev/null; then
    site=$(mktemp -d /tmp/camaudit-site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl; then
        extra="$site"
    else
        echo "device_check: the wheels in .whl did not install; going on without them" >&2
    fi
fi

export PYTHONPATH="$PWD${extra:+:$extra}${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
# Every section has its own budget; this is the backstop for the whole run.
exec timeout --signal=TERM 560 "$PY" bench/device_check.py "$@"
