// compact/distributed.hpp: data-parallel training over MPI (an optional integration: needs an MPI-3
// library; the rest of compact never includes it).
//
//   #include <compact/compact.hpp>
//   #include <compact/distributed.hpp>
//
// The folder, in include order:
//   distributed/communicator.hpp  the communicator concept, reduce_op, reduction, self_communicator
//   distributed/mpi.hpp           mpi_session, mpi_communicator (MPI_Iallreduce / ordered all-to-all)
//   distributed/data_parallel.hpp data_parallel: gradient buckets, overlap, layout and parameter checks
//   distributed/checkpoint.hpp    save on one rank, load on every rank, agreement checked
//   distributed/nccl.cuh          nccl_communicator (nvcc and nccl.h; include it yourself)
#pragma once

#include "compact/distributed/communicator.hpp"
#include "compact/distributed/mpi.hpp"
#include "compact/distributed/data_parallel.hpp"
#include "compact/distributed/checkpoint.hpp"
