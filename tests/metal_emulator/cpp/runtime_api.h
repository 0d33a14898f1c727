// The interface between a kernel's translation unit and the emulator runtime.
// Plain C++ only: the kernel side defines Metal's address-space words away, so
// nothing here may depend on them.
#pragma once

#include <cstddef>
#include <cstdint>

namespace emu {

// Where a barrier, simd function or threadgroup declaration sits in the kernel
// text; #line directives make file the kernel's own "<name>.source".
struct Site {
  const char* file;
  unsigned line;
  unsigned column;
};

// Values of the Metal thread-position attributes for one GPU thread.
struct ThreadIds {
  uint32_t dispatch_quadgroups_per_threadgroup;
  uint32_t dispatch_simdgroups_per_threadgroup;
  uint32_t dispatch_threads_per_threadgroup[3];
  uint32_t grid_origin[3];
  uint32_t grid_size[3];
  uint32_t quadgroup_index_in_threadgroup;
  uint32_t quadgroups_per_threadgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t simdgroups_per_threadgroup;
  uint32_t thread_execution_width;
  uint32_t thread_index_in_quadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_position_in_grid[3];
  uint32_t thread_position_in_threadgroup[3];
  uint32_t threadgroup_position_in_grid[3];
  uint32_t threadgroups_per_grid[3];
  uint32_t threads_per_grid[3];
  uint32_t threads_per_simdgroup;
  uint32_t threads_per_threadgroup[3];
};

constexpr unsigned kSimdWidth = 32;
// Largest value one lane can pass through a simd function (a vec<long, 4>).
constexpr unsigned kSimdSlotBytes = 32;

// What every lane of a simdgroup put in at one simd function call.
struct SimdLanes {
  const unsigned char* slots;  // kSimdWidth slots of kSimdSlotBytes each
  uint32_t active;             // bit i set: lane i took part
  unsigned lane;               // the calling lane
};

// Wait until every live thread of the threadgroup reaches this barrier.
void threadgroup_barrier(Site site);
// Deposit this lane's value and wait for the other live lanes of the simdgroup.
SimdLanes simd_exchange(const void* value, unsigned size, const char* op, Site site);
// The storage of one `threadgroup` declaration: the same address for every
// thread of the group, poisoned before the group starts.
void* threadgroup_memory(std::size_t size, std::size_t align, Site site);
// Stop the run with a message for the Python side.
[[noreturn]] void fail(const char* message, Site site);

}  // namespace emu

// Defined by the generated kernel translation unit: run one GPU thread.
extern "C" void emu_kernel_entry(void* const* buffers, const emu::ThreadIds* ids);
