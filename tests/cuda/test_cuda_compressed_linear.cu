// The CUDA twin of tests/test_compressed_linear.cpp: the same test bodies (compressed_linear,
// projection_source, input_group) run on the CUDA backend through tests/backend_under_test.hpp, on
// device memory and an owned stream + cuBLAS handle. Every case skips without a GPU (the binary then
// exits 77); the CPU-only cases (thread counts) are left out by the included file.
#define COMPACT_TEST_CUDA
#include "../test_compressed_linear.cpp"
