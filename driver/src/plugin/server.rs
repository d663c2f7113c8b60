//! Serving the plugin: bind the unix socket, register every service, print
//! the handshake line, and run until Nomad asks us to shut down.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use microvm_proto::goplugin::{
    grpc_broker_server::GrpcBrokerServer, grpc_controller_server::GrpcControllerServer,
    grpc_stdio_server::GrpcStdioServer,
};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::service::RoutesBuilder;

use super::goplugin::{Broker, Controller, ShutdownSignal, Stdio};
use super::handshake;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the handshake line to stdout")]
    Handshake(#[source] std::io::Error),
    #[error("gRPC server failed")]
    Server(#[source] tonic::transport::Error),
}

/// After Shutdown we give in-flight replies this long before exiting; the
/// never-ending streams (Fingerprint, TaskEvents) would otherwise hold the
/// graceful stop forever, and Nomad SIGKILLs us after 2 s.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(300);

/// Serves `routes` (the Nomad services) plus go-plugin's internal services on
/// a fresh unix socket, announces it on stdout, and returns after a
/// `GRPCController.Shutdown` (or when the server fails).
pub async fn serve(mut routes: RoutesBuilder, shutdown: ShutdownSignal) -> Result<(), ServeError> {
    let env = |k: &str| std::env::var(k).ok();
    let unique = u64::from(std::process::id()) * 1_000_000 + u64::from(rand_suffix());
    let path = handshake::socket_path(env, unique);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ServeError::Listen { path: path.clone(), source })?;
    if let Some(group) = env("PLUGIN_UNIX_SOCKET_GROUP") {
        restrict_to_group(&path, &group);
    }

    let (health, health_service) = tonic_health::server::health_reporter();
    // go-plugin's Ping checks the service named "plugin".
    health.set_service_status("plugin", tonic_health::ServingStatus::Serving).await;
    routes
        .add_service(health_service)
        .add_service(GrpcControllerServer::new(Controller { shutdown: shutdown.clone() }))
        .add_service(GrpcStdioServer::new(Stdio { shutdown: shutdown.clone() }))
        .add_service(GrpcBrokerServer::new(Broker { shutdown: shutdown.clone() }));

    let stop = shutdown.clone();
    let server =
        tokio::spawn(tonic::transport::Server::builder().add_routes(routes.routes()).serve_with_incoming_shutdown(
            UnixListenerStream::new(listener),
            async move {
                stop.wait().await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            },
        ));

    // The listener is accepting (bound before spawning), so the client may dial
    // as soon as it reads this line.
    announce(&path).map_err(ServeError::Handshake)?;
    tracing::info!(socket = %path.display(), "plugin serving");

    let result = tokio::select! {
        r = server => r.unwrap_or(Ok(())).map_err(ServeError::Server),
        _ = async { shutdown.wait().await; tokio::time::sleep(SHUTDOWN_GRACE * 2).await } => Ok(()),
    };
    let _ = std::fs::remove_file(&path);
    result
}

fn announce(path: &Path) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(handshake::handshake_line(path).as_bytes())?;
    out.flush()
}

fn rand_suffix() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos() % 1_000_000).unwrap_or(0)
}

/// go-plugin's PLUGIN_UNIX_SOCKET_GROUP: the socket becomes group-owned, 0660.
fn restrict_to_group(path: &Path, group: &str) {
    use std::os::unix::fs::PermissionsExt;
    let gid = group
        .parse::<u32>()
        .ok()
        .or_else(|| nix::unistd::Group::from_name(group).ok().flatten().map(|g| g.gid.as_raw()));
    match gid {
        Some(gid) => {
            let _ = std::os::unix::fs::chown(path, None, Some(gid));
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
        }
        None => tracing::warn!(group, "PLUGIN_UNIX_SOCKET_GROUP names an unknown group"),
    }
}
