// tests/cuda/test_cuda_optim.cu: the optimizer test bodies of tests/test_optim.cpp (plain and subspace
// AdamW, the identity check, moment policies, master weights, validation, memory queries) on the CUDA
// backend: one body, two backends, through tests/backend_under_test.hpp. Every case skips without a
// device, and the binary then exits 77.
#define COMPACT_TEST_CUDA
#include "../test_optim.cpp"
