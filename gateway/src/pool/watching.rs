//! The stop tokens of the pools' watches (worker health, DNS discovery),
//! so that one can be ended when its worker or pool goes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How workers are watched: what [`Pools::watch`] was given, and the
/// stop token of each watch (by worker id, or a pool's discovery).
pub(super) struct Watching {
    pub(super) connect_timeout: Duration,
    pub(super) nameservers: Vec<SocketAddr>,
    stop: CancellationToken,
    watches: Mutex<HashMap<String, CancellationToken>>,
}

impl Watching {
    pub(super) fn new(connect_timeout: Duration, nameservers: Vec<SocketAddr>, stop: CancellationToken) -> Self {
        Self { connect_timeout, nameservers, stop, watches: Mutex::default() }
    }

    /// A new stop token for the watch named `key`.
    pub(super) fn token(&self, key: &str) -> CancellationToken {
        let token = self.stop.child_token();
        let old = self.watches.lock().unwrap_or_else(PoisonError::into_inner).insert(key.to_owned(), token.clone());
        if let Some(old) = old {
            old.cancel();
        }
        token
    }

    /// End the watch named `key`.
    pub(super) fn stop(&self, key: &str) {
        if let Some(token) = self.watches.lock().unwrap_or_else(PoisonError::into_inner).remove(key) {
            token.cancel();
        }
    }
}

/// The watch key of `worker`'s health watch: the worker itself, not its id
/// (a pool removed and added again may have workers of the same ids while
/// the old ones are still being stopped).
pub(super) fn worker_key(worker: &std::sync::Arc<super::worker::Worker>) -> String {
    format!("worker@{:p}", std::sync::Arc::as_ptr(worker))
}

/// The watch key of pool `index`'s DNS discovery.
pub(super) fn discovery_key(index: usize) -> String {
    format!("discovery of pool #{index}")
}
