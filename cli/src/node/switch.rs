//! A gRPC service that a node turns on and off as its role changes: the `Coordinator` service
//! answers only on the primary, and the `Replication` service changes from a standby's to a
//! primary's. Calls that arrive while the slot is empty get the refusal the node gives (on a
//! standby: "not the primary, the primary is X", `ERROR_CODE_NOT_PRIMARY`).

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http::{Request, Response};
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

/// What a call gets while the slot is empty, from its gRPC path.
pub(crate) type Refusal = Arc<dyn Fn(&str) -> tonic::Status + Send + Sync>;

/// The slot a node fills with the service of its current role.
pub(crate) struct Slot<S>(Arc<RwLock<Option<S>>>);

impl<S> Clone for Slot<S> {
    fn clone(&self) -> Self {
        Slot(Arc::clone(&self.0))
    }
}

impl<S> Slot<S> {
    /// An empty slot.
    pub fn empty() -> Slot<S> {
        Slot(Arc::new(RwLock::new(None)))
    }

    /// Serves `service` from now on (`None`: refuse).
    pub fn set(&self, service: Option<S>) {
        let mut slot = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *slot = service;
    }
}

/// The service in a [`Slot`].
pub(crate) struct Switch<S> {
    slot: Slot<S>,
    refuse: Refusal,
}

impl<S> Clone for Switch<S> {
    fn clone(&self) -> Self {
        Switch {
            slot: self.slot.clone(),
            refuse: Arc::clone(&self.refuse),
        }
    }
}

impl<S> Switch<S> {
    /// Serves what `slot` holds; refuses with `refuse` while it holds nothing.
    pub fn new(slot: Slot<S>, refuse: Refusal) -> Switch<S> {
        Switch { slot, refuse }
    }
}

impl<S: NamedService> NamedService for Switch<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<Request<Body>> for Switch<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Response<Body>, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The generated servers (and the wrappers around them) are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let current = self
            .slot
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        match current {
            Some(mut service) => Box::pin(service.call(request)),
            None => {
                let status = (self.refuse)(request.uri().path());
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}
