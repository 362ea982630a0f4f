/* Minimal stdbool.h for the bindings generator only (-nostdinc). */
#ifndef EPLB_SHIM_STDBOOL_H
#define EPLB_SHIM_STDBOOL_H
#define bool _Bool
#define true 1
#define false 0
#endif
