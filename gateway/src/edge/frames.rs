//! What the two stream edges (gRPC `InferStream`, WebSocket
//! `/v1/streams/{model}`) share: a frame's payload made into the model's
//! tensors, as a single REST or gRPC call's would be.

use bytes::Bytes;
use futures::FutureExt;

use crate::error::GatewayError;
use crate::proto::{ModelEntry, Tensor};
use crate::service::stream::Inputs;

use super::convert::{ImageBounds, check_tensor, image_input, image_tensor};

/// How a stream's frames become tensors for its model.
#[derive(Clone)]
pub struct FrameReader {
    /// The model's image input (name, height, width), or why it has none.
    image: Result<(String, u32, u32), GatewayError>,
    bounds: ImageBounds,
}

impl FrameReader {
    pub fn new(entry: &ModelEntry, bounds: ImageBounds) -> Self {
        let image = match &entry.info {
            Some(info) => image_input(info).map(|(name, h, w)| (name.to_owned(), h, w)),
            None => Err(GatewayError::invalid("image", "the model declares no image input")),
        };
        Self { image, bounds }
    }

    /// A frame's tensors: the ones it carries, checked now, or its image,
    /// decoded (on a bulk thread, as a REST image is) into the model's
    /// image input when the stream sends the frame; exactly one of the two.
    pub fn inputs(&self, mut tensors: Vec<Tensor>, image: Bytes) -> Inputs {
        let checked = match (tensors.is_empty(), image.is_empty()) {
            (true, true) => Err(GatewayError::invalid("frame", "a frame carries input tensors or an image")),
            (false, false) => {
                Err(GatewayError::invalid("frame", "a frame carries input tensors or an image, not both"))
            }
            (false, true) => tensors
                .iter_mut()
                .enumerate()
                .try_for_each(|(i, t)| check_tensor(t, &format!("inputs[{i}]")))
                .map(|()| tensors),
            (true, false) => {
                let (image_input, bounds) = (self.image.clone(), self.bounds);
                return async move {
                    let (name, h, w) = image_input?;
                    let tensor = crate::bulk::run(move || image_tensor(&image, &name, h, w, bounds))
                        .await
                        .map_err(|e| GatewayError::invalid("image", format!("image decoding failed: {e}")))?
                        .map_err(|e| match e {
                            // The image is the frame's, not a request body.
                            GatewayError::InvalidRequest { detail, .. } => GatewayError::invalid("image", detail),
                            other => other,
                        })?;
                    Ok(vec![tensor])
                }
                .boxed();
            }
        };
        futures::future::ready(checked).boxed()
    }
}
