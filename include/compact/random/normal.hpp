// compact/random/normal.hpp: the one uniform-to-normal conversion shared by host and device code.
//
// Conversion (documented because every backend must agree on it):
//   u = (x + 0.5) 2^-32 for a 32-bit word x, so u is in (0, 1) and never 0 (log u is finite);
//   Box-Muller on a pair of words (a, b): rho = sqrt(-2 log u_a), z0 = rho cos(2 pi u_b),
//   z1 = rho sin(2 pi u_b).
// log, sqrt, cos and sin are evaluated here, in double, with polynomials and exact argument reductions
// (no libm call): the code is branch-free, so loops over it vectorise on the CPU, and the host and a
// GPU evaluate the very same operations. Each is accurate to a few ulp of double, so after the final
// rounding to float the CPU and the GPU agree bit for bit except where a value lies within a few
// 1e-16 of a float rounding boundary (there they differ by 1 ulp of float).
// With 32-bit uniforms the largest |z| is sqrt(-2 log 2^-33) ~ 6.76, far outside what a projection
// matrix of any practical size samples.
#pragma once

#include "compact/core/config.hpp"

#include <cstdint>
#include <cstring>

COMPACT_NAMESPACE_BEGIN

/// Maps a 32-bit word to the open interval (0, 1).
COMPACT_HD inline double uniform_open01(std::uint32_t x)
{
    return (static_cast<double>(x) + 0.5) * (1.0 / 4294967296.0);
}

namespace detail {

/// Natural logarithm of u in (0, 1], to about 2 ulp. u = 2^e m with m in [sqrt(1/2), sqrt(2));
/// log m = 2 atanh(s), s = (m - 1)/(m + 1), |s| < 0.1716, by its series to s^23 (truncation < 1e-18).
COMPACT_HD inline double log_unit(double u)
{
    std::uint64_t bits;
    std::memcpy(&bits, &u, sizeof bits);
    int e = static_cast<int>(bits >> 52) - 1023; // u > 0, so the sign bit is clear
    bits = (bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull;
    double m;
    std::memcpy(&m, &bits, sizeof m);
    const bool high = m > 1.4142135623730951;
    m = high ? 0.5 * m : m;
    e = high ? e + 1 : e;
    const double s = (m - 1.0) / (m + 1.0);
    const double s2 = s * s;
    double p = 1.0 / 23;
    p = p * s2 + 1.0 / 21;
    p = p * s2 + 1.0 / 19;
    p = p * s2 + 1.0 / 17;
    p = p * s2 + 1.0 / 15;
    p = p * s2 + 1.0 / 13;
    p = p * s2 + 1.0 / 11;
    p = p * s2 + 1.0 / 9;
    p = p * s2 + 1.0 / 7;
    p = p * s2 + 1.0 / 5;
    p = p * s2 + 1.0 / 3;
    const double log_m = 2.0 * s + 2.0 * s * s2 * p;
    constexpr double ln2_hi = 6.93147180369123816490e-01; // ln 2 split so that e ln2_hi is exact
    constexpr double ln2_lo = 1.90821492927058770002e-10;
    const double ed = static_cast<double>(e);
    return ed * ln2_hi + (ed * ln2_lo + log_m);
}

/// sqrt(x) for a positive normal x, to about 1 ulp, without a libm call: three-term Newton iterations
/// for 1/sqrt(x) from a bit-pattern estimate (3.4% off: 4 iterations reach double precision), then one
/// Newton correction of x/sqrt(x). Branch-free (std::sqrt may set errno, which stops vectorisation).
COMPACT_HD inline double sqrt_moderate(double x)
{
    std::uint64_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    bits = 0x5FE6EB50C7B537A9ull - (bits >> 1);
    double y;
    std::memcpy(&y, &bits, sizeof y);
    const double half_x = 0.5 * x;
    for (int it = 0; it < 4; ++it) y = y * (1.5 - half_x * y * y);
    const double root = x * y;
    return root + 0.5 * y * (x - root * root);
}

/// cos(2 pi u) and sin(2 pi u) for u in [0, 1), to about 2 ulp. The reduction is exact: 4u = q + g with
/// q the nearest integer, so 2 pi u = q pi/2 + a with a = g pi/2 in [-pi/4, pi/4]; Taylor series to a^17.
COMPACT_HD inline void cos_sin_2pi(double u, double& c, double& s)
{
    const double t = 4.0 * u;
    const int quadrant_index = static_cast<int>(t + 0.5); // floor, as t + 0.5 > 0
    const double a = (t - static_cast<double>(quadrant_index)) * 1.5707963267948966;
    const double a2 = a * a;
    double ps = -1.0 / 355687428096000.0; // -1/17!
    ps = ps * a2 + 1.0 / 1307674368000.0;
    ps = ps * a2 - 1.0 / 6227020800.0;
    ps = ps * a2 + 1.0 / 39916800.0;
    ps = ps * a2 - 1.0 / 362880.0;
    ps = ps * a2 + 1.0 / 5040.0;
    ps = ps * a2 - 1.0 / 120.0;
    ps = ps * a2 + 1.0 / 6.0;
    const double sin_a = a - a * a2 * ps;
    double pc = 1.0 / 6402373705728000.0; // 1/18!
    pc = pc * a2 - 1.0 / 20922789888000.0;
    pc = pc * a2 + 1.0 / 87178291200.0;
    pc = pc * a2 - 1.0 / 479001600.0;
    pc = pc * a2 + 1.0 / 3628800.0;
    pc = pc * a2 - 1.0 / 40320.0;
    pc = pc * a2 + 1.0 / 720.0;
    pc = pc * a2 - 1.0 / 24.0;
    pc = pc * a2 + 0.5;
    const double cos_a = 1.0 - a2 * pc;
    const int quadrant = quadrant_index & 3;
    const bool swap = quadrant & 1;
    const double c0 = swap ? sin_a : cos_a;
    const double s0 = swap ? cos_a : sin_a;
    c = (quadrant == 1 || quadrant == 2) ? -c0 : c0;
    s = (quadrant >= 2) ? -s0 : s0;
}

} // namespace detail

/// Two independent standard normals from two 32-bit words (Box-Muller).
COMPACT_HD inline void box_muller(std::uint32_t a, std::uint32_t b, double& z0, double& z1)
{
    // -2 log u lies in [2^-32, 46]: inside sqrt_moderate's range.
    const double rho = detail::sqrt_moderate(-2.0 * detail::log_unit(uniform_open01(a)));
    double c, s;
    detail::cos_sin_2pi(uniform_open01(b), c, s);
    z0 = rho * c;
    z1 = rho * s;
}

COMPACT_NAMESPACE_END
