/* The ABI is C: the umbrella header and the generated layout asserts compile as C11 too. */
#include "eplb/eplb.h"
#include "eplb_abi_layout.g.h"

uint32_t eplb_test_c_abi_version(void) { return eplb_abi_version(); }
