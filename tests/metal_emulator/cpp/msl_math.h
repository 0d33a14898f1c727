// metal:: math, with metal::fast and metal::precise as aliases of the same
// functions (the emulator has one accuracy: the host libm's). half and bfloat
// compute in float and round once, as the GPU's float units do.
#pragma once

#include <cmath>
#include <limits>

#include "msl_types.h"

namespace metal {

#define EMU_FLOAT_UNARY(name, expr)                                              \
  inline float name(float x) { return expr; }                                    \
  inline half name(half x) { return half(name(float(x))); }                      \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }                \
  template <class T, int N>                                                      \
  inline vec<T, N> name(vec<T, N> v) {                                           \
    for (int i = 0; i < N; ++i) v[i] = name(v[i]);                               \
    return v;                                                                    \
  }
EMU_FLOAT_UNARY(exp, std::exp(x))
EMU_FLOAT_UNARY(exp2, std::exp2(x))
EMU_FLOAT_UNARY(exp10, std::pow(10.0f, x))
EMU_FLOAT_UNARY(log, std::log(x))
EMU_FLOAT_UNARY(log2, std::log2(x))
EMU_FLOAT_UNARY(log10, std::log10(x))
EMU_FLOAT_UNARY(sqrt, std::sqrt(x))
EMU_FLOAT_UNARY(rsqrt, 1.0f / std::sqrt(x))
EMU_FLOAT_UNARY(sin, std::sin(x))
EMU_FLOAT_UNARY(cos, std::cos(x))
EMU_FLOAT_UNARY(tan, std::tan(x))
EMU_FLOAT_UNARY(asin, std::asin(x))
EMU_FLOAT_UNARY(acos, std::acos(x))
EMU_FLOAT_UNARY(atan, std::atan(x))
EMU_FLOAT_UNARY(sinh, std::sinh(x))
EMU_FLOAT_UNARY(cosh, std::cosh(x))
EMU_FLOAT_UNARY(tanh, std::tanh(x))
EMU_FLOAT_UNARY(asinh, std::asinh(x))
EMU_FLOAT_UNARY(acosh, std::acosh(x))
EMU_FLOAT_UNARY(atanh, std::atanh(x))
EMU_FLOAT_UNARY(floor, std::floor(x))
EMU_FLOAT_UNARY(ceil, std::ceil(x))
EMU_FLOAT_UNARY(round, std::round(x))
EMU_FLOAT_UNARY(rint, std::nearbyint(x))
EMU_FLOAT_UNARY(trunc, std::trunc(x))
EMU_FLOAT_UNARY(fabs, std::fabs(x))
EMU_FLOAT_UNARY(fract, std::fmin(x - std::floor(x), 0x1.fffffep-1f))
EMU_FLOAT_UNARY(sign, x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : std::isnan(x) ? 0.0f : x)
EMU_FLOAT_UNARY(saturate, std::fmin(std::fmax(x, 0.0f), 1.0f))
#undef EMU_FLOAT_UNARY

#define EMU_FLOAT_BINARY(name, expr)                                             \
  inline float name(float x, float y) { return expr; }                           \
  inline half name(half x, half y) { return half(name(float(x), float(y))); }    \
  inline bfloat name(bfloat x, bfloat y) { return bfloat(name(float(x), float(y))); } \
  template <class T, int N>                                                      \
  inline vec<T, N> name(vec<T, N> a, vec<T, N> b) {                              \
    for (int i = 0; i < N; ++i) a[i] = name(a[i], b[i]);                         \
    return a;                                                                    \
  }
EMU_FLOAT_BINARY(pow, std::pow(x, y))
EMU_FLOAT_BINARY(powr, std::pow(x, y))
EMU_FLOAT_BINARY(atan2, std::atan2(x, y))
EMU_FLOAT_BINARY(fmin, std::fmin(x, y))
EMU_FLOAT_BINARY(fmax, std::fmax(x, y))
EMU_FLOAT_BINARY(fmod, std::fmod(x, y))
EMU_FLOAT_BINARY(copysign, std::copysign(x, y))
EMU_FLOAT_BINARY(fdim, std::fdim(x, y))
EMU_FLOAT_BINARY(divide, x / y)
EMU_FLOAT_BINARY(step, y < x ? 0.0f : 1.0f)
#undef EMU_FLOAT_BINARY

// min/max: fmin/fmax for floating types (a NaN operand loses), plain for integers.
template <class T>
constexpr T min(T a, T b) {
  if constexpr (is_floating_v<T>) return T(std::fmin(float(a), float(b)));
  else return b < a ? b : a;
}
template <class T>
constexpr T max(T a, T b) {
  if constexpr (is_floating_v<T>) return T(std::fmax(float(a), float(b)));
  else return a < b ? b : a;
}
template <class T, int N>
constexpr vec<T, N> min(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = min(a[i], b[i]);
  return a;
}
template <class T, int N>
constexpr vec<T, N> max(vec<T, N> a, vec<T, N> b) {
  for (int i = 0; i < N; ++i) a[i] = max(a[i], b[i]);
  return a;
}
template <class T, class L, class H>
constexpr T clamp(T x, L lo, H hi) {
  return min(max(x, T(lo)), T(hi));
}
template <class T>
constexpr T abs(T x) {
  if constexpr (is_floating_v<T>) return T(std::fabs(float(x)));
  else return x < T(0) ? T(-x) : x;
}
template <class T, int N>
constexpr vec<T, N> abs(vec<T, N> v) {
  for (int i = 0; i < N; ++i) v[i] = abs(v[i]);
  return v;
}

template <class T>
constexpr T min3(T a, T b, T c) {
  return min(min(a, b), c);
}
template <class T>
constexpr T max3(T a, T b, T c) {
  return max(max(a, b), c);
}
template <class T>
constexpr T fmin3(T a, T b, T c) {
  return min3(a, b, c);
}
template <class T>
constexpr T fmax3(T a, T b, T c) {
  return max3(a, b, c);
}

// Integer bit functions (MSL: popcount, clz, ctz) on the value's own width.
template <class T>
constexpr T popcount(T x) {
  return T(__builtin_popcountll(static_cast<unsigned long long>(std::make_unsigned_t<T>(x))));
}
template <class T>
constexpr T clz(T x) {
  auto u = static_cast<unsigned long long>(std::make_unsigned_t<T>(x));
  return T(u == 0 ? 8 * sizeof(T) : __builtin_clzll(u) - 8 * (sizeof(unsigned long long) - sizeof(T)));
}
template <class T>
constexpr T ctz(T x) {
  auto u = static_cast<unsigned long long>(std::make_unsigned_t<T>(x));
  return T(u == 0 ? 8 * sizeof(T) : __builtin_ctzll(u));
}

inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline half fma(half a, half b, half c) { return half(std::fma(float(a), float(b), float(c))); }
inline bfloat fma(bfloat a, bfloat b, bfloat c) { return bfloat(std::fma(float(a), float(b), float(c))); }
template <class T, int N>
inline vec<T, N> fma(vec<T, N> a, vec<T, N> b, vec<T, N> c) {
  for (int i = 0; i < N; ++i) a[i] = fma(a[i], b[i], c[i]);
  return a;
}
template <class T>
inline T mad(T a, T b, T c) {
  return fma(a, b, c);
}
template <class T, class U>
constexpr T mix(T a, T b, U t) {
  return a + (b - a) * t;
}
template <class T>
constexpr T select(T a, T b, bool c) {
  return c ? b : a;
}
template <class T, int N>
constexpr vec<T, N> select(vec<T, N> a, vec<T, N> b, vec<bool, N> c) {
  for (int i = 0; i < N; ++i) a[i] = c[i] ? b[i] : a[i];
  return a;
}
template <class T>
inline T smoothstep(T e0, T e1, T x) {
  T t = clamp((x - e0) / (e1 - e0), T(0), T(1));
  return t * t * (T(3) - T(2) * t);
}

#define EMU_FLOAT_TEST(name, expr)                                   \
  inline bool name(float x) { return expr; }                         \
  inline bool name(half x) { return name(float(x)); }                \
  inline bool name(bfloat x) { return name(float(x)); }              \
  template <class T, int N>                                          \
  inline vec<bool, N> name(vec<T, N> v) {                            \
    vec<bool, N> r;                                                  \
    for (int i = 0; i < N; ++i) r[i] = name(v[i]);                   \
    return r;                                                        \
  }
EMU_FLOAT_TEST(isnan, std::isnan(x))
EMU_FLOAT_TEST(isinf, std::isinf(x))
EMU_FLOAT_TEST(isfinite, std::isfinite(x))
EMU_FLOAT_TEST(signbit, std::signbit(x))
#undef EMU_FLOAT_TEST

template <class T, int N>
constexpr T dot(vec<T, N> a, vec<T, N> b) {
  T r = T(a[0] * b[0]);
  for (int i = 1; i < N; ++i) r = T(r + a[i] * b[i]);
  return r;
}
template <class T, int N>
inline T length(vec<T, N> v) {
  return sqrt(dot(v, v));
}
template <class T, int N>
inline vec<T, N> normalize(vec<T, N> v) {
  return v * rsqrt(dot(v, v));
}

namespace fast {
using namespace ::metal;
}
namespace precise {
using namespace ::metal;
}

// libstdc++ 12 has no numeric_limits for _Float16 (it answers 0 for all).
template <class T>
struct numeric_limits : std::numeric_limits<T> {};
template <>
struct numeric_limits<half> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, has_infinity = true;
  static constexpr int digits = 11;
  static constexpr half min() { return half(0x1p-14f); }
  static constexpr half max() { return half(65504.0f); }
  static constexpr half lowest() { return half(-65504.0f); }
  static constexpr half epsilon() { return half(0x1p-10f); }
  static constexpr half infinity() { return half(__builtin_inff()); }
  static constexpr half quiet_NaN() { return half(__builtin_nanf("")); }
  static constexpr half denorm_min() { return half(0x1p-24f); }
};
template <>
struct numeric_limits<bfloat> {
  static constexpr bool is_specialized = true, is_signed = true, is_integer = false, has_infinity = true;
  static constexpr int digits = 8;
  static constexpr bfloat min() { return bfloat::from_bits(0x0080); }
  static constexpr bfloat max() { return bfloat::from_bits(0x7f7f); }
  static constexpr bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static constexpr bfloat epsilon() { return bfloat::from_bits(0x3c00); }
  static constexpr bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static constexpr bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
  static constexpr bfloat denorm_min() { return bfloat::from_bits(0x0001); }
};

}  // namespace metal
