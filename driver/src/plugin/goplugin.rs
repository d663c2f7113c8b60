//! go-plugin's internal services. Nomad calls `GRPCController.Shutdown` when
//! it kills a plugin instance, opens `GRPCStdio` once (and discards what it
//! gets) and opens `GRPCBroker` without ever using it.

use std::pin::Pin;

use futures_util::Stream;
use microvm_proto::goplugin::{
    ConnInfo, Empty, StdioData, grpc_broker_server::GrpcBroker, grpc_controller_server::GrpcController,
    grpc_stdio_server::GrpcStdio,
};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// Tells the server loop to stop; cloned into every service that can end the
/// process or must end its streams when it does.
#[derive(Clone)]
pub struct ShutdownSignal {
    tx: watch::Sender<bool>,
}

impl ShutdownSignal {
    pub fn new() -> Self {
        ShutdownSignal { tx: watch::channel(false).0 }
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Resolves once `trigger` was called (at once if it already was).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // An error means the sender is gone, which only happens at exit.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

impl Default for ShutdownSignal {
    fn default() -> Self {
        Self::new()
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// A stream that yields nothing and ends when the plugin shuts down.
fn silent_until(shutdown: ShutdownSignal) -> BoxStream<StdioData> {
    Box::pin(futures_util::stream::once(async move {
        shutdown.wait().await;
        Err(Status::cancelled("plugin is shutting down"))
    }))
}

pub struct Controller {
    pub shutdown: ShutdownSignal,
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("shutdown requested by the Nomad agent; VMs keep running");
        self.shutdown.trigger();
        Ok(Response::new(Empty {}))
    }
}

pub struct Stdio {
    pub shutdown: ShutdownSignal,
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = BoxStream<StdioData>;

    async fn stream_stdio(&self, _: Request<()>) -> Result<Response<Self::StreamStdioStream>, Status> {
        Ok(Response::new(silent_until(self.shutdown.clone())))
    }
}

pub struct Broker {
    pub shutdown: ShutdownSignal,
}

#[tonic::async_trait]
impl GrpcBroker for Broker {
    type StartStreamStream = BoxStream<ConnInfo>;

    async fn start_stream(
        &self,
        request: Request<Streaming<ConnInfo>>,
    ) -> Result<Response<Self::StartStreamStream>, Status> {
        // We never broker connections: read and drop whatever arrives so the
        // client's sends never block, and keep our side open.
        let mut inbound = request.into_inner();
        tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
        let shutdown = self.shutdown.clone();
        Ok(Response::new(Box::pin(futures_util::stream::once(async move {
            shutdown.wait().await;
            Err(Status::cancelled("plugin is shutting down"))
        }))))
    }
}
