// compact/backend/cpu/detail/eigen_core.hpp: <Eigen/Core>, included the one way the CPU backend needs it.
//
// GCC 12 at -O3 with AVX-512 reports -Wmaybe-uninitialized inside its own intrinsics
// (_mm512_undefined_*) once Eigen's GEMM kernel is inlined; the diagnostic state at the include
// decides, so Eigen is included here with that one warning off, and users' -Werror builds stay clean.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <Eigen/Core>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
