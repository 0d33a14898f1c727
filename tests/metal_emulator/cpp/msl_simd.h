// Barriers and simdgroup / quadgroup functions. Every simd call is one lockstep
// exchange among the live lanes of the simdgroup (the runtime gathers all lane
// values); each lane then computes its own answer from them. A full-simdgroup
// reduction is the ascending xor butterfly (1, 2, 4, 8, 16), the tree the GPU
// uses, so results are bitwise what the hardware gives.
#pragma once

#include <cstring>
#include <source_location>

#include "msl_math.h"
#include "runtime_api.h"

namespace metal {

enum mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4, mem_threadgroup_imageblock = 8 };
constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

namespace detail {

inline emu::Site site(const std::source_location& loc) {
  return emu::Site{loc.file_name(), unsigned(loc.line()), unsigned(loc.column())};
}

// Each lane's value after the exchange; lanes that took no part read as
// 0xFF bytes (NaN), as an inactive lane's value is undefined on the GPU.
template <class T>
struct Lanes {
  T value[emu::kSimdWidth];
  uint32_t active;
  unsigned lane;
  bool has(unsigned i) const { return i < emu::kSimdWidth && (active >> i & 1u); }
};

template <class T>
Lanes<T> exchange(T x, const char* op, const std::source_location& loc) {
  static_assert(std::is_trivially_copyable_v<T>, "simd functions need trivially copyable values");
  emu::SimdLanes got = emu::simd_exchange(&x, sizeof(T), op, site(loc));
  Lanes<T> lanes;
  for (unsigned i = 0; i < emu::kSimdWidth; ++i)
    std::memcpy(&lanes.value[i], got.slots + i * emu::kSimdSlotBytes, sizeof(T));
  lanes.active = got.active;
  lanes.lane = got.lane;
  return lanes;
}

// The xor butterfly over `width` lanes (32 for simd, 4 for quad functions).
// Absent lanes hold `fill`: the identity for sum/prod/or/xor, a copy of a live
// lane for min/max/and, so every live lane gets the same answer.
template <class T, class Op>
T butterfly(Lanes<T> lanes, Op op, bool identity_fill, T identity, unsigned width) {
  unsigned base = lanes.lane / width * width;
  T v[emu::kSimdWidth];
  T fill = identity;
  if (!identity_fill)
    for (unsigned i = base; i < base + width; ++i)
      if (lanes.has(i)) {
        fill = lanes.value[i];
        break;
      }
  for (unsigned i = 0; i < width; ++i) v[i] = lanes.has(base + i) ? lanes.value[base + i] : fill;
  for (unsigned step = 1; step < width; step <<= 1) {
    T next[emu::kSimdWidth];
    for (unsigned i = 0; i < width; ++i) next[i] = T(op(v[i], v[i ^ step]));
    for (unsigned i = 0; i < width; ++i) v[i] = next[i];
  }
  return v[lanes.lane - base];
}

template <class T>
T poison() {
  T t;
  std::memset(&t, 0xFF, sizeof t);
  return t;
}

template <class T>
T read_lane(const Lanes<T>& lanes, unsigned i) {
  return lanes.has(i) ? lanes.value[i] : poison<T>();
}

template <class T>
struct elem_limits : numeric_limits<T> {};
template <class T, int N>
struct elem_limits<vec<T, N>> {
  static vec<T, N> lowest() { return vec<T, N>(numeric_limits<T>::lowest()); }
};

struct Add {
  template <class T>
  T operator()(T a, T b) const { return T(a + b); }
};
struct Mul {
  template <class T>
  T operator()(T a, T b) const { return T(a * b); }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const { return max(a, b); }
};
struct Min {
  template <class T>
  T operator()(T a, T b) const { return min(a, b); }
};
struct And {
  template <class T>
  T operator()(T a, T b) const { return T(a & b); }
};
struct Or {
  template <class T>
  T operator()(T a, T b) const { return T(a | b); }
};
struct Xor {
  template <class T>
  T operator()(T a, T b) const { return T(a ^ b); }
};

template <class T, class Op>
T scan(const Lanes<T>& lanes, Op op, T identity, bool inclusive) {
  T acc = identity;
  for (unsigned i = 0; i < lanes.lane; ++i)
    if (lanes.has(i)) acc = op(acc, lanes.value[i]);
  return inclusive ? op(acc, lanes.value[lanes.lane]) : acc;
}

}  // namespace detail

using SourceLoc = std::source_location;
#define EMU_HERE SourceLoc loc = SourceLoc::current()

inline void threadgroup_barrier(mem_flags, EMU_HERE) { emu::threadgroup_barrier(detail::site(loc)); }
inline void simdgroup_barrier(mem_flags, EMU_HERE) { detail::exchange(0, "simdgroup_barrier", loc); }

#define EMU_SIMD_REDUCE(name, width, op, identity_fill, identity)                                  \
  template <class T>                                                                              \
  T name(T x, EMU_HERE) {                                                                         \
    return detail::butterfly(detail::exchange(x, #name, loc), detail::op(), identity_fill, identity, width); \
  }
EMU_SIMD_REDUCE(simd_sum, 32, Add, true, T(0))
EMU_SIMD_REDUCE(simd_product, 32, Mul, true, T(1))
EMU_SIMD_REDUCE(simd_max, 32, Max, false, T(x))
EMU_SIMD_REDUCE(simd_min, 32, Min, false, T(x))
EMU_SIMD_REDUCE(simd_and, 32, And, false, T(x))
EMU_SIMD_REDUCE(simd_or, 32, Or, true, T(0))
EMU_SIMD_REDUCE(simd_xor, 32, Xor, true, T(0))
EMU_SIMD_REDUCE(quad_sum, 4, Add, true, T(0))
EMU_SIMD_REDUCE(quad_product, 4, Mul, true, T(1))
EMU_SIMD_REDUCE(quad_max, 4, Max, false, T(x))
EMU_SIMD_REDUCE(quad_min, 4, Min, false, T(x))
#undef EMU_SIMD_REDUCE

template <class T>
T simd_shuffle(T x, ushort lane, EMU_HERE) {
  return detail::read_lane(detail::exchange(x, "simd_shuffle", loc), lane);
}
template <class T>
T simd_broadcast(T x, ushort lane, EMU_HERE) {
  return detail::read_lane(detail::exchange(x, "simd_broadcast", loc), lane);
}
template <class T>
T simd_shuffle_xor(T x, ushort mask, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_xor", loc);
  return detail::read_lane(lanes, (lanes.lane ^ mask) % emu::kSimdWidth);
}
// Lanes whose source is past the end keep their own value (MSL).
template <class T>
T simd_shuffle_down(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_down", loc);
  unsigned from = lanes.lane + delta;
  return from < emu::kSimdWidth ? detail::read_lane(lanes, from) : x;
}
template <class T>
T simd_shuffle_up(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_up", loc);
  return lanes.lane >= delta ? detail::read_lane(lanes, lanes.lane - delta) : x;
}
template <class T>
T simd_shuffle_rotate_down(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_rotate_down", loc);
  return detail::read_lane(lanes, (lanes.lane + delta) % emu::kSimdWidth);
}
template <class T>
T simd_shuffle_rotate_up(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_rotate_up", loc);
  return detail::read_lane(lanes, (lanes.lane + emu::kSimdWidth - delta % emu::kSimdWidth) % emu::kSimdWidth);
}
template <class T>
T simd_shuffle_and_fill_down(T x, T fill, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_and_fill_down", loc);
  unsigned from = lanes.lane + delta;
  return from < emu::kSimdWidth ? detail::read_lane(lanes, from) : fill;
}
template <class T>
T simd_shuffle_and_fill_up(T x, T fill, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_shuffle_and_fill_up", loc);
  return lanes.lane >= delta ? detail::read_lane(lanes, lanes.lane - delta) : fill;
}
template <class T>
T simd_broadcast_first(T x, EMU_HERE) {
  auto lanes = detail::exchange(x, "simd_broadcast_first", loc);
  return detail::read_lane(lanes, unsigned(__builtin_ctz(lanes.active)));
}
template <class T>
T simd_prefix_exclusive_sum(T x, EMU_HERE) {
  return detail::scan(detail::exchange(x, "simd_prefix_exclusive_sum", loc), detail::Add(), T(0), false);
}
template <class T>
T simd_prefix_inclusive_sum(T x, EMU_HERE) {
  return detail::scan(detail::exchange(x, "simd_prefix_inclusive_sum", loc), detail::Add(), T(0), true);
}
template <class T>
T simd_prefix_exclusive_product(T x, EMU_HERE) {
  return detail::scan(detail::exchange(x, "simd_prefix_exclusive_product", loc), detail::Mul(), T(1), false);
}
template <class T>
T simd_prefix_inclusive_product(T x, EMU_HERE) {
  return detail::scan(detail::exchange(x, "simd_prefix_inclusive_product", loc), detail::Mul(), T(1), true);
}
inline bool simd_any(bool x, EMU_HERE) {
  return detail::butterfly(detail::exchange(x, "simd_any", loc), detail::Or(), true, false, 32);
}
inline bool simd_all(bool x, EMU_HERE) {
  return detail::butterfly(detail::exchange(x, "simd_all", loc), detail::And(), false, x, 32);
}
inline bool simd_is_first(EMU_HERE) {
  auto lanes = detail::exchange(0, "simd_is_first", loc);
  return lanes.lane == unsigned(__builtin_ctz(lanes.active));
}

template <class T>
T quad_shuffle(T x, ushort lane, EMU_HERE) {
  auto lanes = detail::exchange(x, "quad_shuffle", loc);
  return detail::read_lane(lanes, lanes.lane / 4 * 4 + lane % 4);
}
template <class T>
T quad_broadcast(T x, ushort lane, EMU_HERE) {
  auto lanes = detail::exchange(x, "quad_broadcast", loc);
  return detail::read_lane(lanes, lanes.lane / 4 * 4 + lane % 4);
}
template <class T>
T quad_shuffle_xor(T x, ushort mask, EMU_HERE) {
  auto lanes = detail::exchange(x, "quad_shuffle_xor", loc);
  return detail::read_lane(lanes, lanes.lane / 4 * 4 + (lanes.lane % 4 ^ mask % 4));
}
template <class T>
T quad_shuffle_down(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "quad_shuffle_down", loc);
  unsigned from = lanes.lane % 4 + delta;
  return from < 4 ? detail::read_lane(lanes, lanes.lane / 4 * 4 + from) : x;
}
template <class T>
T quad_shuffle_up(T x, ushort delta, EMU_HERE) {
  auto lanes = detail::exchange(x, "quad_shuffle_up", loc);
  return lanes.lane % 4 >= delta ? detail::read_lane(lanes, lanes.lane - delta) : x;
}

#undef EMU_HERE

}  // namespace metal
