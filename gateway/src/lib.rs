//! infergate: an edge gateway that terminates HTTP/JSON and gRPC and speaks
//! gRPC to a pool of Python AI workers.
//!
//! A request flows one way: [`edge`] decodes it and calls the request core
//! ([`service`]), which plans ([`route`]), admits ([`policy`]), goes
//! through the response cache ([`cache`]) to the pools ([`pool`], with
//! [`batch`]) and meters ([`telemetry`]); [`supervisor`] runs local worker
//! processes beside it; [`control`] changes them while they run (reloads,
//! the admin API); [`server`] wires them together.
//!
//! Which module may use which (`crate::` paths outside test code). The
//! test `dependency_tests` reads every module's sources against this table
//! and checks that the table has no circle: a module never uses one that
//! uses it back. It also reads every source file's own paths (`crate::`,
//! `super::`, `self::`, a parent's `child::`): no file uses one that uses
//! it back either, so a parent's shared items live in a leaf file its
//! children use.
//!
//! | module | may use |
//! |---|---|
//! | config | |
//! | proto | |
//! | error | |
//! | bulk | |
//! | slots | |
//! | load_state | |
//! | call | config |
//! | redis_pool | config |
//! | conversations | config redis_pool |
//! | queue | call config error redis_pool telemetry |
//! | tensor | proto |
//! | upstream | call error proto |
//! | telemetry | config |
//! | embedded | call config proto telemetry |
//! | supervisor | config load_state telemetry |
//! | policy | call config error redis_pool telemetry |
//! | batch | call config error slots telemetry |
//! | pool | batch bulk call config embedded error load_state proto slots telemetry tensor upstream |
//! | route | call config error proto telemetry upstream |
//! | cache | call config error proto redis_pool route telemetry upstream |
//! | service | cache call config error policy proto route telemetry upstream |
//! | control | cache config policy pool redis_pool route service supervisor telemetry |
//! | edge | bulk cache call config control conversations error policy pool proto queue route service telemetry tensor upstream |
//! | server | cache config control conversations edge embedded load_state policy pool proto queue redis_pool route service supervisor telemetry upstream |

pub mod batch;
pub mod bulk;
pub mod cache;
pub mod call;
pub mod config;
pub mod control;
pub mod conversations;
pub mod edge;
pub mod embedded;
pub mod error;
pub mod load_state;
pub mod policy;
pub mod pool;
pub mod queue;
pub mod redis_pool;
pub mod route;
pub mod server;
pub mod service;
pub mod slots;
pub mod supervisor;
pub mod telemetry;
pub mod tensor;
pub mod upstream;

#[cfg(test)]
mod dependency_tests;

/// Generated from `proto/infergate/v1/*.proto`.
pub mod proto {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("infergate.v1");

    /// Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`),
    /// vendored from the specification (`proto/inference/`).
    pub mod oip {
        #![allow(clippy::all, clippy::pedantic, missing_docs)]
        tonic::include_proto!("inference");
    }

    /// Encoded descriptors of the contract, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("infergate_descriptor");
}
