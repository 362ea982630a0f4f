// Compiles when eplb_moe.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_moe.h"
