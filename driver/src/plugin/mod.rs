//! The go-plugin side of the driver: the handshake Nomad expects on stdout,
//! the gRPC server on a unix socket, go-plugin's internal services, and
//! hclog-formatted logs on stderr.

pub mod goplugin;
pub mod handshake;
pub mod hclog;
pub mod server;
