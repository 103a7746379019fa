//! How many streams of frames are open, against `streams.max_open`: kept
//! by the core across config reloads, taken by each stream it opens.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::GatewayError;

/// Streams open on this replica, against `streams.max_open`.
#[derive(Debug, Default)]
pub struct OpenStreams(AtomicUsize);

impl OpenStreams {
    pub fn take(self: &Arc<Self>, max: usize) -> Result<OpenSlot, GatewayError> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| GatewayError::TooManyStreams { limit: max })?;
        Ok(OpenSlot(self.clone()))
    }
}

/// One open stream's place in [`OpenStreams`].
pub struct OpenSlot(Arc<OpenStreams>);

impl Drop for OpenSlot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}
