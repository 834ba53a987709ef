//! The outputs every stream runs itself, built from its handle like any other output
//! (`crate::output`): the speaker and the speech encoder (each only while someone listens)
//! and the alerts. The HTTP outputs (MJPEG, SSE, WebSocket, the Ogg stream) are built per
//! connection by the server; the history is registered by whoever opens one.

use std::sync::Arc;

use crate::alerts::{AlertLog, AlertSink};
use crate::output::StreamOutput;

pub(crate) mod alerts;
mod encoder;
mod speaker;

/// The outputs a registry gives every stream.
pub(crate) fn built_in(log: Arc<AlertLog>, sink: Option<Arc<dyn AlertSink>>) -> Vec<StreamOutput> {
    vec![
        speaker::output(),
        encoder::output(),
        alerts::output(log, sink),
    ]
}
