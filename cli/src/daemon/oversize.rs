//! The refusals tonic makes before the service sees a request, as `coordinator.proto`'s table
//! says them, each with an `ErrorDetail`:
//!
//! * a message over `message_bytes_max` (tonic: OUT_OF_RANGE, no details): RESOURCE_EXHAUSTED
//!   with `LIMIT_EXCEEDED`, `limit = message_bytes_max`;
//! * a message that does not decode — bytes that are no protobuf message of the request's
//!   type, a bad compression flag, a stream cut inside a message (tonic: INTERNAL, as if the
//!   daemon had failed): INVALID_ARGUMENT naming the request message;
//! * a method the service does not have (the generated server: UNIMPLEMENTED with no message):
//!   UNIMPLEMENTED with `INCOMPATIBLE_SCHEMA` and the method's name, the mark of a client
//!   generated from another schema.
//!
//! [`Oversize`] wraps the generated server and rewrites those answers (a unary call's status
//! travels in the response headers); [`refusal`] does the same for the messages of a client
//! stream, which the service reads itself.
//!
//! # Caveats
//!
//! * tonic's words are the only mark of its refusals: a tonic upgrade that rewords them leaves
//!   its status as it is (the daemon's tests catch that).
//! * A path outside `concord.v1.Coordinator` never reaches this wrapper: tonic's router answers
//!   it UNIMPLEMENTED without details.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use super::errors;
use proto::v1::{ErrorCode, ErrorDetail};

/// What tonic's decoder says of a message over its limit.
const TONIC_WORDS: &str = "decoded message length too large";

/// How tonic's INTERNAL statuses about a malformed request message begin.
const MALFORMED_WORDS: [&str; 3] = [
    "failed to decode Protobuf message",
    "protocol error: received message",
    "Unexpected EOF decoding stream",
];

/// Whether `status` is tonic's refusal of a message over the size limit.
pub fn is_oversize(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::OutOfRange && status.message().contains(TONIC_WORDS)
}

/// Whether `status` is tonic's refusal of a request message that does not decode.
fn is_malformed(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Internal
        && MALFORMED_WORDS
            .iter()
            .any(|w| status.message().starts_with(w))
}

/// The daemon's status for one of tonic's refusals of a message of type `message` (the request
/// message's name, `FilesPutRequest`); any other status as it is.
pub fn refusal(status: tonic::Status, message: &str, message_bytes_max: usize) -> tonic::Status {
    if is_oversize(&status) {
        self::status(status.message(), message_bytes_max)
    } else if is_malformed(&status) {
        malformed(message, status.message())
    } else {
        status
    }
}

/// INVALID_ARGUMENT for a request message that does not decode.
fn malformed(message: &str, tonic_words: &str) -> tonic::Status {
    proto::error_status(
        format!("a malformed {message} ({tonic_words}): send a message of concord.v1"),
        &ErrorDetail {
            field: message.to_string(),
            ..errors::detail(ErrorCode::InvalidArgument, None)
        },
    )
}

/// UNIMPLEMENTED, with `INCOMPATIBLE_SCHEMA`, for a method the service lacks.
fn unknown_method(path: &str) -> tonic::Status {
    let with_detail = proto::error_status(
        format!(
            "{path} is no method of this daemon's concord.v1 (schema revision {}): use a client generated from its coordinator.proto",
            proto::SCHEMA_VERSION
        ),
        &errors::detail(ErrorCode::IncompatibleSchema, None),
    );
    tonic::Status::with_details(
        tonic::Code::Unimplemented,
        with_detail.message(),
        with_detail.details().to_vec().into(),
    )
}

/// The request message's name of a call to `path` (`/concord.v1.Coordinator/FilesPut` →
/// `FilesPutRequest`).
fn request_message(path: &str) -> String {
    format!("{}Request", path.rsplit('/').next().unwrap_or_default())
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
        let path = request.uri().path().to_string();
        let answer = self.inner.call(request);
        let limit = self.message_bytes_max;
        Box::pin(async move {
            let response = answer.await?;
            let Some(refused) = tonic::Status::from_header_map(response.headers()) else {
                return Ok(response);
            };
            if refused.code() == tonic::Code::Unimplemented && refused.message().is_empty() {
                return Ok(unknown_method(&path).into_http());
            }
            if is_oversize(&refused) || is_malformed(&refused) {
                let message = request_message(&path);
                return Ok(refusal(refused, &message, limit).into_http());
            }
            Ok(response)
        })
    }
}
