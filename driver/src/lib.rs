//! `nomad-driver-microvm`: a Nomad task driver that launches and supervises
//! microvm.nix runners.
//!
//! The plugin process (`plugin`, `service`) is a stateless controller that
//! Nomad may kill at any moment. Each task's VM is owned by a small per-task
//! supervisor process (`supervisor`) that outlives the plugin, keeps the VMM's
//! exit status and writes the serial console into Nomad's log FIFOs. Everything
//! RecoverTask needs is in the task handle's `driver_state` (`state`).

pub mod cgroup;
pub mod config;
pub mod cty;
pub mod fingerprint;
pub mod hclspec;
pub mod net;
pub mod plugin;
pub mod proc;
pub mod runner;
pub mod service;
pub mod supervisor;
pub mod supervisord;
pub mod task;
pub mod vsock;

/// The name jobspecs use: `driver = "microvm"`.
pub const DRIVER_NAME: &str = "microvm";
/// The plugin's own version, reported in PluginInfo and the fingerprint.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
