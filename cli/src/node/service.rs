//! The `concord.v1.Failover` service of a node: what `concord promote|demote|switchover` and
//! `concord status` call.

use std::sync::Arc;

use proto::v1;
use proto::v1::failover_server::Failover;
use tonic::{Request, Response, Status};

use super::Node;
use super::promote::{Ask, Why};

/// The service over a node.
pub(crate) struct FailoverService(pub Arc<Node>);

#[tonic::async_trait]
impl Failover for FailoverService {
    async fn promote(
        &self,
        request: Request<v1::PromoteRequest>,
    ) -> Result<Response<v1::RoleChangeReply>, Status> {
        let request = request.into_inner();
        let ask = Ask {
            why: Why::Operator,
            force: request.force,
            dry_run: request.dry_run,
            operator: if request.operator.is_empty() {
                "an operator".into()
            } else {
                request.operator
            },
            handover_epoch: request.handover_epoch,
        };
        Ok(Response::new(super::promote::promote(&self.0, ask).await))
    }

    async fn demote(
        &self,
        request: Request<v1::DemoteRequest>,
    ) -> Result<Response<v1::RoleChangeReply>, Status> {
        let request = request.into_inner();
        let operator = operator_name(&request.operator);
        Ok(Response::new(
            super::demote::demote(&self.0, request.force, &operator, false).await,
        ))
    }

    async fn switchover(
        &self,
        request: Request<v1::SwitchoverRequest>,
    ) -> Result<Response<v1::RoleChangeReply>, Status> {
        let request = request.into_inner();
        let operator = operator_name(&request.operator);
        Ok(Response::new(
            super::demote::demote(&self.0, request.force, &operator, true).await,
        ))
    }

    async fn state(
        &self,
        _request: Request<v1::FailoverStateRequest>,
    ) -> Result<Response<v1::FailoverState>, Status> {
        Ok(Response::new(self.0.failover_state()))
    }
}

fn operator_name(given: &str) -> String {
    if given.is_empty() {
        "an operator".into()
    } else {
        given.to_string()
    }
}
