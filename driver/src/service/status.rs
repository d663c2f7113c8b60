//! The one place our errors become gRPC statuses, following what Nomad's
//! client makes of them (protocol reference §4.2): `FailedPrecondition` with a
//! `RecoverableError` detail tells it whether a restart could help; any other
//! code is an opaque, non-recoverable error; `Unavailable` would make it think
//! the plugin died, so we never use it.

use microvm_proto::structs::RecoverableError;
use prost::Message;
use tonic::{Code, Status};

use crate::config::ConfigError;
use crate::task::TaskError;

/// `google.rpc.Status`, which carries the details in `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

const RECOVERABLE_ERROR_TYPE: &str = "type.googleapis.com/hashicorp.nomad.plugins.shared.structs.RecoverableError";

/// A `FailedPrecondition` Nomad reads as recoverable (restart per the job's
/// restart policy) or not (the task fails at once).
pub fn failed_precondition(message: String, recoverable: bool) -> Status {
    let detail = prost_types::Any {
        type_url: RECOVERABLE_ERROR_TYPE.to_string(),
        value: RecoverableError { recoverable }.encode_to_vec(),
    };
    // grpc-go rejects details whose code differs from the status code.
    let details = RpcStatus { code: Code::FailedPrecondition as i32, message: message.clone(), details: vec![detail] };
    Status::with_details(Code::FailedPrecondition, message, details.encode_to_vec().into())
}

pub fn invalid_plugin_config(e: &ConfigError) -> Status {
    Status::invalid_argument(format!("invalid microvm plugin config: {e}"))
}

/// Renders an error with its chain of sources, cloud-hypervisor style:
/// `outer: inner: innermost`.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // transparent wrappers repeat their source's text
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

impl From<TaskError> for Status {
    fn from(e: TaskError) -> Status {
        let message = chain(&e);
        match &e {
            TaskError::NotFound(_) => Status::not_found(message),
            TaskError::AlreadyExists(_) => Status::already_exists(message),
            TaskError::NotImplemented(_) => Status::unimplemented(message),
            _ => failed_precondition(message, e.recoverable()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recoverable_detail_round_trips() {
        let st = failed_precondition("no tap".into(), true);
        assert_eq!(st.code(), Code::FailedPrecondition);
        let details = RpcStatus::decode(st.details()).unwrap();
        assert_eq!(details.code, Code::FailedPrecondition as i32);
        assert_eq!(details.message, "no tap");
        assert_eq!(details.details[0].type_url, RECOVERABLE_ERROR_TYPE);
        let inner = RecoverableError::decode(details.details[0].value.as_slice()).unwrap();
        assert!(inner.recoverable);
        let st = failed_precondition("bad runner".into(), false);
        let details = RpcStatus::decode(st.details()).unwrap();
        assert!(!RecoverableError::decode(details.details[0].value.as_slice()).unwrap().recoverable);
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chains_sources() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(chain(&e), "outer: inner");
    }
}
