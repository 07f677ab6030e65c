//! The `concord.v1.Replication` gRPC service: `Ship` on a primary (a standby answers that it
//! is a standby), `Inventory` on both.

use std::sync::Arc;

use proto::v1;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::inventory::Inventories;
use crate::primary::Shipper;
use crate::primary::ship::SEND_QUEUE;

/// Where the service's `Status` answer comes from (the daemon's or the standby's status).
#[tonic::async_trait]
pub trait StatusSource: Send + Sync + 'static {
    /// The node's status.
    async fn status(&self) -> Result<v1::StatusResponse, Status>;
}

/// The service: a primary's shipper (none on a standby), the node's resources and status.
pub struct ReplicationService {
    shipper: Option<Arc<Shipper>>,
    inventories: Inventories,
    status: Arc<dyn StatusSource>,
}

impl ReplicationService {
    /// The service of a primary (`shipper`) or a standby (`None`).
    pub fn new(
        shipper: Option<Arc<Shipper>>,
        inventories: Inventories,
        status: Arc<dyn StatusSource>,
    ) -> Self {
        ReplicationService {
            shipper,
            inventories,
            status,
        }
    }
}

#[tonic::async_trait]
impl v1::replication_server::Replication for ReplicationService {
    type ShipStream = ReceiverStream<Result<v1::PrimaryMessage, Status>>;
    type InventoryStream = ReceiverStream<Result<v1::InventoryChunk, Status>>;
    type ReadEntryStream = ReceiverStream<Result<v1::EntryChunk, Status>>;

    async fn ship(
        &self,
        request: Request<Streaming<v1::StandbyMessage>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let Some(shipper) = self.shipper.clone() else {
            return Err(Status::failed_precondition(
                "this node is a standby: point [standby] primary at the primary",
            ));
        };
        let mut inbound = request.into_inner();
        let start = shipper.accept(&mut inbound).await?;
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let welcome = v1::Welcome {
            cluster_id: shipper.cluster_id().to_string(),
            epoch: shipper.coordinator().epoch().0,
            durable_lsn: shipper.coordinator().journal().durable_lsn().0,
            journal_format: journal::segment::FORMAT_VERSION,
            oldest_lsn: shipper.coordinator().journal().oldest_lsn().0,
            mode: shipper.config().mode.as_str().into(),
        };
        let body = v1::primary_message::Body::Welcome(welcome);
        tx.send(Ok(v1::PrimaryMessage { body: Some(body) }))
            .await
            .map_err(|_| Status::cancelled("the standby went away"))?;
        // The stream's task ends with the stream: when the standby goes away (its sends fail
        // and its acknowledgements end) or the shipper stops.
        tokio::spawn(shipper.serve(start, inbound, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn inventory(
        &self,
        request: Request<v1::InventoryRequest>,
    ) -> Result<Response<Self::InventoryStream>, Status> {
        let request = request.into_inner();
        proto::convert::check_header("InventoryRequest.header", request.header.as_ref())?;
        let rx = self.inventories.stream(&request.resource).await?;
        Ok(Response::new(rx))
    }

    async fn reseed_start(
        &self,
        request: Request<v1::ReseedRequest>,
    ) -> Result<Response<v1::ReseedPosition>, Status> {
        let request = request.into_inner();
        proto::convert::check_header("ReseedRequest.header", request.header.as_ref())?;
        let Some(shipper) = &self.shipper else {
            return Err(Status::failed_precondition(
                "this node is a standby: re-seed from the primary",
            ));
        };
        let name = if request.name.is_empty() {
            "standby"
        } else {
            &request.name
        };
        let position = shipper.reseed_position(name).map_err(|e| e.to_status())?;
        Ok(Response::new(v1::ReseedPosition {
            cluster_id: shipper.cluster_id().to_string(),
            lsn: position.lsn.0,
            chain: position.chain.0.to_vec(),
            epoch: position.epoch.0,
            journal_format: journal::segment::FORMAT_VERSION,
        }))
    }

    async fn read_entry(
        &self,
        request: Request<v1::ReadEntryRequest>,
    ) -> Result<Response<Self::ReadEntryStream>, Status> {
        let request = request.into_inner();
        proto::convert::check_header("ReadEntryRequest.header", request.header.as_ref())?;
        let rx = self
            .inventories
            .entry(&request.resource, &request.key)
            .await?;
        Ok(Response::new(rx))
    }

    async fn status(
        &self,
        request: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusResponse>, Status> {
        proto::convert::check_header("StatusRequest.header", request.get_ref().header.as_ref())?;
        Ok(Response::new(self.status.status().await?))
    }
}
