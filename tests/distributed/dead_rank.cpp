// tests/distributed/dead_rank.cpp: a rank that stops, throws or exits must make the others stop with an
// error within a bounded time, never hang. Run under mpiexec with a mode:
//   hang   the last rank stops calling collectives (sleeps); the others' finish() raises compact::error
//          after the communicator's 2 s timeout, they print it and call abort() (MPI_Abort), which also
//          ends the sleeping rank. ctest checks for the timeout message.
//   throw  the last rank throws in the middle of a step; main catches it and calls abort(); the others,
//          waiting in finish(), are ended by MPI_Abort. ctest checks for the rank's message.
//   exit   the last rank exits (status 3) without MPI_Finalize; the launcher ends the others and fails
//          the job (ctest: WILL_FAIL, and TIMEOUT bounds it).
// Every mode fails the job; the ctest TIMEOUT is what proves that nobody hangs.
#include <compact/compact.hpp>
#include <compact/distributed.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

int main(int argc, char** argv)
{
    compact::mpi_session mpi(argc, argv);
    const char* mode = argc > 1 ? argv[1] : "hang";
    compact::communicator_options options;
    options.timeout = std::chrono::seconds(2);
    compact::mpi_communicator comm(MPI_COMM_WORLD, options);
    const bool victim = comm.rank() == comm.size() - 1;
    try {
        const compact::cpu::context ctx{1};
        compact::linear_options o;
        o.seed = 1;
        o.layer = 1;
        o.max_rows = 8;
        compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu> fc(compact::in_features{32},
                                                                                  compact::out_features{16}, o);
        compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(comm);
        const auto group = dp.add(fc);
        dp.check_layout(ctx);
        std::vector<float> x(8 * 32, 0.5f), y(8 * 16), dy(8 * 16, 0.25f);
        for (int step = 0; step < 4; ++step) {
            fc.forward(ctx, compact::make_view<const float>(x.data(), 8, 32), compact::make_view(y.data(), 8, 16));
            fc.backward(ctx, compact::make_view<const float>(dy.data(), 8, 16), {});
            if (step == 2 && victim) {
                if (std::strcmp(mode, "hang") == 0) std::this_thread::sleep_for(std::chrono::seconds(60));
                if (std::strcmp(mode, "throw") == 0) throw std::runtime_error("rank died in the middle of step 2");
                if (std::strcmp(mode, "exit") == 0) std::_Exit(3);
            }
            dp.ready(ctx, group);
            dp.finish(ctx);
            fc.step(ctx, compact::adamw_params{});
        }
        std::printf("rank %d: finished without the failure it was meant to see\n", comm.rank());
    } catch (const std::exception& e) {
        std::printf("rank %d of %d stops: %s\n", comm.rank(), comm.size(), e.what());
        std::fflush(stdout);
        comm.abort(2);
    }
    return 1;
}
