//! The status of a message over the configured `message_bytes_max`, as `coordinator.proto`'s table says it:
//! RESOURCE_EXHAUSTED with `LIMIT_EXCEEDED`, `limit = message_bytes_max`.
//!
//! tonic's decoder refuses such a message before the service sees it, with OUT_OF_RANGE and no
//! details. [`Oversize`] wraps the generated server and rewrites that one answer (a unary call's
//! status travels in the response headers); [`is_oversize`] tells it apart for the chunks of a
//! client stream, which the service reads itself.
//!
//! # Caveats
//!
//! * tonic's words are the only mark of its refusal: a tonic upgrade that rewords them leaves
//!   its OUT_OF_RANGE as it is (the daemon's tests catch that).

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::errors;

/// What tonic's decoder says of a message over its limit.
const TONIC_WORDS: &str = "decoded message length too large";

/// Whether `status` is tonic's refusal of a message over the size limit.
pub fn is_oversize(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains(TONIC_WORDS)
}

/// The daemon's status for a message over the size limit (`message_bytes_max`).
pub fn status(tonic_words: &str, message_bytes_max: usize) -> tonic::Status {
    errors::limit(
        "message_bytes_max",
        message_bytes_max as u64,
        &format!("a message over the size limit ({tonic_words}): send content in chunks"),
    )
}

/// The generated server, with tonic's oversize refusal rewritten.
#[derive(Clone)]
pub struct Oversize<S> {
    inner: S,
    message_bytes_max: usize,
}

impl<S> Oversize<S> {
    /// `inner` (whose decoder refuses messages over `message_bytes_max`), its refusal rewritten.
    pub fn new(inner: S, message_bytes_max: usize) -> Oversize<S> {
        Oversize {
            inner,
            message_bytes_max,
        }
    }
}

impl<S: NamedService> NamedService for Oversize<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Oversize<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let answer = self.inner.call(request);
        let limit = self.message_bytes_max;
        Box::pin(async move {
            let response = answer.await?;
            match tonic::Status::from_header_map(response.headers()) {
                Some(refused) if is_oversize(&refused) => {
                    Ok(status(refused.message(), limit).into_http())
                }
                _ => Ok(response),
            }
        })
    }
}
