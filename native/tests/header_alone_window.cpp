// Compiles when eplb_window.h is the first (and only) eplb header: every header stands on its own.
#include "eplb/eplb_window.h"
