#!/usr/bin/env bash
# FlashInfer (issue 12's peer) and its needs for the lent H200 (Python 3.12, manylinux x86_64, CUDA 13),
# downloaded into .peers/whl (ignored by git: a new checkout has none) and split for carrying by
# bench/peers_split.sh (see there for the device calls that bring them over). Pinned to the versions
# session 13 downloaded (2026-11-29); session 12 imported flashinfer 0.7.4 with this set's names.
#   bash bench/peers_fetch.sh        # ~244 MB from PyPI, then .peers/part-1..5
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .peers/whl
pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .peers/whl \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  flashinfer-python==0.7.4 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 protobuf==7.36.2 \
  apache-tvm-ffi==0.1.15.post2 cuda-python==13.4.4 cuda-bindings==13.5.0 cuda-core==1.2.2 \
  cuda-pathfinder==1.9.1 cuda-tile==1.7.0 nccl4py==0.6.0 nccl-extensions==0.1.0 \
  nvidia-cudnn-frontend==1.32.0 einops==0.8.2 ninja==1.13.2 click==8.5.1 tabulate==0.10.0 \
  nvidia-ml-py==13.615.71
ls .peers/whl | wc -l
bash bench/peers_split.sh
