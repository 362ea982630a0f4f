/* Minimal stddef.h for the bindings generator only (-nostdinc). */
#ifndef EPLB_SHIM_STDDEF_H
#define EPLB_SHIM_STDDEF_H
typedef unsigned long size_t;
typedef long ptrdiff_t;
#define NULL ((void *)0)
#define offsetof(type, member) __builtin_offsetof(type, member)
#endif
