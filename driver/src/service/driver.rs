//! The `Driver` service: fingerprint, capabilities, schemas, and the task
//! RPCs, which convert proto messages and delegate to [`crate::task::Tasks`].

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::Stream;
use microvm_proto::drivers::{
    self as pb, driver_capabilities::FsIsolation, driver_capabilities::MountConfigs, driver_server::Driver,
    network_isolation_spec::NetworkIsolationMode,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Plugin;
use crate::fingerprint::{self, HostFacts};
use crate::task::{ExitResult, stats};

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

pub struct DriverService {
    pub plugin: Arc<Plugin>,
}

fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

fn exit_result(r: &ExitResult) -> pb::ExitResult {
    pb::ExitResult { exit_code: r.exit_code, signal: r.signal, oom_killed: r.oom_killed }
}

/// What we honestly support: signals; `alloc exec` and ExecTask (the
/// console, and commands over vsock where the guest allows); the VM is its own filesystem
/// image; host networking only (taps live in the host netns); no Nomad volume
/// mounts (a VM cannot bind-mount them).
pub fn capabilities() -> pb::DriverCapabilities {
    pb::DriverCapabilities {
        send_signals: true,
        exec: true,
        fs_isolation: FsIsolation::Image as i32,
        network_isolation_modes: vec![NetworkIsolationMode::Host as i32],
        must_create_network: false,
        mount_configs: MountConfigs::NoMounts as i32,
        disable_log_collection: false,
        dynamic_workload_users: false,
    }
}

fn fingerprint_now(plugin: &Plugin) -> pb::FingerprintResponse {
    let config = plugin.current_config();
    let exe = plugin.tasks_self_exe();
    let facts = HostFacts::gather(&config, || fingerprint::probe_kvm_in_child(&exe, Duration::from_secs(3)));
    fingerprint::assess(&facts, &config)
}

#[tonic::async_trait]
impl Driver for DriverService {
    async fn task_config_schema(
        &self,
        _: Request<pb::TaskConfigSchemaRequest>,
    ) -> Result<Response<pb::TaskConfigSchemaResponse>, Status> {
        Ok(Response::new(pb::TaskConfigSchemaResponse { spec: Some(crate::config::task_schema()) }))
    }

    async fn capabilities(
        &self,
        _: Request<pb::CapabilitiesRequest>,
    ) -> Result<Response<pb::CapabilitiesResponse>, Status> {
        Ok(Response::new(pb::CapabilitiesResponse { capabilities: Some(capabilities()) }))
    }

    type FingerprintStream = BoxStream<pb::FingerprintResponse>;

    /// Sends a fingerprint at once, then whenever it changes (re-checked every
    /// `fingerprint_period` and on every SetConfig). Stays open.
    async fn fingerprint(
        &self,
        _: Request<pb::FingerprintRequest>,
    ) -> Result<Response<Self::FingerprintStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let plugin = self.plugin.clone();
        // While this stream is open an agent is connected (it renews the
        // VMs' agent leases, see `stop_without_agent_after`).
        let connected = plugin.tasks.agent_connected();
        tokio::spawn(async move {
            let _connected = connected;
            let mut config_changes = plugin.config.subscribe();
            let mut last: Option<pb::FingerprintResponse> = None;
            loop {
                let p = plugin.clone();
                let Ok(now) = tokio::task::spawn_blocking(move || fingerprint_now(&p)).await else { break };
                if last.as_ref() != Some(&now) {
                    if tx.send(Ok(now.clone())).await.is_err() {
                        break;
                    }
                    last = Some(now);
                }
                let period = plugin.current_config().fingerprint_period;
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = config_changes.changed() => {}
                    _ = tx.closed() => break,
                    _ = plugin.shutdown.wait() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn recover_task(
        &self,
        request: Request<pb::RecoverTaskRequest>,
    ) -> Result<Response<pb::RecoverTaskResponse>, Status> {
        let handle = request.into_inner().handle.ok_or_else(|| Status::invalid_argument("no task handle"))?;
        self.plugin.tasks.recover(handle).await?;
        Ok(Response::new(pb::RecoverTaskResponse {}))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let task = request.into_inner().task.ok_or_else(|| Status::invalid_argument("no task config"))?;
        let id = task.id.clone();
        let handle = self.plugin.tasks.start(task).await.map_err(|e| {
            tracing::error!(task_id = %id, error = %super::status::chain(&e), "start failed");
            Status::from(e)
        })?;
        Ok(Response::new(pb::StartTaskResponse {
            result: pb::start_task_response::Result::Success as i32,
            driver_error_msg: String::new(),
            handle: Some(handle),
            network_override: None,
        }))
    }

    async fn wait_task(&self, request: Request<pb::WaitTaskRequest>) -> Result<Response<pb::WaitTaskResponse>, Status> {
        let id = request.into_inner().task_id;
        // An unknown task still gets a result: clients before 2.0 dereference it.
        let response = match self.plugin.tasks.wait(&id).await {
            Ok(r) => pb::WaitTaskResponse { result: Some(exit_result(&r)), err: r.err.unwrap_or_default() },
            Err(e) => pb::WaitTaskResponse {
                result: Some(pb::ExitResult { exit_code: -1, signal: 0, oom_killed: false }),
                err: e.to_string(),
            },
        };
        Ok(Response::new(response))
    }

    async fn stop_task(&self, request: Request<pb::StopTaskRequest>) -> Result<Response<pb::StopTaskResponse>, Status> {
        let r = request.into_inner();
        let timeout = r.timeout.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
        self.plugin.tasks.stop(&r.task_id, timeout, &r.signal).await?;
        Ok(Response::new(pb::StopTaskResponse {}))
    }

    async fn destroy_task(
        &self,
        request: Request<pb::DestroyTaskRequest>,
    ) -> Result<Response<pb::DestroyTaskResponse>, Status> {
        let r = request.into_inner();
        self.plugin.tasks.destroy(&r.task_id, r.force).await?;
        Ok(Response::new(pb::DestroyTaskResponse {}))
    }

    async fn inspect_task(
        &self,
        request: Request<pb::InspectTaskRequest>,
    ) -> Result<Response<pb::InspectTaskResponse>, Status> {
        let i = self.plugin.tasks.inspect(&request.into_inner().task_id)?;
        let state = if i.result.is_some() { pb::TaskState::Exited } else { pb::TaskState::Running };
        // "Not completed" is the zero time, as Nomad's Go client expects.
        let zero = prost_types::Timestamp { seconds: -62135596800, nanos: 0 };
        Ok(Response::new(pb::InspectTaskResponse {
            task: Some(pb::TaskStatus {
                id: i.id,
                name: i.name,
                state: state as i32,
                started_at: Some(timestamp(i.started_at)),
                completed_at: Some(i.completed_at.map(timestamp).unwrap_or(zero)),
                result: i.result.as_ref().map(exit_result),
            }),
            driver: Some(pb::TaskDriverStatus { attributes: i.attributes.into_iter().collect() }),
            network_override: None,
        }))
    }

    type TaskStatsStream = BoxStream<pb::TaskStatsResponse>;

    async fn task_stats(
        &self,
        request: Request<pb::TaskStatsRequest>,
    ) -> Result<Response<Self::TaskStatsStream>, Status> {
        let r = request.into_inner();
        let interval = r
            .collection_interval
            .and_then(|d| Duration::try_from(d).ok())
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(1));
        let tasks = self.plugin.tasks.clone();
        tasks.usage_pids(&r.task_id)?;
        let (tx, rx) = mpsc::channel(2);
        let id = r.task_id.clone();
        tokio::spawn(async move {
            let mhz = stats::core_mhz();
            let mut rates: HashMap<i32, stats::CpuRate> = HashMap::new();
            let mut total_rate = stats::CpuRate::new();
            while let Ok(pids) = tasks.usage_pids(&id) {
                let now = Instant::now();
                let (total, per) = stats::sample(&pids);
                let agg = usage(&total, total_rate.update(now, &total), mhz);
                let by_pid = per
                    .iter()
                    .map(|(pid, u)| {
                        let rate = rates.entry(*pid).or_default().update(now, u);
                        (pid.to_string(), usage(u, rate, mhz))
                    })
                    .collect();
                let msg = pb::TaskStatsResponse {
                    stats: Some(pb::TaskStats {
                        id: id.clone(),
                        timestamp: Some(timestamp(SystemTime::now())),
                        agg_resource_usage: Some(agg),
                        resource_usage_by_pid: by_pid,
                    }),
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TaskEventsStream = BoxStream<pb::DriverTaskEvent>;

    async fn task_events(&self, _: Request<pb::TaskEventsRequest>) -> Result<Response<Self::TaskEventsStream>, Status> {
        let mut events = self.plugin.tasks.subscribe();
        let (tx, rx) = mpsc::channel(64);
        let shutdown = self.plugin.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = events.recv() => ev,
                    _ = shutdown.wait() => break,
                };
                match ev {
                    Ok(ev) => {
                        let msg = pb::DriverTaskEvent {
                            task_id: ev.task_id,
                            alloc_id: ev.alloc_id,
                            task_name: ev.task_name,
                            timestamp: Some(timestamp(ev.at)),
                            message: ev.message,
                            annotations: ev.annotations.into_iter().collect(),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(dropped = n, "task events were dropped");
                    }
                    Err(_) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn signal_task(
        &self,
        request: Request<pb::SignalTaskRequest>,
    ) -> Result<Response<pb::SignalTaskResponse>, Status> {
        let r = request.into_inner();
        self.plugin.tasks.signal(&r.task_id, &r.signal).await?;
        Ok(Response::new(pb::SignalTaskResponse {}))
    }

    async fn exec_task(&self, request: Request<pb::ExecTaskRequest>) -> Result<Response<pb::ExecTaskResponse>, Status> {
        let r = request.into_inner();
        let timeout = r.timeout.and_then(|d| Duration::try_from(d).ok()).unwrap_or_default();
        Ok(Response::new(super::exec::run_once(&self.plugin.tasks, &r.task_id, &r.command, timeout).await))
    }

    type ExecTaskStreamingStream = BoxStream<pb::ExecTaskStreamingResponse>;

    async fn exec_task_streaming(
        &self,
        request: Request<Streaming<pb::ExecTaskStreamingRequest>>,
    ) -> Result<Response<Self::ExecTaskStreamingStream>, Status> {
        let mut inbound = request.into_inner();
        let setup = inbound
            .message()
            .await?
            .and_then(|m| m.setup)
            .ok_or_else(|| Status::invalid_argument("the first exec message must be the setup"))?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(super::exec::run(self.plugin.tasks.clone(), setup.task_id, setup.command, setup.tty, inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_network(
        &self,
        _: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::CreateNetworkResponse>, Status> {
        Err(Status::unimplemented("the microvm driver does not create network namespaces"))
    }

    async fn destroy_network(
        &self,
        _: Request<pb::DestroyNetworkRequest>,
    ) -> Result<Response<pb::DestroyNetworkResponse>, Status> {
        Err(Status::unimplemented("the microvm driver does not create network namespaces"))
    }

    async fn init(&self, _: Request<pb::InitRequest>) -> Result<Response<pb::InitResponse>, Status> {
        Ok(Response::new(pb::InitResponse {}))
    }

    /// Nomad's agent is shutting down (2.0.4+): VMs keep running.
    async fn shutdown(&self, _: Request<pb::ShutdownRequest>) -> Result<Response<pb::ShutdownResponse>, Status> {
        Ok(Response::new(pb::ShutdownResponse {}))
    }
}

fn usage(u: &stats::Usage, rate: stats::Rate, mhz: f64) -> pb::TaskResourceUsage {
    use pb::cpu_usage::Fields as C;
    use pb::memory_usage::Fields as M;
    pb::TaskResourceUsage {
        cpu: Some(pb::CpuUsage {
            system_mode: rate.system_percent,
            user_mode: rate.user_percent,
            total_ticks: rate.percent / 100.0 * mhz,
            throttled_periods: 0,
            throttled_time: 0,
            percent: rate.percent,
            measured_fields: vec![C::SystemMode as i32, C::UserMode as i32, C::TotalTicks as i32, C::Percent as i32],
        }),
        memory: Some(pb::MemoryUsage {
            rss: u.rss_bytes,
            cache: 0,
            max_usage: 0,
            kernel_usage: 0,
            kernel_max_usage: 0,
            usage: u.rss_bytes,
            swap: 0,
            measured_fields: vec![M::Rss as i32, M::Usage as i32],
        }),
    }
}
