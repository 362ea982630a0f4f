// Compiles when eplb_core.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_core.h"
