// Compiles when eplb_routing.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_routing.h"
