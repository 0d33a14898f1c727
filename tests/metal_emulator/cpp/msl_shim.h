// The "MSL shim": what a kernel body may use, as C++20 for g++. Every host
// header comes first; only then are Metal's address-space words (device,
// constant, thread, threadgroup) and `kernel` defined away, because
// libstdc++ uses some of them as identifiers.
#pragma once

#include "msl_types.h"
#include "msl_math.h"
#include "msl_simd.h"
#include "msl_atomic.h"

namespace emu {
// Storage for a `threadgroup T name[N];` declaration, which the emulator
// rewrites to `auto& name = *emu::threadgroup_array<T[N]>();`.
template <class A>
A* threadgroup_array(std::source_location loc = std::source_location::current()) {
  return static_cast<A*>(threadgroup_memory(sizeof(A), alignof(A), metal::detail::site(loc)));
}
inline metal::vec<uint, 3> uint3_of(const uint32_t (&v)[3]) { return metal::vec<uint, 3>(v[0], v[1], v[2]); }
}  // namespace emu

#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline

using namespace metal;

#include "mlx_utils.h"
