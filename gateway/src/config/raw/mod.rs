//! Config as written: serde structs that reject unknown keys, one file per
//! group of sections.

mod cache;
mod listeners;
mod policy;
mod pools;
mod queue;
mod routes;
mod streams;

use serde::{Deserialize, Serialize};

pub use cache::*;
pub use listeners::*;
pub use policy::*;
pub use pools::*;
pub use queue::*;
pub use routes::*;
pub use streams::*;

/// The whole config file. Every section has defaults.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub http: RawHttp,
    pub grpc: RawGrpc,
    pub admin: RawAdmin,
    pub deadlines: RawDeadlines,
    pub workers: RawWorkers,
    pub log: RawLog,
    pub shutdown: RawShutdown,
    pub auth: RawAuth,
    pub limits: RawLimits,
    pub redis: RawRedis,
    pub cache: RawCache,
    pub responses: RawResponses,
    pub queue: RawQueue,
    pub streams: RawStreams,
    pub pools: Vec<RawPool>,
    pub aliases: Vec<RawAlias>,
    /// Per-token prices by model, for the estimated-cost metric.
    pub prices: super::components::Prices,
    pub discovery: RawDiscovery,
    pub tracing: RawTracing,
}
