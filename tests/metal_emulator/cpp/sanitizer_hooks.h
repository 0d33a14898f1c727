// Hooks into ThreadSanitizer and AddressSanitizer. They are weak: the runtime
// is compiled once without instrumentation and linked into plain, ASan and
// TSan kernel binaries; a hook is non-null only when its sanitizer is linked.
#pragma once

#include <cstddef>

extern "C" {
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
void __asan_poison_memory_region(const volatile void* addr, std::size_t size) __attribute__((weak));
void __asan_unpoison_memory_region(const volatile void* addr, std::size_t size) __attribute__((weak));
}

namespace emu {

inline bool under_tsan() { return __tsan_acquire != nullptr; }
inline bool under_asan() { return __asan_poison_memory_region != nullptr; }

// Metal's happens-before edges (barriers, simd functions), told to TSan by
// hand: the runtime's own hand-offs are invisible to it on purpose.
inline void tsan_release(void* sync) {
  if (__tsan_release) __tsan_release(sync);
}
inline void tsan_acquire(void* sync) {
  if (__tsan_acquire) __tsan_acquire(sync);
}
inline void asan_poison(void* mem, std::size_t size) {
  if (__asan_poison_memory_region) __asan_poison_memory_region(mem, size);
}
inline void asan_unpoison(void* mem, std::size_t size) {
  if (__asan_unpoison_memory_region) __asan_unpoison_memory_region(mem, size);
}

}  // namespace emu
