// Compiles when eplb_dispatch.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_dispatch.h"
