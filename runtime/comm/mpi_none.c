/* moonshard runtime: the mpi backend's entry points in a build without MPI.
 * They report MS_ERR_UNSUPPORTED so the FFI declarations hold in every build. */
#ifndef MS_WITH_MPI
#include "comm.h"

int ms_mpi_init(void)
{
    return MS_FAIL(MS_ERR_UNSUPPORTED, "mpi_init: this build has no MPI support (configured "
                                       "with MS_WITH_MPI=OFF or without libopenmpi-dev): "
                                       "install libopenmpi-dev and rebuild with bash "
                                       "tools/setup.sh; moonshard --version lists the backends");
}

int ms_mpi_finalize(void) { return MS_OK; }
#endif
