/* moonshard runtime: the version of this source tree (CMakeLists.txt reads MS_VERSION from
 * here) and, at run time, the version and backends of the library a program loaded. */
#ifndef MS_VERSION_H
#define MS_VERSION_H

#define MS_VERSION_MAJOR 0
#define MS_VERSION_MINOR 1
#define MS_VERSION_PATCH 0
#define MS_VERSION "0.1.0"

/* ffi-begin */
/* ---- version ---- */
/* "MAJOR.MINOR.PATCH" of the loaded library (compare with MS_VERSION, the headers'). */
const char *ms_version(void);
/* The collective backends and devices compiled in, e.g. "local mpi nccl; cpu cuda". */
const char *ms_build_config(void);
/* A hash of the FFI declarations the library was built from (runtime/abi.h, made by
 * tools/gen_cdef.lua with lua/moonshard/cdef.lua): the Lua modules refuse another. */
const char *ms_abi(void);
/* ffi-end */

#endif
