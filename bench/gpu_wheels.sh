#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored) for `bash bench/gpu_check.sh` on a GPU machine that has no network
# (README, "Checking a GPU machine"). Run here, where PyPI is reachable; rerunning keeps what is done.
#
#   .gpu/wheels/*.whl    what the GPU image's python3 (CPython 3.12, torch 2.11) lacks of pyproject's
#                        dependencies and theirs: CPython 3.12 manylinux x86-64 wheels, one version each
#   .gpu/ray-2.60.0.tar.xz   Ray installed for CPython 3.12 without its Java jars (ray/jars: Java workers
#                        only), xz-compressed: 27 MiB, where its wheel alone (79 MB) is over the 64 MiB
#                        that may travel with the tree
#   .gpu/vendor/nvdiffrast-0.4.0.tar.gz   NVIDIA's v0.4.0 sources with their licence, from $NVDIFFRAST_ARCHIVE
#                        (default ../shared/vendor/, beside the checkout), checked against its sha256
#
# Packages the image already has (torch, numpy, scipy, transformers, click, pytest, pytest-timeout, ...)
# are not carried: the list is pyproject's dependencies and their Requires-Dist, less the image's.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
    embreex==4.4.0.post1 fast_simplification==0.2.0 trimesh==5.2.0
    pygltflib==1.16.5 dataclasses-json==0.6.7 marshmallow==3.26.2 Deprecated==1.3.1
    webdataset==1.0.2 braceexpand==0.1.7
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1  # Ray's
)
RAY=2.60.0
NVDIFFRAST_ARCHIVE=${NVDIFFRAST_ARCHIVE:-../shared/vendor/nvdiffrast-0.4.0.tar.gz}
NVDIFFRAST_SHA256=bd43b3a6062cea780319c2737da987a32a112643497e06675f674a89c4ba3ee5
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mkdir -p .gpu/vendor

# Wheels: downloaded afresh into a new folder that then replaces the old one (one version of each).
rm -rf .gpu/wheels.new
"$PY" -m pip download -q --no-deps "${TARGET[@]}" -d .gpu/wheels.new "${WHEELS[@]}"
rm -rf .gpu/wheels && mv .gpu/wheels.new .gpu/wheels

# Ray: installed into a staging folder, the Java jars removed, packed (python3 -m tarfile unpacks it there).
if [ ! -f ".gpu/ray-$RAY.tar.xz" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$stage/wheel" "ray==$RAY"
    "$PY" -m pip install -q --no-deps --no-index --no-compile "${TARGET[@]}" --target "$stage/site" "$stage"/wheel/*.whl
    rm -rf "$stage/site/ray/jars"
    echo "packing Ray $RAY (xz -9: a few minutes)"
    tar -C "$stage/site" -cf - . | xz -9 -T0 > ".gpu/ray-$RAY.tar.xz.tmp"
    rm -f .gpu/ray-*.tar.xz && mv ".gpu/ray-$RAY.tar.xz.tmp" ".gpu/ray-$RAY.tar.xz"
fi

# nvdiffrast's sources: a checked copy (../shared does not travel).
echo "$NVDIFFRAST_SHA256  $NVDIFFRAST_ARCHIVE" | sha256sum --check --quiet
cp "$NVDIFFRAST_ARCHIVE" .gpu/vendor/nvdiffrast-0.4.0.tar.gz

# What travels: tracked and untracked-not-ignored files, plus .gpu/ (carried), at most 64 MiB.
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
gpu=$(du -sb .gpu | cut -f1)
echo ".gpu/: $((gpu / 1048576)) MiB ($(ls .gpu/wheels | wc -l) wheels, Ray, nvdiffrast); tree: $((tree / 1048576)) MiB;" \
     "together $(((gpu + tree) / 1048576)) of 64 MiB"
[ $((gpu + tree)) -le $((64 * 1048576)) ] || { echo "over the 64 MiB that may travel" >&2; exit 1; }
