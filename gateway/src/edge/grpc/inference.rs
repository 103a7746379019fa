//! The public `infergate.v1.Inference` service over the request core.

use std::sync::Arc;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::super::EdgeState;
use super::call::{ask, fail, respond};
use crate::error::GatewayError;
use crate::proto::inference_server::Inference;
use crate::proto::{
    EmbedRequest, EmbedResponse, Embedding, GenerateChunk, GenerateRequest, InferItem, InferRequest, InferResponse,
    ListModelsRequest, ListModelsResponse, Usage,
};
use crate::service::Answer;

/// The public Inference service over the shared upstream.
pub struct InferenceService {
    pub(super) state: Arc<EdgeState>,
}

#[tonic::async_trait]
impl Inference for InferenceService {
    async fn list_models(&self, _req: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        Ok(Response::new(ListModelsResponse { models: self.state.core.models() }))
    }

    async fn infer(&self, req: Request<InferRequest>) -> Result<Response<InferResponse>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let mut r = req.into_inner();
        let result = async {
            if r.inputs.is_empty() {
                return Err(GatewayError::invalid("inputs", "at least one input tensor is required"));
            }
            for (i, t) in r.inputs.iter_mut().enumerate() {
                super::super::convert::check_tensor(t, &format!("inputs[{i}]"))?;
            }
            ask.model.clone_from(&r.model);
            let core = &self.state.core;
            let admitted = core.admit_infer(ask).await?;
            let item = InferItem { id: r.id.clone(), inputs: r.inputs, outputs: r.outputs, parameters: r.parameters };
            let Answer { value: (info, out), served } = core.infer(admitted, item).await?;
            let msg = InferResponse {
                model: info.name,
                model_version: info.version,
                id: r.id,
                outputs: out.tensors,
                parameters: out.parameters,
            };
            Ok((msg, served))
        }
        .await;
        result.map(|(msg, served)| respond(msg, &rid, &served)).map_err(|e| fail(e, &rid))
    }

    async fn embed(&self, req: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let r = req.into_inner();
        let result = async {
            if r.inputs.is_empty() {
                return Err(GatewayError::invalid("inputs", "must not be empty"));
            }
            if r.inputs.len() > super::super::json::MAX_EMBED_INPUTS {
                return Err(GatewayError::invalid(
                    "inputs",
                    format!("at most {} inputs per request", super::super::json::MAX_EMBED_INPUTS),
                ));
            }
            ask.model.clone_from(&r.model);
            let Answer { value: out, served } = self.state.core.embed(ask, r.inputs, None).await?;
            let msg = EmbedResponse {
                model: r.model,
                data: out.vectors.into_iter().map(|values| Embedding { values }).collect(),
                usage: Some(Usage { prompt_tokens: out.prompt_tokens, completion_tokens: 0 }),
            };
            Ok((msg, served))
        }
        .await;
        result.map(|(msg, served)| respond(msg, &rid, &served)).map_err(|e| fail(e, &rid))
    }

    type InferStreamStream = super::stream::Results;

    async fn infer_stream(
        &self,
        req: Request<tonic::Streaming<crate::proto::StreamRequest>>,
    ) -> Result<Response<Self::InferStreamStream>, Status> {
        super::stream::open(&self.state, req).await
    }

    type GenerateStream = futures::stream::BoxStream<'static, Result<GenerateChunk, Status>>;

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let mut ask = ask(&self.state, &req)?;
        let rid = ask.request_id.clone();
        let r = req.into_inner();
        ask.model.clone_from(&r.model);
        let Answer { value: chunks, served } = self.state.core.generate(ask, r).await.map_err(|e| fail(e, &rid))?;
        // An error after the first chunk ends the stream with its status.
        let stream = {
            let rid = rid.clone();
            chunks.map(move |c| c.map_err(|e| fail(e, &rid)))
        };
        Ok(respond(stream.boxed(), &rid, &served))
    }
}
