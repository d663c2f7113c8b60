//! The gRPC services Nomad talks to: `BasePlugin` (identity and plugin
//! config) and `Driver` (fingerprint and the task lifecycle). `status` is the
//! only place our errors become gRPC statuses.

pub mod base;
pub mod driver;
pub mod exec;
pub mod status;

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::PluginConfig;
use crate::plugin::goplugin::ShutdownSignal;
use crate::task::Tasks;

/// State shared by both services of one plugin process.
pub struct Plugin {
    /// `None` until Nomad's SetConfig; replaced on every SetConfig.
    pub config: watch::Sender<Option<Arc<PluginConfig>>>,
    pub tasks: Arc<Tasks>,
    pub shutdown: ShutdownSignal,
}

impl Plugin {
    pub fn new(tasks: Arc<Tasks>, shutdown: ShutdownSignal) -> Arc<Plugin> {
        Arc::new(Plugin { config: watch::channel(None).0, tasks, shutdown })
    }

    /// This binary, for the KVM probe child and per-task supervisors.
    pub fn tasks_self_exe(&self) -> std::path::PathBuf {
        self.tasks.self_exe().to_path_buf()
    }

    /// The current config, or the defaults before SetConfig.
    pub fn current_config(&self) -> Arc<PluginConfig> {
        self.config.borrow().clone().unwrap_or_default()
    }
}

/// Both Nomad services, ready to hand to the go-plugin server.
pub fn routes(plugin: Arc<Plugin>) -> tonic::service::RoutesBuilder {
    use microvm_proto::base::base_plugin_server::BasePluginServer;
    use microvm_proto::drivers::driver_server::DriverServer;
    let mut routes = tonic::service::RoutesBuilder::default();
    routes.add_service(BasePluginServer::new(base::Base { plugin: plugin.clone() })).add_service(
        DriverServer::new(driver::DriverService { plugin })
            // Nomad sends a task's whole environment in StartTask.
            .max_decoding_message_size(64 * 1024 * 1024),
    );
    routes
}
