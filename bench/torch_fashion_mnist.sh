#!/usr/bin/env bash
# Benchmarks compact::torch against torch::nn::Linear on Fashion-MNIST (examples/torch/torch_fashion_mnist)
# and writes the table to bench/results/torch-cpu-<date>.md. torch must run on OpenBLAS (Debian's
# libopenblas0-openmp): Debian's default reference BLAS makes torch ten times slower and the step-time
# ratio meaningless. Both models run on the same threads (torch's intra-op count, which compact uses too).
#
#   bash bench/torch_fashion_mnist.sh [--epochs E] [--batch N] [--threads T]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash .ci/deps libtorch-dev libopenblas0-openmp dataset-fashion-mnist
build=build/bench-torch
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DCOMPACT_BUILD_TESTS=OFF -DCOMPACT_BUILD_BENCH=OFF \
  -DCOMPACT_BUILD_CUDA=OFF >/dev/null
cmake --build "$build" --target torch_fashion_mnist -j2
blas=$(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3 2>/dev/null || echo unknown)
out="bench/results/torch-cpu-$(date +%Y-%m-%d).md"
log=$(OMP_WAIT_POLICY=passive "$build/examples/torch/torch_fashion_mnist" "$@")
echo "$log"
{
  echo "# compact::torch against torch::nn::Linear: Fashion-MNIST MLP (784-1024-1024-10)"
  echo
  echo "\`bash bench/torch_fashion_mnist.sh $*\` on $(nproc) cores ($(lscpu | sed -n 's/^Model name: *//p' | head -1)),"
  echo "libtorch $(dpkg-query -W -f='${Version}' libtorch-dev 2>/dev/null), BLAS $blas."
  echo "nn::Linear + torch::relu + torch::optim::AdamW (lr 1e-3) against compact::torch::Linear at r = n/4"
  echo "(all three layers, P kept for its epoch), compact::torch::ReLU (1-bit masks) and SubspaceAdamW (weights"
  echo "lr 1e-2, alpha 0.25; biases lr 1e-3), same initial weights and batches. Saved bytes: the autograd graph"
  echo "walked at the first step (compact::torch::saved_for_backward), parameters excluded."
  echo
  echo '```'
  echo "$log"
  echo '```'
} > "$out"
echo "wrote $out"
