// compact/core/config.hpp: version, namespace and portability macros.
//
// Every other header includes this one first. Macros are prefixed COMPACT_; nothing here depends on
// Eigen or CUDA, so the random-number and index code can be compiled by nvcc as well as by any C++17
// host compiler.
#pragma once

#define COMPACT_VERSION_MAJOR 0
#define COMPACT_VERSION_MINOR 1
#define COMPACT_VERSION_PATCH 0
#define COMPACT_VERSION_STRING "0.1.0"

// A versioned inline namespace keeps binaries built against different versions from silently mixing
// template instantiations (the ODR would otherwise not notice).
#define COMPACT_NAMESPACE_BEGIN                                                                            \
    namespace compact {                                                                                    \
    inline namespace v0_1 {
#define COMPACT_NAMESPACE_END                                                                              \
    }                                                                                                      \
    }

// Host/device annotation: functions marked COMPACT_HD are usable from CUDA kernels when the including
// translation unit is compiled by nvcc, and are ordinary inline functions otherwise.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define COMPACT_HD __host__ __device__
#else
#define COMPACT_HD
#endif

#if defined(__GNUC__) || defined(__clang__)
#define COMPACT_RESTRICT __restrict__
#elif defined(_MSC_VER)
#define COMPACT_RESTRICT __restrict
#else
#define COMPACT_RESTRICT
#endif

// OpenMP is optional: the CPU backend parallelises its loops with it when the translation unit is
// built with -fopenmp (the CMake target does so when OpenMP is found) and runs serially otherwise.
#if defined(_OPENMP)
#define COMPACT_HAS_OPENMP 1
#else
#define COMPACT_HAS_OPENMP 0
#endif

#define COMPACT_PRAGMA(x) _Pragma(#x)
