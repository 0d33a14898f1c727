// Metal atomics (relaxed only, as Metal: no happens-before for TSan either).
// atomic<T> has T's layout, so
// an `atomic_outputs` buffer is the plain output array.
#pragma once

#include <atomic>

#include "msl_types.h"

namespace metal {

enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel,
                    memory_order_seq_cst };

template <class T>
struct atomic {
  T value;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;

namespace detail {
template <class T>
std::atomic_ref<T> ref(atomic<T>* object) {
  return std::atomic_ref<T>(object->value);
}
template <class T>
std::atomic_ref<T> ref(const atomic<T>* object) {
  return std::atomic_ref<T>(const_cast<T&>(object->value));
}
}  // namespace detail

template <class T, class U>
void atomic_store_explicit(atomic<T>* object, U desired, memory_order) {
  detail::ref(object).store(T(desired), std::memory_order_relaxed);
}
template <class T>
T atomic_load_explicit(const atomic<T>* object, memory_order) {
  return detail::ref(object).load(std::memory_order_relaxed);
}
template <class T, class U>
T atomic_exchange_explicit(atomic<T>* object, U desired, memory_order) {
  return detail::ref(object).exchange(T(desired), std::memory_order_relaxed);
}
template <class T, class U>
bool atomic_compare_exchange_weak_explicit(atomic<T>* object, T* expected, U desired, memory_order, memory_order) {
  return detail::ref(object).compare_exchange_strong(*expected, T(desired), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_add_explicit(atomic<T>* object, U operand, memory_order) {
  return detail::ref(object).fetch_add(T(operand), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_sub_explicit(atomic<T>* object, U operand, memory_order) {
  return detail::ref(object).fetch_sub(T(operand), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_and_explicit(atomic<T>* object, U operand, memory_order) {
  return detail::ref(object).fetch_and(T(operand), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_or_explicit(atomic<T>* object, U operand, memory_order) {
  return detail::ref(object).fetch_or(T(operand), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_xor_explicit(atomic<T>* object, U operand, memory_order) {
  return detail::ref(object).fetch_xor(T(operand), std::memory_order_relaxed);
}
template <class T, class U>
T atomic_fetch_max_explicit(atomic<T>* object, U operand, memory_order) {
  auto r = detail::ref(object);
  T old = r.load(std::memory_order_relaxed);
  while (old < T(operand) && !r.compare_exchange_weak(old, T(operand), std::memory_order_relaxed)) {
  }
  return old;
}
template <class T, class U>
T atomic_fetch_min_explicit(atomic<T>* object, U operand, memory_order) {
  auto r = detail::ref(object);
  T old = r.load(std::memory_order_relaxed);
  while (T(operand) < old && !r.compare_exchange_weak(old, T(operand), std::memory_order_relaxed)) {
  }
  return old;
}

}  // namespace metal
