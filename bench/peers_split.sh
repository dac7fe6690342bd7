#!/usr/bin/env bash
# FlashInfer (issue 12's peer) and its needs are ~254 MB of wheels; a device call carries at most
# 64 MiB with the working tree. This packs .peers/whl/*.whl (pip download --no-deps for Python
# 3.12, manylinux, CUDA 13: flashinfer-python 0.7.4, nvidia-cutlass-dsl(-libs-base, -libs-core, -libs-cu13)
# 4.8.1, protobuf, apache-tvm-ffi, cuda-python/-bindings/-core/-pathfinder/-tile, nccl4py, nccl-extensions,
# nvidia-cudnn-frontend, einops, ninja, click, tabulate, nvidia-ml-py) into one tar split in
# 50 MB pieces, each in its own folder .peers/part-N, for back-to-back device calls (a warm
# machine keeps ignored folders of the repo copy between calls; it goes back after 30 s idle):
#   call k (k = 1..n):  carry [".peers/part-k"]   command: mkdir -p .peers-stage && cp .peers/part-k/* .peers-stage/
#   last call also:     cat .peers-stage/peers.tar.* | tar xf - -C /tmp && \
#                       pip install -q --no-index --no-deps --target /tmp/site /tmp/peers/*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .peers/part-* .peers/peers.tar.*
tar cf - -C .peers --transform 's,^whl,peers,' whl | split -b 50M -d - .peers/peers.tar.
n=0
for f in .peers/peers.tar.*; do n=$((n + 1)); mkdir -p .peers/part-$n; mv "$f" .peers/part-$n/; done
ls -la .peers/part-*/
