// Compiles compact::torch's CUDA path (COMPACT_TORCH_CUDA: Linear on CUDA tensors through compact::cuda on
// ATen's current stream and cuBLAS handle) with nvcc against libtorch's headers. Debian's libtorch is
// CPU-only, so this is compiled, never linked or run.
#define COMPACT_TORCH_CUDA 1
#include <compact/torch.hpp>

// Every dtype path of Linear's forward and backward, for the projection and for a store.
template class compact::torch::LinearImpl<compact::rank::ratio<1, 4>>;
template class compact::torch::LinearImpl<compact::quantized>;
template struct compact::torch::detail::LinearBackward<compact::rank::ratio<1, 4>>;
template struct compact::torch::detail::LinearBackward<compact::quantized>;
