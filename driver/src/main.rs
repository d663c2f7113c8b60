//! `nomad-driver-microvm`: started by a Nomad agent as a task driver plugin;
//! the same binary is each task's supervisor and a config checker.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use microvm_driver::plugin::{goplugin::ShutdownSignal, handshake, hclog, server};
use microvm_driver::{config, fingerprint, net::LinuxNet, service, supervisor, task::Tasks, vsock};

const USAGE: &str = "\
nomad-driver-microvm: a Nomad task driver for microvm.nix runners

Usage:
  nomad-driver-microvm                      run as a plugin (a Nomad agent starts it this way)
  nomad-driver-microvm check-config FILE    check a plugin config (the JSON of the `config {}` block)
  nomad-driver-microvm supervise SPEC       run one task's supervisor (the plugin starts it)
  nomad-driver-microvm stop-all STATE_DIR [TIMEOUT]
                                            shut down every VM of this node gracefully (host shutdown;
                                            TIMEOUT per VM, default 60s)
  nomad-driver-microvm config-keys          list the plugin config keys, one per line
  nomad-driver-microvm probe-kvm            run a trivial KVM guest and say whether it halted
  nomad-driver-microvm vsock-proxy (--cid CID | --mux SOCKET) PORT
                                            connect to a guest's vsock port, relay stdin/stdout (ssh's ProxyCommand)
  nomad-driver-microvm --version
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        [] => run_plugin(),
        ["supervise", spec] => ExitCode::from(supervisor::main(std::path::Path::new(spec)) as u8),
        ["check-config", file] => check_config(file),
        ["config-keys"] => {
            for key in config::PLUGIN_KEYS {
                println!("{key}");
            }
            ExitCode::SUCCESS
        }
        ["probe-kvm"] => {
            println!("{}", fingerprint::format_probe_output(&fingerprint::kvm_selftest()));
            ExitCode::SUCCESS
        }
        ["vsock-proxy", rest @ ..] => vsock_proxy(rest),
        ["stop-all", state_dir, rest @ ..] if rest.len() <= 1 => {
            let Some(timeout) =
                rest.first().map_or(Some(std::time::Duration::from_secs(60)), |t| config::parse_duration(t))
            else {
                eprintln!("nomad-driver-microvm stop-all: {:?} is not a duration (e.g. 60s)", rest[0]);
                return ExitCode::from(2);
            };
            ExitCode::from(supervisor::stop_all::main(std::path::Path::new(state_dir), timeout) as u8)
        }
        ["--version" | "version"] => {
            println!("nomad-driver-microvm {}", microvm_driver::VERSION);
            ExitCode::SUCCESS
        }
        ["--help" | "-h" | "help"] => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprint!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run_plugin() -> ExitCode {
    // Nothing may reach stdout before the handshake line.
    if let Err(e) = handshake::check_env(|k| std::env::var(k).ok()) {
        eprintln!("nomad-driver-microvm: {e}");
        return ExitCode::from(1);
    }
    hclog::init(tracing::Level::DEBUG);
    // go-plugin servers ignore SIGINT: Ctrl-C on `nomad agent -dev` reaches
    // the whole process group, and only the agent should act on it.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        let _ = nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, nix::sys::signal::SigHandler::SigIgn);
    }
    let self_exe = std::fs::read_link("/proc/self/exe").unwrap_or_else(|_| PathBuf::from("nomad-driver-microvm"));
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let shutdown = ShutdownSignal::new();
        let tasks = Tasks::new(Arc::new(LinuxNet::new()), self_exe);
        let plugin = service::Plugin::new(tasks, shutdown.clone());
        match server::serve(service::routes(plugin), shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{}", service::status::chain(&e));
                ExitCode::from(1)
            }
        }
    })
}

/// Checks a plugin config written as JSON (the shape NixOS's Nomad module
/// renders), with the same rules SetConfig applies.
fn check_config(file: &str) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("nomad-driver-microvm: cannot read {file}: {e}");
            return ExitCode::from(1);
        }
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("nomad-driver-microvm: {file} is not JSON: {e}");
            return ExitCode::from(1);
        }
    };
    match config::plugin_config_from_json(&json) {
        Ok(c) => {
            println!("{c:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nomad-driver-microvm: {file}: {e}");
            ExitCode::from(1)
        }
    }
}

/// ssh's ProxyCommand for `nomad alloc exec` (see `microvm_driver::vsock`).
fn vsock_proxy(args: &[&str]) -> ExitCode {
    use microvm_driver::vsock::GuestAddress;
    let result = GuestAddress::from_proxy_args(args).and_then(|(address, port)| vsock::proxy(&address, port));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nomad-driver-microvm: {}", service::status::chain(&e));
            ExitCode::from(1)
        }
    }
}
