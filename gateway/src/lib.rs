//! infergate: an edge gateway that terminates HTTP/JSON and gRPC and speaks
//! gRPC to a pool of Python AI workers.
//!
//! Data flows one way: [`edge`] -> [`pool`] (later: policy, route, cache,
//! batch in between); [`supervisor`] runs local worker processes beside it.

pub mod batch;
pub mod bulk;
pub mod cache;
pub mod call;
pub mod config;
pub mod edge;
pub mod embedded;
pub mod error;
pub mod policy;
pub mod pool;
pub mod route;
pub mod server;
pub mod service;
pub mod supervisor;
pub mod telemetry;
pub mod tensor;

/// Generated from `proto/infergate/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("infergate.v1");

    /// Encoded descriptors of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("infergate_descriptor");
}
