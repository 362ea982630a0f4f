/* Minimal stdint.h for the bindings generator only (-nostdinc): fixes the C types to the LP64
 * x86-64 Linux ABI whatever headers the machine has. The real builds use the real headers. */
#ifndef EPLB_SHIM_STDINT_H
#define EPLB_SHIM_STDINT_H
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long int64_t;
typedef unsigned long uint64_t;
typedef long intptr_t;
typedef unsigned long uintptr_t;
#define INT32_MAX 2147483647
#define UINT64_MAX 18446744073709551615UL
#endif
