// compact/random/normal.hpp: the one uniform-to-normal conversion shared by host and device code.
//
// Conversion (documented because CPU and GPU must agree on it):
//   u  = (x + 0.5) * 2^-32 for a 32-bit word x, so u is in (0, 1) and never 0 (log(u) is finite);
//   Box-Muller on a pair (u1, u2): rho = sqrt(-2 log u1), z0 = rho cos(2 pi u2), z1 = rho sin(2 pi u2).
// The arithmetic is done in double and rounded once to the caller's type, so a float result is the
// correctly rounded value of a quantity whose double error is a few ulp of double: host libm and CUDA's
// double log/sin/cos then give the same float almost always, and at most 1 ulp apart otherwise.
// With 32-bit uniforms the largest |z| is sqrt(-2 log 2^-33) ~ 6.76, far outside what a projection
// matrix of any practical size samples.
#pragma once

#include "compact/core/config.hpp"

#include <cmath>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

/// Maps a 32-bit word to the open interval (0, 1).
COMPACT_HD inline double uniform_open01(std::uint32_t x)
{
    return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0);
}

/// Two independent standard normals from two 32-bit words (Box-Muller).
COMPACT_HD inline void box_muller(std::uint32_t a, std::uint32_t b, double& z0, double& z1)
{
    constexpr double two_pi = 6.283185307179586476925286766559;
    const double rho = std::sqrt(-2.0 * std::log(uniform_open01(a)));
    const double theta = two_pi * uniform_open01(b);
    z0 = rho * std::cos(theta);
    z1 = rho * std::sin(theta);
}

COMPACT_NAMESPACE_END
