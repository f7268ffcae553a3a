#!/usr/bin/env bash
# Benchmarks compact::torch against torch::nn::Linear on Fashion-MNIST (examples/torch/torch_fashion_mnist)
# and writes the table to bench/results/torch-cpu-<date>.md. torch must run on OpenBLAS (Debian's
# libopenblas0-openmp): Debian's default reference BLAS makes torch ten times slower and the step-time
# ratio meaningless. Both models run on the same threads (torch's intra-op count, which compact uses too).
#
#   bash bench/torch_fashion_mnist.sh [--batches "256 1024"] [--epochs E] [--threads T]
#
# Runs the example once per batch size (default 256 and 1024: the step-time ratio depends on it, since
# the optimizer's m r n projection back does not shrink with the batch while everything else does).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command_line="bash bench/torch_fashion_mnist.sh${*:+ $*}"
bash .ci/deps libtorch-dev libopenblas0-openmp dataset-fashion-mnist
build=build/bench-torch
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCOMPACT_BUILD_TESTS=OFF -DCOMPACT_BUILD_BENCH=OFF \
  -DCOMPACT_BUILD_CUDA=OFF >/dev/null
cmake --build "$build" --target torch_fashion_mnist -j2
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)
out="bench/results/torch-cpu-$(date +%Y-%m-%d).md"
batches="256 1024"
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --batches) batches="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
log=""
for batch in $batches; do
  run=$(OMP_WAIT_POLICY=passive "$build/examples/torch/torch_fashion_mnist" --batch "$batch" "${args[@]}")
  echo "$run"
  log+="$run"$'\n\n'
done
{
  echo "# compact::torch against torch::nn::Linear: Fashion-MNIST MLP (784-1024-1024-10)"
  echo
  echo "\`$command_line\` on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)),"
  echo "libtorch $(dpkg-query -W -f='${Version}' libtorch-dev 2>/dev/null), BLAS $blas."
  echo "nn::Linear + torch::relu + torch::optim::AdamW (lr 1e-3) against compact::torch::Linear at r = n/4"
  echo "(all three layers, a new P every 50 updates, kept for its epoch; the compressor's products on torch's"
  echo "BLAS), compact::torch::ReLU (1-bit masks) and SubspaceAdamW (weights"
  echo "lr 1e-2, alpha 0.25; biases lr 1e-3), same initial weights and batches. Saved bytes: the autograd graph"
  echo "walked at the first step (compact::torch::saved_for_backward), parameters excluded."
  echo
  echo '```'
  printf '%s' "$log"
  echo '```'
} > "$out"
echo "wrote $out"
