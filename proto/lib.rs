//! Generated gRPC types for a Nomad task-driver plugin.
//!
//! Module paths mirror the proto packages (generated code refers across
//! packages with `super::` paths):
//! - [`hashicorp::nomad::plugins::base::proto`]: `BasePlugin` (PluginInfo, ConfigSchema, SetConfig)
//! - [`hashicorp::nomad::plugins::drivers::proto`]: the `Driver` service
//! - [`hashicorp::nomad::plugins::shared::hclspec`]: the schema language
//! - [`hashicorp::nomad::plugins::shared::structs`]: attributes, recoverable errors
//! - [`plugin`]: go-plugin's controller, stdio and broker services

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/generated.rs"));

/// Short aliases used throughout the workspace.
pub use hashicorp::nomad::plugins::base::proto as base;
pub use hashicorp::nomad::plugins::drivers::proto as drivers;
pub use hashicorp::nomad::plugins::shared::hclspec;
pub use hashicorp::nomad::plugins::shared::structs;
pub use plugin as goplugin;
