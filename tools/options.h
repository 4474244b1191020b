// Boost.Program_options glue shared by the subcommands: --help handling and clear usage errors.
#pragma once

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>

#include "cli.h"

namespace tresor::cli {

namespace po = boost::program_options;

/// Parses argv for `command`. Returns an exit code when the command should stop (help printed or
/// a usage error), std::nullopt to go on.
inline std::optional<int> parse_options(const std::string& command, const std::string& synopsis, int argc,
                                        char** argv, po::options_description& opts,
                                        const po::positional_options_description& pos, po::variables_map& vm) {
  opts.add_options()("help,h", "show this help");
  try {
    po::store(po::command_line_parser(argc, argv).options(opts).positional(pos).run(), vm);
    if (vm.count("help")) {
      std::cout << "Usage: tresor " << command << " " << synopsis << "\n\n" << opts << "\n";
      return kExitOk;
    }
    po::notify(vm);
  } catch (const po::error& e) {
    return usage_error(command, e.what());
  }
  return std::nullopt;
}

}  // namespace tresor::cli
