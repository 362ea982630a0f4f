// Argument validation shared by the kernel entry points of the ABI layer.
#pragma once

#include <cstdint>

#include "capi/handles.hpp"
#include "eplb/eplb_mapping.h"

namespace eplb::capi {

// Throws unless lo <= value <= hi, naming the argument.
void check_in_range(int64_t value, int64_t lo, int64_t hi, const char* name);

// Checks an expert map for work on the stream: sizes, replica selection, pointers, and on the CPU
// backend the table contents (logcnt in [1, Kmax], the first logcnt entries of every log2phy row
// in [0, R)), so that a bad table fails before anything is written.
void check_expert_map(const eplb_stream_t& stream, const eplb_expert_map_t* map);

}  // namespace eplb::capi
