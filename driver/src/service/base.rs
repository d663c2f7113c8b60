//! `BasePlugin`: who we are, our config schema, and the operator's config.

use std::sync::Arc;

use microvm_proto::base::{
    ConfigSchemaRequest, ConfigSchemaResponse, PluginInfoRequest, PluginInfoResponse, PluginType, SetConfigRequest,
    SetConfigResponse, base_plugin_server::BasePlugin,
};
use tonic::{Request, Response, Status};

use super::Plugin;
use crate::config;

/// The only driver plugin API version Nomad knows.
pub const PLUGIN_API_VERSION: &str = "0.1.0";

pub struct Base {
    pub plugin: Arc<Plugin>,
}

#[tonic::async_trait]
impl BasePlugin for Base {
    async fn plugin_info(&self, _: Request<PluginInfoRequest>) -> Result<Response<PluginInfoResponse>, Status> {
        Ok(Response::new(PluginInfoResponse {
            r#type: PluginType::Driver as i32,
            plugin_api_versions: vec![PLUGIN_API_VERSION.to_string()],
            plugin_version: crate::VERSION.to_string(),
            name: crate::DRIVER_NAME.to_string(),
        }))
    }

    async fn config_schema(&self, _: Request<ConfigSchemaRequest>) -> Result<Response<ConfigSchemaResponse>, Status> {
        Ok(Response::new(ConfigSchemaResponse { spec: Some(config::plugin_schema()) }))
    }

    async fn set_config(&self, request: Request<SetConfigRequest>) -> Result<Response<SetConfigResponse>, Status> {
        let request = request.into_inner();
        let config = config::decode_plugin_config(&request.msgpack_config).map_err(|e| {
            tracing::error!(error = %e, "invalid plugin config");
            super::status::invalid_plugin_config(&e)
        })?;
        tracing::debug!(?config, long_lived = request.nomad_config.is_some(), "plugin configured");
        self.plugin.tasks.configure(Arc::new(config.clone()));
        self.plugin.config.send_replace(Some(Arc::new(config)));
        Ok(Response::new(SetConfigResponse {}))
    }
}
