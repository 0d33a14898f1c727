// Buffers that end at an inaccessible page, so a kernel that runs off the end
// of a buffer faults at once, and a fault handler that names the buffer.
// Used in plain builds; ASan builds keep malloc (its redzones are byte-exact).
#pragma once

#include <cstddef>

namespace emu {

// 16-aligned memory for front + bytes + back bytes (the buffer between two
// canaries; plus at most 15 bytes of slack) followed by a guard page. kind and
// name must outlive the run.
unsigned char* guarded_block(std::size_t front, std::size_t bytes, std::size_t back, const char* kind,
                             const char* name);
// Inputs are const: a write through a cast faults too.
void make_read_only(const unsigned char* block);
void install_fault_handler();

}  // namespace emu
