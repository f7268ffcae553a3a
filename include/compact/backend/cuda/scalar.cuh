// compact/backend/cuda/scalar.cuh: the storage types the CUDA backend handles, and their conversions.
//
// float and double compute in themselves; __half and __nv_bfloat16 are storage types that compute in
// float (compute_t). to_double / from_double convert on host and device alike; from_double rounds
// once, to nearest with ties to even, straight from double (no double rounding through float).
// mul / add / div / sqrt round each operation separately on the device (no FMA contraction), so an
// elementwise kernel evaluates the same expression, in the same order, as the CPU backend's loop.
#pragma once

#include "compact/core/config.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN
namespace detail {

template <class T>
struct cuda_compute {
    using type = T;
};
template <>
struct cuda_compute<__half> {
    using type = float;
};
template <>
struct cuda_compute<__nv_bfloat16> {
    using type = float;
};

/// The type kernels compute in for storage type T.
template <class T>
using compute_t = typename cuda_compute<std::remove_cv_t<T>>::type;

/// The type kernels compute in when reading X and writing Y (float for any mix of 16-bit and float).
template <class X, class Y>
using common_compute_t = std::common_type_t<compute_t<X>, compute_t<Y>>;

COMPACT_HD inline double to_double(double x) { return x; }
COMPACT_HD inline double to_double(float x) { return static_cast<double>(x); }
COMPACT_HD inline double to_double(__half x) { return static_cast<double>(__half2float(x)); }
COMPACT_HD inline double to_double(__nv_bfloat16 x) { return static_cast<double>(__bfloat162float(x)); }

template <class T>
COMPACT_HD T from_double(double x);
template <>
COMPACT_HD inline double from_double<double>(double x)
{
    return x;
}
template <>
COMPACT_HD inline float from_double<float>(double x)
{
    return static_cast<float>(x);
}
template <>
COMPACT_HD inline __half from_double<__half>(double x)
{
    return __double2half(x);
}
template <>
COMPACT_HD inline __nv_bfloat16 from_double<__nv_bfloat16>(double x)
{
    return __double2bfloat16(x);
}

/// Storage to compute type and back (exact widening; rounding to nearest even on the way back).
COMPACT_HD inline float to_compute(__half x) { return __half2float(x); }
COMPACT_HD inline float to_compute(__nv_bfloat16 x) { return __bfloat162float(x); }
COMPACT_HD inline float to_compute(float x) { return x; }
COMPACT_HD inline double to_compute(double x) { return x; }

template <class T, class C>
COMPACT_HD T from_compute(C x)
{
    if constexpr (std::is_same_v<T, __half>) return __float2half_rn(static_cast<float>(x));
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(x));
    else return static_cast<T>(x);
}

#if defined(__CUDA_ARCH__)
__device__ inline float mul(float a, float b) { return __fmul_rn(a, b); }
__device__ inline double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ inline float add(float a, float b) { return __fadd_rn(a, b); }
__device__ inline double add(double a, double b) { return __dadd_rn(a, b); }
__device__ inline float div(float a, float b) { return __fdiv_rn(a, b); }
__device__ inline double div(double a, double b) { return __ddiv_rn(a, b); }
__device__ inline float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ inline double sqrt_rn(double a) { return __dsqrt_rn(a); }
#else
template <class C>
inline C mul(C a, C b)
{
    return a * b;
}
template <class C>
inline C add(C a, C b)
{
    return a + b;
}
template <class C>
inline C div(C a, C b)
{
    return a / b;
}
template <class C>
inline C sqrt_rn(C a)
{
    return std::sqrt(a);
}
#endif

} // namespace detail
COMPACT_NAMESPACE_END
