// Compiles when eplb_mapping.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_mapping.h"
