//! Credentials, checked before any work: [`Authenticate`] wraps the generated server and reads
//! the `authorization: Bearer <token>` of every call before the call's message is decoded.
//!
//! The gRPC method path says what a call needs ([`Method::of`]):
//!
//! * `Health` needs nothing (load balancers and probes);
//! * the operator calls — `ListInDoubt`, `Resolve`, and `Promote`/`Demote` when they exist —
//!   need the operator token (`operator_token_file`); a client's token gets PERMISSION_DENIED;
//! * `Status` takes a client's token or the operator's;
//! * every other call takes a client's token (`[daemon.clients.NAME]`); the operator token is
//!   for operator calls and gets PERMISSION_DENIED there.
//!
//! No token, or one that matches none configured, is UNAUTHENTICATED. Both refusals carry an
//! `ErrorDetail` (codes `UNAUTHENTICATED`, `PERMISSION_DENIED`) and a message saying what to
//! send. With `unauthenticated = true` (no client tokens) calls need no token; the operator
//! calls still need the operator token when one is configured, and are open when none is.
//!
//! A call let through carries its [`Caller`] in its extensions: the service counts a client's
//! open transactions by the client's name ([`Caller::Client`]), and by peer IP address for an
//! anonymous caller.
//!
//! Tokens are compared in constant time: each configured token is kept as its blake3 hash, the
//! presented token is hashed, and every configured hash is compared (`blake3::Hash`'s equality
//! is constant-time) without stopping at a match. Nothing here logs a token.
//!
//! # Caveats
//!
//! * A refused call is logged at DEBUG (method and reason, never the header): repeated refusals
//!   are not rate-limited or counted yet.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use adapters::config::DaemonConfig;
use proto::v1::{ErrorCode, ErrorDetail};
use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

/// The gRPC service's path prefix.
const SERVICE_PREFIX: &str = "/concord.v1.Coordinator/";
/// The replication service's path prefix: every call of it needs the operator token.
const REPLICATION_PREFIX: &str = "/concord.v1.Replication/";
/// The gRPC path prefix of the failover service.
const FAILOVER_PREFIX: &str = "/concord.v1.Failover/";
/// The calls that need the operator token.
const OPERATOR_METHODS: [&str; 4] = ["ListInDoubt", "Resolve", "Promote", "Demote"];

/// Who made a call, as its credentials say; in the extensions of every call let through.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The client of this name (`[daemon.clients.NAME]`).
    Client(Arc<str>),
    /// The operator (the operator token).
    Operator,
    /// No token: the daemon is configured `unauthenticated`.
    Anonymous,
}

/// What a call needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Nothing (`Health`).
    Open,
    /// A client's token or the operator's (`Status`).
    Either,
    /// The operator token.
    Operator,
    /// A client's token.
    Client,
}

impl Method {
    /// What the call of gRPC path `path` needs.
    pub fn of(path: &str) -> Method {
        if let Some(name) = path.strip_prefix(FAILOVER_PREFIX) {
            // Promote, demote and switchover change who serves; the state is for anyone.
            return if name == "State" {
                Method::Either
            } else {
                Method::Operator
            };
        }
        if path.starts_with(REPLICATION_PREFIX) {
            // Journal shipping and inventories read everything the node holds.
            return Method::Operator;
        }
        let name = path.strip_prefix(SERVICE_PREFIX).unwrap_or(path);
        match name {
            "Health" => Method::Open,
            "Status" => Method::Either,
            _ if OPERATOR_METHODS.contains(&name) => Method::Operator,
            _ => Method::Client,
        }
    }
}

/// The configured tokens, as hashes.
pub struct Keys {
    clients: Vec<(blake3::Hash, Arc<str>)>,
    operator: Option<blake3::Hash>,
    unauthenticated: bool,
}

/// Whose token a presented one is.
enum Holder {
    Client(Arc<str>),
    Operator,
    Nobody,
}

impl Keys {
    /// The tokens of `daemon`.
    pub fn new(daemon: &DaemonConfig) -> Keys {
        let hash = |text: &str| blake3::hash(text.as_bytes());
        Keys {
            clients: daemon
                .clients
                .iter()
                .map(|(name, token)| (hash(token.expose()), Arc::from(name.as_str())))
                .collect(),
            operator: daemon.operator_token.as_ref().map(|t| hash(t.expose())),
            unauthenticated: daemon.unauthenticated,
        }
    }

    /// Whose token `token` is, comparing it with every configured one.
    fn holder(&self, token: &str) -> Holder {
        let presented = blake3::hash(token.as_bytes());
        let mut found = Holder::Nobody;
        for (hash, name) in &self.clients {
            if *hash == presented {
                found = Holder::Client(Arc::clone(name));
            }
        }
        if self.operator.is_some_and(|op| op == presented) {
            found = Holder::Operator;
        }
        found
    }

    /// The caller of a call of `method` presenting `authorization` (the header's value), or the
    /// status refusing it.
    pub fn check(
        &self,
        method: Method,
        authorization: Option<&[u8]>,
    ) -> Result<Caller, tonic::Status> {
        let holder = match authorization {
            None => None,
            Some(value) => Some(self.holder(bearer(value)?)),
        };
        match (method, holder) {
            (Method::Open, _) => Ok(Caller::Anonymous),
            (_, Some(Holder::Nobody)) => Err(unauthenticated(
                "the bearer token matches no token this daemon is configured with: send the \
                 content of your client's token file (or the operator's)",
            )),
            (Method::Operator, Some(Holder::Operator)) => Ok(Caller::Operator),
            (Method::Operator, Some(Holder::Client(_))) => Err(denied(
                "this is an operator call and a client's token may not make it: send the \
                 operator token (operator_token_file)",
            )),
            (Method::Operator, None) if self.operator.is_none() && self.unauthenticated => {
                Ok(Caller::Anonymous)
            }
            (Method::Operator, None) if self.operator.is_none() => Err(denied(
                "operator calls need the operator token, and this daemon has none: add \
                 operator_token_file to its [daemon] table",
            )),
            (Method::Operator, None) => Err(unauthenticated(
                "operator calls need the operator token: send `authorization: Bearer <token>`",
            )),
            (Method::Either, Some(Holder::Operator)) => Ok(Caller::Operator),
            (Method::Client, Some(Holder::Operator)) => Err(denied(
                "the operator token is for operator calls: send a client's token",
            )),
            (_, Some(Holder::Client(name))) => Ok(Caller::Client(name)),
            (_, None) if self.unauthenticated => Ok(Caller::Anonymous),
            (_, None) => Err(unauthenticated(
                "this daemon needs a bearer token: send `authorization: Bearer <token>` with the \
                 content of your client's token file ([daemon.clients.NAME] token_file)",
            )),
        }
    }
}

/// The token of an `authorization` value, which must read `Bearer <token>`.
fn bearer(value: &[u8]) -> Result<&str, tonic::Status> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            unauthenticated(
                "the authorization header is not `Bearer <token>`: send the token that way",
            )
        })
}

fn unauthenticated(message: &str) -> tonic::Status {
    refusal(ErrorCode::Unauthenticated, message)
}

fn denied(message: &str) -> tonic::Status {
    refusal(ErrorCode::PermissionDenied, message)
}

fn refusal(code: ErrorCode, message: &str) -> tonic::Status {
    let detail = ErrorDetail {
        code: code as i32,
        ..ErrorDetail::default()
    };
    proto::error_status(message, &detail)
}

/// The generated server behind the credentials check.
#[derive(Clone)]
pub struct Authenticate<S> {
    inner: S,
    keys: Arc<Keys>,
}

impl<S> Authenticate<S> {
    /// `inner`, reached only by calls whose credentials `keys` accept.
    pub fn new(inner: S, keys: Arc<Keys>) -> Authenticate<S> {
        Authenticate { inner, keys }
    }
}

impl<S: NamedService> NamedService for Authenticate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Authenticate<S>
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

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        let method = Method::of(request.uri().path());
        let authorization = request.headers().get("authorization").map(|v| v.as_bytes());
        match self.keys.check(method, authorization) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Box::pin(self.inner.call(request))
            }
            Err(status) => {
                tracing::debug!(
                    path = request.uri().path(),
                    code = ?status.code(),
                    "refused a call: {}",
                    status.message()
                );
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::path::Path;

    use adapters::config::BearerToken;

    use super::*;

    const SHOP: &str = "shop-token-0123456789";
    const OPERATOR: &str = "operator-token-0123456789";

    fn keys(unauthenticated: bool, operator: bool) -> Keys {
        let mut daemon = DaemonConfig::embedded();
        daemon.unauthenticated = unauthenticated;
        if !unauthenticated {
            let token = BearerToken::new(SHOP, Path::new("shop")).unwrap();
            daemon.clients.insert("shop".into(), token);
        }
        if operator {
            daemon.operator_token = Some(BearerToken::new(OPERATOR, Path::new("op")).unwrap());
        }
        Keys::new(&daemon)
    }

    fn header(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    fn code(r: Result<Caller, tonic::Status>) -> tonic::Code {
        r.unwrap_err().code()
    }

    #[test]
    fn methods_by_path() {
        assert_eq!(Method::of("/concord.v1.Coordinator/Health"), Method::Open);
        assert_eq!(Method::of("/concord.v1.Coordinator/Status"), Method::Either);
        assert_eq!(
            Method::of("/concord.v1.Coordinator/Resolve"),
            Method::Operator
        );
        assert_eq!(
            Method::of("/concord.v1.Coordinator/ListInDoubt"),
            Method::Operator
        );
        assert_eq!(Method::of("/concord.v1.Coordinator/Begin"), Method::Client);
    }

    #[test]
    fn tokens_decide_who_may_call_what() {
        use tonic::Code;
        let k = keys(false, true);
        let shop = header(SHOP);
        let op = header(OPERATOR);
        let wrong = header("wrong-token-0123456789");
        assert_eq!(
            k.check(Method::Client, Some(&shop)).unwrap(),
            Caller::Client("shop".into())
        );
        assert_eq!(code(k.check(Method::Client, None)), Code::Unauthenticated);
        assert_eq!(
            code(k.check(Method::Client, Some(&wrong))),
            Code::Unauthenticated
        );
        assert_eq!(
            code(k.check(Method::Client, Some(b"Basic x"))),
            Code::Unauthenticated
        );
        assert_eq!(
            code(k.check(Method::Client, Some(&op))),
            Code::PermissionDenied
        );
        assert_eq!(
            code(k.check(Method::Operator, Some(&shop))),
            Code::PermissionDenied
        );
        assert_eq!(
            k.check(Method::Operator, Some(&op)).unwrap(),
            Caller::Operator
        );
        assert_eq!(code(k.check(Method::Operator, None)), Code::Unauthenticated);
        assert_eq!(
            k.check(Method::Either, Some(&op)).unwrap(),
            Caller::Operator
        );
        assert!(k.check(Method::Either, Some(&shop)).is_ok());
        assert_eq!(code(k.check(Method::Either, None)), Code::Unauthenticated);
        assert_eq!(k.check(Method::Open, None).unwrap(), Caller::Anonymous);

        let detail = proto::error_detail(&k.check(Method::Client, None).unwrap_err())
            .unwrap()
            .unwrap();
        assert_eq!(detail.code, ErrorCode::Unauthenticated as i32);
    }

    #[test]
    fn unauthenticated_daemons_take_calls_without_a_token() {
        use tonic::Code;
        let open = keys(true, false);
        assert_eq!(open.check(Method::Client, None).unwrap(), Caller::Anonymous);
        assert_eq!(
            open.check(Method::Operator, None).unwrap(),
            Caller::Anonymous
        );
        let guarded = keys(true, true);
        assert_eq!(
            code(guarded.check(Method::Operator, None)),
            Code::Unauthenticated
        );
        assert_eq!(
            guarded
                .check(Method::Operator, Some(&header(OPERATOR)))
                .unwrap(),
            Caller::Operator
        );
        let no_operator = keys(false, false);
        assert_eq!(
            code(no_operator.check(Method::Operator, Some(&header(SHOP)))),
            Code::PermissionDenied
        );
    }
}
