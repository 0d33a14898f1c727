// Metal's scalar and vector types as plain C++: half is _Float16 (g++ rounds
// every operation to half, as the GPU does), bfloat a 16-bit struct that
// computes in float and rounds to nearest even.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned long ulong;
typedef _Float16 half;

namespace metal {

template <class T>
constexpr bool is_scalar_v = std::is_arithmetic_v<T> || std::is_same_v<T, _Float16>;

}  // namespace metal

struct bfloat {
  uint16_t bits;

  bfloat() = default;
  constexpr bfloat(float f) : bits(round(f)) {}
  template <class T, std::enable_if_t<metal::is_scalar_v<T> && !std::is_same_v<T, float>, int> = 0>
  constexpr bfloat(T v) : bfloat(static_cast<float>(v)) {}
  constexpr operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }

  static constexpr bfloat from_bits(uint16_t b) {
    bfloat r{};
    r.bits = b;
    return r;
  }
  static constexpr uint16_t round(float f) {
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};
typedef bfloat bfloat16_t;
typedef half float16_t;

namespace metal {
template <class T>
constexpr bool is_floating_v = std::is_floating_point_v<T> || std::is_same_v<T, _Float16> || std::is_same_v<T, bfloat>;
template <class T>
constexpr bool is_number_v = is_scalar_v<T> || std::is_same_v<T, bfloat>;
}  // namespace metal

// bfloat op bfloat stays bfloat; with float or half it widens to float; with an
// integer it stays bfloat (the integer converts to the floating type).
#define EMU_BFLOAT_OP(op)                                                                            \
  constexpr bfloat operator op(bfloat a, bfloat b) { return bfloat(float(a) op float(b)); }         \
  constexpr float operator op(bfloat a, float b) { return float(a) op b; }                          \
  constexpr float operator op(float a, bfloat b) { return a op float(b); }                          \
  constexpr float operator op(bfloat a, half b) { return float(a) op float(b); }                    \
  constexpr float operator op(half a, bfloat b) { return float(a) op float(b); }                    \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                              \
  constexpr bfloat operator op(bfloat a, I b) { return bfloat(float(a) op float(b)); }              \
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>                              \
  constexpr bfloat operator op(I a, bfloat b) { return bfloat(float(a) op float(b)); }              \
  template <class T, std::enable_if_t<metal::is_number_v<T>, int> = 0>                              \
  constexpr bfloat& operator op##=(bfloat & a, T b) { return a = bfloat(float(a) op float(b)); }
EMU_BFLOAT_OP(+)
EMU_BFLOAT_OP(-)
EMU_BFLOAT_OP(*)
EMU_BFLOAT_OP(/)
#undef EMU_BFLOAT_OP
constexpr bfloat operator-(bfloat a) { return bfloat::from_bits(uint16_t(a.bits ^ 0x8000u)); }
constexpr bfloat operator+(bfloat a) { return a; }

namespace metal {

template <class T, int N>
struct vec_storage;
template <class T>
struct alignas(2 * sizeof(T)) vec_storage<T, 2> {
  T x, y;
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 3> {  // Metal pads 3-vectors to 4
  T x, y, z;
};
template <class T>
struct alignas(4 * sizeof(T)) vec_storage<T, 4> {
  T x, y, z, w;
};

template <class T, int N>
struct vec;
template <class T>
struct vec_size : std::integral_constant<int, 1> {};
template <class T, int N>
struct vec_size<vec<T, N>> : std::integral_constant<int, N> {};

// No swizzles (v.xy): only .x .y .z .w and [i].
template <class T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  constexpr vec(T s) {
    for (int i = 0; i < N; ++i) (*this)[i] = s;
  }
  template <class S, std::enable_if_t<is_number_v<S> && !std::is_same_v<S, T>, int> = 0>
  constexpr vec(S s) : vec(T(s)) {}
  template <class U>
  explicit constexpr vec(vec<U, N> other) {
    for (int i = 0; i < N; ++i) (*this)[i] = T(other[i]);
  }
  // float4(a, b, c, d), float4(float2, z, w), float4(float3, w), ...
  template <class A, class B, class... Rest>
  constexpr vec(A a, B b, Rest... rest) {
    static_assert(vec_size<A>::value + vec_size<B>::value + (0 + ... + vec_size<Rest>::value) == N,
                  "vector constructor: wrong number of components");
    int i = 0;
    put(i, a);
    put(i, b);
    (put(i, rest), ...);
  }

  constexpr T& operator[](int i) { return (&this->x)[i]; }
  constexpr const T& operator[](int i) const { return (&this->x)[i]; }

 private:
  template <class U>
  constexpr void put(int& i, U s) {
    if constexpr (vec_size<U>::value == 1) {
      (*this)[i++] = T(s);
    } else {
      for (int k = 0; k < vec_size<U>::value; ++k) (*this)[i++] = T(s[k]);
    }
  }
};

#define EMU_VEC_BINARY(op)                                                                 \
  template <class T, int N>                                                                \
  constexpr vec<T, N> operator op(vec<T, N> a, vec<T, N> b) {                              \
    vec<T, N> r;                                                                           \
    for (int i = 0; i < N; ++i) r[i] = T(a[i] op b[i]);                                    \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class S, std::enable_if_t<is_number_v<S>, int> = 0>            \
  constexpr vec<T, N> operator op(vec<T, N> a, S b) {                                      \
    return a op vec<T, N>(T(b));                                                           \
  }                                                                                        \
  template <class T, int N, class S, std::enable_if_t<is_number_v<S>, int> = 0>            \
  constexpr vec<T, N> operator op(S a, vec<T, N> b) {                                      \
    return vec<T, N>(T(a)) op b;                                                           \
  }                                                                                        \
  template <class T, int N, class S>                                                       \
  constexpr vec<T, N>& operator op##=(vec<T, N>& a, S b) {                                 \
    return a = a op b;                                                                     \
  }
EMU_VEC_BINARY(+)
EMU_VEC_BINARY(-)
EMU_VEC_BINARY(*)
EMU_VEC_BINARY(/)
EMU_VEC_BINARY(%)
EMU_VEC_BINARY(&)
EMU_VEC_BINARY(|)
EMU_VEC_BINARY(^)
EMU_VEC_BINARY(<<)
EMU_VEC_BINARY(>>)
#undef EMU_VEC_BINARY

#define EMU_VEC_COMPARE(op)                                                                \
  template <class T, int N>                                                                \
  constexpr vec<bool, N> operator op(vec<T, N> a, vec<T, N> b) {                           \
    vec<bool, N> r;                                                                        \
    for (int i = 0; i < N; ++i) r[i] = a[i] op b[i];                                       \
    return r;                                                                              \
  }                                                                                        \
  template <class T, int N, class S, std::enable_if_t<is_number_v<S>, int> = 0>            \
  constexpr vec<bool, N> operator op(vec<T, N> a, S b) {                                   \
    return a op vec<T, N>(T(b));                                                           \
  }                                                                                        \
  template <class T, int N, class S, std::enable_if_t<is_number_v<S>, int> = 0>            \
  constexpr vec<bool, N> operator op(S a, vec<T, N> b) {                                   \
    return vec<T, N>(T(a)) op b;                                                           \
  }
EMU_VEC_COMPARE(==)
EMU_VEC_COMPARE(!=)
EMU_VEC_COMPARE(<)
EMU_VEC_COMPARE(<=)
EMU_VEC_COMPARE(>)
EMU_VEC_COMPARE(>=)
EMU_VEC_COMPARE(&&)
EMU_VEC_COMPARE(||)
#undef EMU_VEC_COMPARE

template <class T, int N>
constexpr vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a[i] = T(-a[i]);
  return a;
}
template <class T, int N>
constexpr vec<bool, N> operator!(vec<T, N> a) {
  vec<bool, N> r;
  for (int i = 0; i < N; ++i) r[i] = !a[i];
  return r;
}
template <int N>
constexpr bool all(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (!v[i]) return false;
  return true;
}
template <int N>
constexpr bool any(vec<bool, N> v) {
  for (int i = 0; i < N; ++i)
    if (v[i]) return true;
  return false;
}
constexpr bool all(bool v) { return v; }
constexpr bool any(bool v) { return v; }

// Reinterpret the bits, as Metal's as_type.
template <class To, class From>
inline To as_type(From from) {
  static_assert(sizeof(To) == sizeof(From), "as_type: sizes differ");
  To to;
  std::memcpy(&to, &from, sizeof to);
  return to;
}

}  // namespace metal

#define EMU_VEC_ALIASES(T, name)       \
  typedef metal::vec<T, 2> name##2;    \
  typedef metal::vec<T, 3> name##3;    \
  typedef metal::vec<T, 4> name##4;
EMU_VEC_ALIASES(float, float)
EMU_VEC_ALIASES(half, half)
EMU_VEC_ALIASES(bfloat, bfloat)
EMU_VEC_ALIASES(int, int)
EMU_VEC_ALIASES(uint, uint)
EMU_VEC_ALIASES(short, short)
EMU_VEC_ALIASES(ushort, ushort)
EMU_VEC_ALIASES(char, char)
EMU_VEC_ALIASES(uchar, uchar)
EMU_VEC_ALIASES(long, long)
EMU_VEC_ALIASES(ulong, ulong)
EMU_VEC_ALIASES(bool, bool)
#undef EMU_VEC_ALIASES
