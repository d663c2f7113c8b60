//! A small blocking client for the parts of Nomad's HTTP API gitfront uses:
//! namespaces, job register/read/stop, evaluations, allocations and
//! deployments. Every request has a time limit; every error says which
//! Nomad, which request, and what Nomad answered.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::NomadConfig;

#[derive(Debug, thiserror::Error)]
pub enum NomadError {
    #[error("cannot reach Nomad at {address}")]
    Unreachable {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Nomad at {address} did not answer {method} {path} within {}", crate::duration::format(*limit))]
    Timeout { address: String, method: &'static str, path: String, limit: Duration },
    #[error("Nomad refused {method} {path} (HTTP {status}): {message}")]
    Refused { method: &'static str, path: String, status: u16, message: String },
    #[error("Nomad's answer to {method} {path} is not what gitfront expects")]
    Decode {
        method: &'static str,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{method} {path} on Nomad at {address} failed")]
    Transport {
        address: String,
        method: &'static str,
        path: String,
        #[source]
        source: ureq::Error,
    },
    #[error("cannot read the Nomad token from {}", path.display())]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl NomadError {
    /// Whether Nomad was not reached at all (nothing can have changed).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, NomadError::Unreachable { .. } | NomadError::Timeout { .. })
    }
}

pub struct Client {
    agent: ureq::Agent,
    address: String,
    token: Option<String>,
    limit: Duration,
}

/// What `PUT /v1/jobs` answers.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Registered {
    #[serde(rename = "EvalID")]
    pub eval_id: String,
    pub job_modify_index: u64,
    pub warnings: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Evaluation {
    #[serde(rename = "ID")]
    pub id: String,
    pub status: String,
    pub status_description: String,
    #[serde(rename = "FailedTGAllocs")]
    pub failed_tg_allocs: Option<BTreeMap<String, AllocMetric>>,
    pub blocked_eval: String,
}

/// Why allocations could not be placed (`AllocMetric`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AllocMetric {
    pub nodes_evaluated: u64,
    pub nodes_filtered: u64,
    pub nodes_exhausted: u64,
    pub constraint_filtered: Option<BTreeMap<String, u64>>,
    pub dimension_exhausted: Option<BTreeMap<String, u64>>,
    pub nodes_available: Option<BTreeMap<String, u64>>,
}

impl AllocMetric {
    /// One line: how many nodes were looked at and what ruled them out.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{} node(s) evaluated", self.nodes_evaluated)];
        if self.nodes_evaluated == 0 && self.nodes_available.as_ref().is_none_or(|m| m.values().all(|&n| n == 0)) {
            parts = vec!["no nodes in the job's datacenters".to_string()];
        }
        let map = |m: &Option<BTreeMap<String, u64>>| {
            m.iter().flatten().map(|(k, n)| format!("{k} ({n})")).collect::<Vec<_>>().join(", ")
        };
        if self.nodes_filtered > 0 {
            parts.push(format!("{} filtered: {}", self.nodes_filtered, map(&self.constraint_filtered)));
        }
        if self.nodes_exhausted > 0 {
            parts.push(format!("{} out of resources: {}", self.nodes_exhausted, map(&self.dimension_exhausted)));
        }
        parts.join("; ")
    }
}

/// An entry of `GET /v1/job/:id/allocations` (`AllocListStub`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Allocation {
    #[serde(rename = "ID")]
    pub id: String,
    #[serde(rename = "NodeID")]
    pub node_id: String,
    pub node_name: String,
    pub job_version: u64,
    pub client_status: String,
    pub client_description: String,
    pub desired_status: String,
    pub create_index: u64,
    pub task_states: Option<BTreeMap<String, TaskState>>,
    /// Set once the allocation is part of a deployment and its health is
    /// known (`Healthy` stays null until then).
    pub deployment_status: Option<AllocDeploymentStatus>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct AllocDeploymentStatus {
    pub healthy: Option<bool>,
}

impl Allocation {
    pub fn short_id(&self) -> &str {
        &self.id[..self.id.len().min(8)]
    }

    pub fn is_terminal(&self) -> bool {
        matches!(self.client_status.as_str(), "complete" | "failed" | "lost")
    }

    pub fn task(&self, name: &str) -> Option<&TaskState> {
        self.task_states.as_ref().and_then(|t| t.get(name))
    }

    /// What the deployment made of it: `Some(true)` once its tasks ran for
    /// the update's `MinHealthyTime`, `Some(false)` once it failed.
    pub fn healthy(&self) -> Option<bool> {
        self.deployment_status.as_ref().and_then(|d| d.healthy)
    }
}

impl TaskState {
    /// The last event of one of `kinds`.
    pub fn last_event(&self, kinds: &[&str]) -> Option<&TaskEvent> {
        self.events.iter().flatten().rev().find(|e| kinds.contains(&e.kind.as_str()))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskState {
    pub state: String,
    pub failed: bool,
    pub restarts: u64,
    pub events: Option<Vec<TaskEvent>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct TaskEvent {
    #[serde(rename = "Type")]
    pub kind: String,
    pub display_message: String,
    pub time: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct Deployment {
    #[serde(rename = "ID")]
    pub id: String,
    pub status: String,
    pub status_description: String,
    pub job_version: u64,
}

/// An entry of `GET /v1/jobs`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct JobStub {
    #[serde(rename = "ID")]
    pub id: String,
    pub status: String,
    pub stop: bool,
}

impl Client {
    /// A client for `config`: reads the token file now, so a missing token
    /// is reported before anything is built.
    pub fn new(config: &NomadConfig) -> Result<Client, NomadError> {
        let token = match &config.token_file {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| NomadError::Token { path: path.clone(), source })?;
                Some(text.trim().to_string())
            }
            None => None,
        };
        Ok(Client::with(&config.address, token, config.request_timeout))
    }

    pub fn with(address: &str, token: Option<String>, limit: Duration) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(limit))
            .http_status_as_error(false)
            .max_redirects(0)
            .user_agent(concat!("gitfront/", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Client { agent, address: address.trim_end_matches('/').to_string(), token, limit }
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Sends one request; returns the status and body text.
    fn call(
        &self,
        method: &'static str,
        path: &str,
        namespace: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, String), NomadError> {
        let url = format!("{}{}", self.address, path);
        let map_err = |e: ureq::Error| self.classify(method, path, e);
        let mut response = match (method, body) {
            ("GET", _) => self.with_auth(self.agent.get(&url), namespace).call(),
            ("DELETE", _) => self.with_auth(self.agent.delete(&url), namespace).call(),
            ("PUT", Some(b)) => self.with_auth(self.agent.put(&url), namespace).send_json(b),
            ("POST", Some(b)) => self.with_auth(self.agent.post(&url), namespace).send_json(b),
            _ => self.with_auth(self.agent.post(&url), namespace).send_empty(),
        }
        .map_err(map_err)?;
        let status = response.status().as_u16();
        // Lossy: a log tail may begin inside a UTF-8 sequence (Nomad's JSON
        // is UTF-8 anyway).
        let bytes = response.body_mut().read_to_vec().map_err(map_err)?;
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    fn with_auth<B>(&self, mut req: ureq::RequestBuilder<B>, namespace: Option<&str>) -> ureq::RequestBuilder<B> {
        if let Some(token) = &self.token {
            req = req.header("X-Nomad-Token", token);
        }
        if let Some(ns) = namespace {
            req = req.query("namespace", ns);
        }
        req
    }

    fn classify(&self, method: &'static str, path: &str, e: ureq::Error) -> NomadError {
        let address = self.address.clone();
        match e {
            ureq::Error::Timeout(_) => {
                NomadError::Timeout { address, method, path: path.to_string(), limit: self.limit }
            }
            ureq::Error::Io(source) if source.kind() == std::io::ErrorKind::TimedOut => {
                NomadError::Timeout { address, method, path: path.to_string(), limit: self.limit }
            }
            ureq::Error::Io(source) => NomadError::Unreachable { address, source },
            ureq::Error::HostNotFound => {
                NomadError::Unreachable { address, source: std::io::Error::other("host not found") }
            }
            ureq::Error::ConnectionFailed => {
                NomadError::Unreachable { address, source: std::io::Error::other("connection failed") }
            }
            source => NomadError::Transport { address, method, path: path.to_string(), source },
        }
    }

    /// A request whose answer must be 2xx JSON (404 → `None`).
    fn json<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        namespace: Option<&str>,
        body: Option<&Value>,
    ) -> Result<Option<T>, NomadError> {
        let (status, text) = self.call(method, path, namespace, body)?;
        if status == 404 {
            return Ok(None);
        }
        let text = success(method, path, status, text)?;
        // Some writes (namespace upsert) answer 200 with an empty body.
        let text = if text.trim().is_empty() { "null" } else { text.as_str() };
        serde_json::from_str(text).map(Some).map_err(|source| NomadError::Decode {
            method,
            path: path.to_string(),
            source,
        })
    }

    /// Like [`Client::json`], where 404 is an error too.
    fn json_found<T: DeserializeOwned>(
        &self,
        method: &'static str,
        path: &str,
        namespace: Option<&str>,
        body: Option<&Value>,
    ) -> Result<T, NomadError> {
        self.json(method, path, namespace, body)?.ok_or_else(|| NomadError::Refused {
            method,
            path: path.to_string(),
            status: 404,
            message: "not found".into(),
        })
    }

    /// Whether `namespace` exists. Also the cheap "is Nomad there at all"
    /// probe before a build: it needs no ACL beyond reading the namespace.
    pub fn namespace_exists(&self, namespace: &str) -> Result<bool, NomadError> {
        Ok(self.json::<Value>("GET", &format!("/v1/namespace/{namespace}"), None, None)?.is_some())
    }

    /// Creates or updates the namespace (idempotent).
    pub fn ensure_namespace(&self, namespace: &str, description: &str) -> Result<(), NomadError> {
        let body = serde_json::json!({ "Name": namespace, "Description": description });
        self.json::<Value>("PUT", &format!("/v1/namespace/{namespace}"), None, Some(&body))?;
        Ok(())
    }

    /// The job (`None` if Nomad has none by that ID in `namespace`).
    pub fn job(&self, namespace: &str, id: &str) -> Result<Option<Value>, NomadError> {
        self.json("GET", &format!("/v1/job/{id}"), Some(namespace), None)
    }

    /// Registers `job` (the body's `Job`, already holding its namespace).
    pub fn register(&self, namespace: &str, job: &Value) -> Result<Registered, NomadError> {
        self.json_found("PUT", "/v1/jobs", Some(namespace), Some(job))
    }

    pub fn evaluation(&self, namespace: &str, id: &str) -> Result<Evaluation, NomadError> {
        self.json_found("GET", &format!("/v1/evaluation/{id}"), Some(namespace), None)
    }

    /// The job's allocations, newest first.
    pub fn allocations(&self, namespace: &str, job: &str) -> Result<Vec<Allocation>, NomadError> {
        let mut list: Vec<Allocation> =
            self.json("GET", &format!("/v1/job/{job}/allocations"), Some(namespace), None)?.unwrap_or_default();
        list.sort_by_key(|a| std::cmp::Reverse(a.create_index));
        Ok(list)
    }

    /// The job's most recent deployment, if any.
    pub fn latest_deployment(&self, namespace: &str, job: &str) -> Result<Option<Deployment>, NomadError> {
        let d: Option<Option<Deployment>> =
            self.json("GET", &format!("/v1/job/{job}/deployment"), Some(namespace), None)?;
        Ok(d.flatten())
    }

    /// Stops (deregisters without purging) the job; returns the evaluation
    /// ID, or `None` if there was no such job.
    pub fn stop(&self, namespace: &str, job: &str) -> Result<Option<String>, NomadError> {
        let r: Option<Registered> = self.json("DELETE", &format!("/v1/job/{job}"), Some(namespace), None)?;
        Ok(r.map(|r| r.eval_id))
    }

    /// The last (at most) `bytes` bytes of a task's `stdout` or `stderr`
    /// log, as text. Nomad's server forwards this to the allocation's
    /// client; the token needs `read-logs`.
    pub fn task_log_tail(
        &self,
        namespace: &str,
        alloc: &str,
        task: &str,
        stream: &'static str,
        bytes: u64,
    ) -> Result<String, NomadError> {
        let path = format!("/v1/client/fs/logs/{alloc}?task={task}&type={stream}&origin=end&offset={bytes}&plain=true");
        let (status, text) = self.call("GET", &path, Some(namespace), None)?;
        success("GET", &path, status, text)
    }

    /// The jobs in `namespace`.
    pub fn jobs(&self, namespace: &str) -> Result<Vec<JobStub>, NomadError> {
        Ok(self.json("GET", "/v1/jobs", Some(namespace), None)?.unwrap_or_default())
    }
}

/// The body of a 2xx answer; any other status is Nomad refusing, with its message.
fn success(method: &'static str, path: &str, status: u16, text: String) -> Result<String, NomadError> {
    if (200..300).contains(&status) {
        Ok(text)
    } else {
        Err(NomadError::Refused { method, path: path.to_string(), status, message: message(&text) })
    }
}

/// Nomad's error bodies are plain text; the first line, bounded.
fn message(body: &str) -> String {
    let line = body.trim().lines().next().unwrap_or("").trim();
    if line.is_empty() {
        return "(no message)".into();
    }
    let mut text: String = line.chars().take(300).collect();
    if line.chars().count() > 300 {
        text.push('…');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::mpsc;

    /// A one-request HTTP server on 127.0.0.1: answers with `status` and
    /// `body` (or, with `status == 0`, never answers), and sends the request
    /// it saw (head + body) back through the channel.
    fn serve_once(status: u16, body: &'static str) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                head.push_str(&line);
            }
            let mut body_in = vec![0; length];
            reader.read_exact(&mut body_in).unwrap();
            head.push_str(&String::from_utf8_lossy(&body_in));
            tx.send(head).unwrap();
            if status == 0 {
                std::thread::sleep(Duration::from_secs(5));
                return;
            }
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        });
        (addr, rx)
    }

    fn client(addr: &str) -> Client {
        Client::with(addr, Some("s3cret".into()), Duration::from_millis(500))
    }

    #[test]
    fn sends_token_namespace_and_json() {
        let (addr, seen) = serve_once(200, r#"{"EvalID":"e1","JobModifyIndex":7,"Warnings":""}"#);
        let r = client(&addr).register("alice-fleet", &serde_json::json!({"Job": {"ID": "alpha"}})).unwrap();
        assert_eq!(r.eval_id, "e1");
        assert_eq!(r.job_modify_index, 7);
        let req = seen.recv().unwrap();
        assert!(req.starts_with("PUT /v1/jobs?namespace=alice-fleet HTTP/1.1"), "{req}");
        assert!(req.to_ascii_lowercase().contains("x-nomad-token: s3cret"), "{req}");
        let body = &req[req.find('{').unwrap()..];
        assert_eq!(serde_json::from_str::<Value>(body).unwrap(), serde_json::json!({"Job": {"ID": "alpha"}}));
    }

    #[test]
    fn not_found_is_none() {
        let (addr, _seen) = serve_once(404, "job not found");
        assert!(client(&addr).job("ns", "alpha").unwrap().is_none());
    }

    #[test]
    fn refusal_carries_nomads_message() {
        let (addr, _seen) = serve_once(500, "1 error occurred:\n\t* Task group vm validation failed\n");
        let e = client(&addr).register("ns", &serde_json::json!({})).unwrap_err();
        assert_eq!(e.to_string(), "Nomad refused PUT /v1/jobs (HTTP 500): 1 error occurred:");
        assert!(!e.is_unreachable());
    }

    #[test]
    fn garbage_is_a_decode_error() {
        let (addr, _seen) = serve_once(200, "<html>not nomad</html>");
        let e = client(&addr).evaluation("ns", "e1").unwrap_err();
        assert!(matches!(e, NomadError::Decode { .. }), "{e:?}");
        assert_eq!(e.to_string(), "Nomad's answer to GET /v1/evaluation/e1 is not what gitfront expects");
    }

    #[test]
    fn closed_port_is_unreachable() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = client(&format!("http://127.0.0.1:{port}")).namespace_exists("ns").unwrap_err();
        assert!(e.is_unreachable(), "{e:?}");
        let text = crate::error_chain(&e);
        assert!(text.starts_with(&format!("cannot reach Nomad at http://127.0.0.1:{port}: ")), "{text}");
        assert!(text.to_lowercase().contains("refused"), "{text}");
    }

    #[test]
    fn silent_server_times_out() {
        let (addr, _seen) = serve_once(0, "");
        let started = std::time::Instant::now();
        let e = client(&addr).jobs("ns").unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(matches!(e, NomadError::Timeout { .. }), "{e:?}");
        assert!(e.to_string().ends_with("did not answer GET /v1/jobs within 500ms"), "{e}");
    }

    #[test]
    fn missing_token_file_is_named() {
        let cfg = crate::config::NomadConfig {
            token_file: Some("/nonexistent/token".into()),
            ..crate::config::defaults().nomad
        };
        let e = Client::new(&cfg).err().unwrap();
        assert_eq!(e.to_string(), "cannot read the Nomad token from /nonexistent/token");
    }

    #[test]
    fn task_log_tail_asks_for_the_end_of_the_stream() {
        let (addr, seen) = serve_once(200, "line 1\nnot bootable here\n");
        let text = client(&addr).task_log_tail("alice-fleet", "a1", "vm", "stderr", 4096).unwrap();
        assert_eq!(text, "line 1\nnot bootable here\n");
        let req = seen.recv().unwrap();
        assert!(
            req.starts_with(
                "GET /v1/client/fs/logs/a1?task=vm&type=stderr&origin=end&offset=4096&plain=true&namespace=alice-fleet HTTP/1.1"
            ),
            "{req}"
        );
        let (addr, _seen) = serve_once(403, "Permission denied");
        let e = client(&addr).task_log_tail("ns", "a1", "vm", "stderr", 10).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Nomad refused GET /v1/client/fs/logs/a1?task=vm&type=stderr&origin=end&offset=10&plain=true (HTTP 403): Permission denied"
        );
    }

    #[test]
    fn allocation_health_and_events() {
        let a: Allocation = serde_json::from_value(serde_json::json!({
            "ID": "a1", "ClientStatus": "running", "DeploymentStatus": {"Healthy": null, "Timestamp": "0001-01-01T00:00:00Z"},
            "TaskStates": {"vm": {"State": "running", "Restarts": 1, "Events": [
                {"Type": "Terminated", "DisplayMessage": "Exit Code: 1"},
                {"Type": "Restarting", "DisplayMessage": "Task restarting in 10s"},
                {"Type": "Started", "DisplayMessage": "Task started by client"}
            ]}}
        }))
        .unwrap();
        assert_eq!(a.healthy(), None);
        let t = a.task("vm").unwrap();
        assert_eq!(t.last_event(&["Terminated", "Started"]).unwrap().kind, "Started");
        assert_eq!(t.last_event(&["Terminated"]).unwrap().display_message, "Exit Code: 1");
        assert!(t.last_event(&["Not Restarting"]).is_none());
        let healthy: Allocation =
            serde_json::from_value(serde_json::json!({"DeploymentStatus": {"Healthy": true}})).unwrap();
        assert_eq!(healthy.healthy(), Some(true));
        assert_eq!(Allocation::default().healthy(), None, "no deployment");
    }

    #[test]
    fn placement_failure_summary() {
        let m: AllocMetric = serde_json::from_value(serde_json::json!({
            "NodesEvaluated": 2, "NodesFiltered": 1, "NodesExhausted": 1,
            "ConstraintFiltered": {"missing drivers": 1}, "DimensionExhausted": {"memory": 1},
            "NodesAvailable": {"dc1": 2}
        }))
        .unwrap();
        assert_eq!(m.summary(), "2 node(s) evaluated; 1 filtered: missing drivers (1); 1 out of resources: memory (1)");
        let none = AllocMetric::default();
        assert_eq!(none.summary(), "no nodes in the job's datacenters");
    }
}
