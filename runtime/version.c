/* moonshard runtime: the library's version and the backends compiled into it, so a caller
 * can tell which build it loaded (moonshard --version, the Lua modules' version check). */
#include "abi.h"
#include "ms.h"

const char *ms_version(void) { return MS_VERSION; }

const char *ms_abi(void) { return MS_ABI; }

const char *ms_build_config(void)
{
    return "local"
#ifdef MS_WITH_MPI
           " mpi"
#endif
#ifdef MS_WITH_NCCL
           " nccl"
#endif
           "; cpu"
#ifdef MS_WITH_CUDA
           " cuda"
#endif
        ;
}
