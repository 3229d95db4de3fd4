// The `nosa` subcommands. Each registers itself on the app and returns the function that runs
// it after parsing (returning the process exit code).
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace nosa::launcher {

using Runner = std::function<int()>;

Runner add_make_model_command(CLI::App& app);
Runner add_generate_command(CLI::App& app);
Runner add_batch_command(CLI::App& app);
Runner add_bench_command(CLI::App& app);
Runner add_serve_command(CLI::App& app);
Runner add_worker_command(CLI::App& app);

}  // namespace nosa::launcher
