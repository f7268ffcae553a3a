// tests/cuda/test_cuda_linear_layer.cu: the generic bodies of tests/test_linear_layer.cpp (the owning
// linear_layer: training, the caller-memory API bit for bit, keep_projection, gradient accumulation,
// determinism, resampling, memory queries and errors) on the CUDA backend, through
// backend_under_test.hpp. Every case needs a GPU and is skipped without one (the binary then exits 77);
// the CPU-only cases of that file (thread counts, compact::cpu master-weight layers) are left out.
#define COMPACT_TEST_CUDA
#include "../test_linear_layer.cpp"
