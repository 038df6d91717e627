#!/usr/bin/env bash
# The prepared GPU check: one command, one GPU, at most 8 minutes; bench JSON under $OUT (default
# device-check-out/):
#
#   gpu.json    `sapwood bench gpu`: astro-13b training steps under the memory plan (peak memory,
#               fragmentation, forward and backward s per batch, tokens/s, MFU, vs the analytic plan),
#               MFU of research-799m and of a Llama-3-8B shape, the attention kernel used
#   serve.json  `sapwood bench serve --device cuda`: continuous batching vs transformers on the GPU
#   grow.json   `sapwood bench grow --scale 4`: FLOPs to scratch's loss, L 4x256 (3.3M parameters) from
#               scratch vs S 2x128 grown at half of 1000 steps (zero, masked, random), seeds as time allows
#   env.txt     nvidia-smi, torch and package versions
#   augment.json  (--data, a separate call of about 1 minute) `sapwood bench augment` at the platform's
#               1.88 GB batch (20 levels x 64 x 128): host-to-device copy from pinned vs pageable memory,
#               augmentation on the GPU and the fused CPU pass, each per batch (the batch's load from disk
#               is host-side: `sapwood bench data --batch-gb 1.88` measures it)
#
#   scripts/device-check.sh             on the GPU machine (its python3 holds PyTorch)
#   scripts/device-check.sh --data      the data stage alone, on the GPU machine
#   scripts/device-check.sh --dry-run   the same code paths on tiny shapes on the CPU (CI, no GPU)
#
# Packages sapwood needs that the GPU image lacks (torchao, pydantic, fastapi, uvicorn, ...) travel as
# wheels in .whl/ (scripts/device-wheels.sh fetches them); they are installed to /tmp/site first.
# Each stage has its own time limit inside the 8 minutes; gpu.json is rewritten after every model,
# so a stage stopped by its limit keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-device-check-out}"
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python && -z "${PYTHON:-}" && "${1:-}" == "--dry-run" ]] && PY=.venv/bin/python
mkdir -p "$OUT_DIR"

GROW_METHODS=zero@0.5,masked@0.5,random@0.5
AUGMENT_1_88GB=(--batch-gb 1.88 --levels 20 --nlat 64 --nlon 128 --repeats 2)
if [[ "${1:-}" == "--dry-run" ]]; then
    "$PY" -m sapwood.cli bench augment --batch-gb 0.002 --levels 2 --nlat 8 --nlon 16 --repeats 2 \
        --out "$OUT_DIR" || exit $?
    "$PY" -m sapwood.cli bench gpu --smoke --out "$OUT_DIR" || exit $?
    exec "$PY" -m sapwood.cli bench grow --steps 10 --seeds 2 --methods "$GROW_METHODS" \
        --data-dir "$OUT_DIR/grow-data" --out "$OUT_DIR"
fi

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "device-check: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|torchao|transformers|pydantic|fastapi|uvicorn) "
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

if [[ "${1:-}" == "--data" ]]; then
    timeout 150 "$PY" -m sapwood.cli bench augment "${AUGMENT_1_88GB[@]}" --out "$OUT_DIR"
    exit $?
fi

status=0
# 1. training: astro-13b under the memory plan, then the MFU models (none started after 250 s);
#    the three stages together stay within 8 minutes (290 + 100 + 90 s)
timeout 290 "$PY" -m sapwood.cli bench gpu --out "$OUT_DIR" --budget-s 250 || status=$?
# 2. serving on the GPU: research-799m with random weights, 16 and 64 concurrent requests
timeout 100 "$PY" -m sapwood.cli bench serve --device cuda --preset research-799m --concurrency 16,64 \
    --max-tokens 32 --repeats 1 --out "$OUT_DIR" || status=$?
# 3. growth at a larger scale: no seed started that would end past 60 s (grow.json written after each seed)
timeout 90 "$PY" -m sapwood.cli bench grow --scale 4 --steps 1000 --seeds 3 --budget-s 60 \
    --methods "$GROW_METHODS" --data-dir /tmp/sapwood-grow-data --out "$OUT_DIR" || status=$?
ls -l "$OUT_DIR"
exit "$status"
