// tresor-broker: the key broker service (docs/broker.md). Reads its configuration, opens the
// SQLite store with the master key, and serves HTTPS and the admin socket until SIGTERM or
// SIGINT, then shuts down gracefully (requests in progress finish; audit records are committed).
#include <pthread.h>
#include <signal.h>

#include <boost/program_options.hpp>
#include <cstdio>
#include <iostream>
#include <thread>

#include "tresor/broker/admin.h"
#include "tresor/broker/config.h"
#include "tresor/broker/server.h"
#include "tresor/broker/service.h"
#include "tresor/broker/store.h"
#include "tresor/io.h"

namespace {

int die(const tresor::Error& e) {
  std::fprintf(stderr, "tresor-broker: %s\n", e.message.c_str());
  return e.code == tresor::ErrorCode::kInvalidArgument ? 2 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  namespace po = boost::program_options;
  std::string config_path, init_dir, sim_trust, address = "127.0.0.1";
  unsigned port = 8443;
  po::options_description opts("Usage: tresor-broker --config FILE\n       tresor-broker --init DIR [--address A] [--port P] [--sim-trust DIR]\n\nOptions");
  opts.add_options()("config,c", po::value(&config_path), "configuration file (TOML; docs/broker.md §7)")(
      "check", "check the configuration, the TLS files, the master key and the store, then exit")(
      "init", po::value(&init_dir), "write a new broker directory: broker.toml, a master key, a self-signed TLS certificate")(
      "address", po::value(&address)->default_value("127.0.0.1"), "--init: the address to listen on (and name in the certificate)")(
      "port", po::value(&port)->default_value(8443), "--init: the port (0: any free port, printed at start)")(
      "sim-trust", po::value(&sim_trust), "--init: trust this sim root (tests and demos only: not confidential hardware)")(
      "help,h", "this help")("version", "print the version");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "tresor-broker: %s (see --help)\n", e.what());
    return 2;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  if (vm.count("version")) {
    std::cout << "tresor-broker " << TRESOR_VERSION << " (KBS protocol 0.4.0)\n";
    return 0;
  }
  if (!init_dir.empty()) {
    if (port > 65535) return die({tresor::ErrorCode::kInvalidArgument, "--port must be 0..65535"});
    auto r = tresor::broker::init_directory(init_dir, address, static_cast<uint16_t>(port), sim_trust);
    if (!r) return die(r.error());
    std::printf("tresor-broker: wrote %s/broker.toml, master.key (0600), tls.crt, tls.key (0600); start with\n"
                "  tresor-broker --config %s/broker.toml\n",
                init_dir.c_str(), init_dir.c_str());
    return 0;
  }
  if (config_path.empty()) {
    std::fprintf(stderr, "tresor-broker: --config FILE is required (see --help)\n");
    return 2;
  }

  // SIGINT and SIGTERM go to one thread that asks the server to stop; every other thread
  // inherits the blocked mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  signal(SIGPIPE, SIG_IGN);

  auto config = tresor::broker::load_config(config_path);
  if (!config) return die(config.error());
  auto master = tresor::read_secret_file(config->master_key_path);
  if (!master) return die({master.error().code, "[store] master_key: " + master.error().message});
  if (master->size() != tresor::broker::kMasterKeySize) {
    return die({tresor::ErrorCode::kInvalidArgument, "[store] master_key " + config->master_key_path + " holds " +
                                                         std::to_string(master->size()) + " bytes; it must be 32 random bytes"});
  }
  auto store = tresor::broker::Store::open(config->store_path, master->span());
  if (!store) return die({store.error().code, "[store] " + store.error().message});
  auto service = tresor::broker::Service::create(*config, *store);
  if (!service) return die(service.error());
  tresor::broker::Admin admin(*store);
  if (vm.count("check")) {
    // Every data key must open with this master key; the listening socket must bind. The admin
    // socket is left alone (a running broker may own it).
    auto datasets = store->datasets();
    if (!datasets) return die(datasets.error());
    for (const auto& d : *datasets) {
      auto versions = store->key_versions(d);
      if (!versions) return die(versions.error());
      for (uint32_t v : *versions) {
        if (auto k = store->key(d, v); !k) {
          return die({tresor::ErrorCode::kIo, "[store] key version " + std::to_string(v) + " of '" + d +
                                                  "' does not open with this master key: " + k.error().message});
        }
      }
    }
    auto probe = tresor::broker::Server::create(*config, **service, nullptr);
    if (!probe) return die(probe.error());
    std::printf("tresor-broker: configuration %s is usable (%zu datasets, every key opens)\n", config_path.c_str(), datasets->size());
    return 0;
  }
  auto server = tresor::broker::Server::create(*config, **service, &admin);
  if (!server) return die(server.error());

  std::printf("tresor-broker: listening on https://%s:%u (TLS 1.3), admin socket %s\n",
              config->address.find(':') != std::string::npos ? ("[" + config->address + "]").c_str() : config->address.c_str(),
              static_cast<unsigned>((*server)->port()), config->admin_socket.c_str());
  std::fflush(stdout);

  std::thread signals([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    std::fprintf(stderr, "tresor-broker: %s received, shutting down\n", sig == SIGINT ? "SIGINT" : "SIGTERM");
    (*server)->stop();
  });
  signals.detach();
  (*server)->run();
  (*service)->shutdown();
  std::fprintf(stderr, "tresor-broker: stopped\n");
  return 0;
}
