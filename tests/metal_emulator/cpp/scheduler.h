// Runs the threads of one threadgroup: the part of the runtime that knows about
// barriers, simd functions and threadgroup memory.
#pragma once

#include "runtime_api.h"

namespace emu {

// threaded: one OS thread per GPU thread (for kernels with barriers or simd
// functions); otherwise the GPU threads run one after another on the caller.
// reverse: hand the baton from the last thread to the first instead.
void scheduler_start(unsigned max_threads, bool threaded, bool reverse);
// Run one group; threads[i] is the thread with thread_index_in_threadgroup i.
// The table must not move between groups (TSan would see a new allocation).
void scheduler_run_group(const ThreadIds* threads, unsigned count, void* const* buffers);
void scheduler_stop();

// Print "metal-emulator: <message>" for the Python side and exit.
[[noreturn]] void die(const char* format, ...) __attribute__((format(printf, 1, 2)));

}  // namespace emu
