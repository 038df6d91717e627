#!/usr/bin/env bash
# Fetch, here, the wheels scripts/device-check.sh installs on the GPU machine: the packages sapwood
# imports that its image (Python 3.12, torch 2.11) does not hold. They go to .whl/ (keep it out of git:
# `echo /.whl/ >> .git/info/exclude`) and travel with the device call (`carry: [".whl"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
# torchao 0.18 is the release built for torch 2.11 (it dropped the code paths for older torch); the same
# release runs on this machine's CPU torch.
PACKAGES=(torchao==0.18.0 pydantic pydantic-core annotated-types typing-inspection fastapi starlette uvicorn
          cf-xarray cftime netCDF4 h5netcdf zarr numcodecs donfig crc32c)
PLATFORMS=()
for n in 17 27 28 31 34 35; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
mkdir -p .whl
for package in "${PACKAGES[@]}"; do
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" --platform manylinux2014_x86_64 --platform any -d .whl "$package"
done
ls -l .whl
