//! `[streams]` as written.

use serde::{Deserialize, Serialize};

/// `[streams]`: streams of frames (gRPC `InferStream`, WebSocket
/// `/v1/streams/{model}`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawStreams {
    /// Streams open at once on this replica; one more is refused.
    pub max_open: u32,
    /// The largest `max_in_flight` a stream may ask for.
    pub max_in_flight: u32,
    /// A frame's deadline when the stream names none.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub frame_timeout: String,
    /// A stream that sends no frame for this long is ended.
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub idle_timeout: String,
    /// The longest a stream may last (a gRPC deadline may shorten it).
    #[serde(deserialize_with = "crate::config::check::text_or_seconds")]
    pub max_duration: String,
}

impl Default for RawStreams {
    fn default() -> Self {
        Self {
            max_open: 256,
            max_in_flight: 64,
            frame_timeout: "5s".into(),
            idle_timeout: "30s".into(),
            max_duration: "1h".into(),
        }
    }
}
