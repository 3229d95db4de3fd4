// `nosa`: the command-line entry point. Errors become a message on stderr and exit code 1
// (2 for bad command lines).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <map>

#include "launcher/commands.h"
#include "launcher/engine_setup.h"
#include "parallel/mpi.h"
#include "runtime/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{
      "nosa: long-context LLM inference with NOSA sparse attention and KV offloading.\n"
      "Run `nosa SUBCOMMAND --help` for the options of each subcommand."};
  app.require_subcommand(1);
  app.fallthrough();  // global options such as --log-level may follow the subcommand
  std::string log_level;
  app.add_option("--log-level", log_level,
                 "trace, debug, info, warn, error or off (default: $NOSA_LOG or info)");
  std::map<CLI::App*, nosa::launcher::Runner> runners;
  auto add = [&](nosa::launcher::Runner (*fn)(CLI::App&)) {
    size_t before = app.get_subcommands({}).size();
    auto runner = fn(app);
    runners[app.get_subcommands({})[before]] = runner;
  };
  add(nosa::launcher::add_make_model_command);
  add(nosa::launcher::add_generate_command);
  add(nosa::launcher::add_batch_command);
  add(nosa::launcher::add_bench_command);
  add(nosa::launcher::add_serve_command);
  add(nosa::launcher::add_worker_command);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  // Under mpirun, a rank that fails takes the whole job down (MPI_Abort) rather than waiting in
  // MPI_Finalize for peers that may never come.
  auto fail = [](int code) {
    auto& mpi = nosa::parallel::MpiContext::get();
    if (mpi.active() && mpi.world_size() > 1) mpi.abort(code);
    return code;
  };
  try {
    nosa::launcher::apply_log_level(log_level);
    for (auto* sub : app.get_subcommands()) return runners.at(sub)();
  } catch (const nosa::Error& e) {
    std::fprintf(stderr, "nosa: error: %s\n", e.message().c_str());
    return fail(e.code() == nosa::ErrorCode::invalid_argument ? 2 : 1);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "nosa: error: %s\n", e.what());
    return fail(1);
  }
  return 0;
}
