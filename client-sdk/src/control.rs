//! The control-plane side: `ViewerService` Join / Heartbeat / Leave over gRPC.

use std::time::Duration;

use bytes::Bytes;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{HeartbeatRequest, JoinRequest, LeaveRequest, StreamParams};
use tonic::transport::{Channel, Endpoint};

use crate::error::SdkError;

/// Heartbeat interval used when the control plane does not say.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// What `Join` gave us.
#[derive(Debug, Clone)]
pub(crate) struct JoinInfo {
    pub session_id: String,
    pub wire_addr: String,
    pub params: Option<StreamParams>,
    pub token: Bytes,
    pub heartbeat: Duration,
}

#[derive(Clone)]
pub(crate) struct Control {
    client: ViewerServiceClient<Channel>,
    broadcast_id: String,
    credential: String,
    client_version: String,
}

impl Control {
    pub(crate) fn new(
        url: &str,
        broadcast_id: &str,
        credential: Option<&str>,
        client_version: &str,
        timeout: Duration,
    ) -> Result<Control, SdkError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| SdkError::Config(format!("control URL {url:?}: {e}")))?
            .connect_timeout(timeout)
            .timeout(timeout);
        // Lazy: the channel (re)connects on use, so a control plane that is down now
        // and back later is picked up by the next heartbeat or re-join.
        let channel = endpoint.connect_lazy();
        Ok(Control {
            client: ViewerServiceClient::new(channel),
            broadcast_id: broadcast_id.to_string(),
            credential: credential.unwrap_or_default().to_string(),
            client_version: client_version.to_string(),
        })
    }

    pub(crate) async fn join(&self) -> Result<JoinInfo, SdkError> {
        let resp = self
            .client
            .clone()
            .join(JoinRequest {
                broadcast_id: self.broadcast_id.clone(),
                credential: self.credential.clone(),
                client_version: self.client_version.clone(),
            })
            .await
            .map_err(|s| SdkError::from_status("Join", s))?
            .into_inner();
        if resp.dataplane_wire_addr.is_empty() {
            return Err(SdkError::ControlResponse(
                "Join returned no data-plane wire address".into(),
            ));
        }
        let heartbeat = match resp.heartbeat_interval_ms {
            0 => DEFAULT_HEARTBEAT,
            ms => Duration::from_millis(u64::from(ms).max(100)),
        };
        Ok(JoinInfo {
            session_id: resp.session_id,
            wire_addr: resp.dataplane_wire_addr,
            params: resp.params,
            token: Bytes::from(resp.chunk_token),
            heartbeat,
        })
    }

    /// `Ok(false)` when the control plane says the session is over.
    pub(crate) async fn heartbeat(&self, session_id: &str) -> Result<bool, SdkError> {
        let resp = self
            .client
            .clone()
            .heartbeat(HeartbeatRequest {
                session_id: session_id.to_string(),
            })
            .await
            .map_err(|s| SdkError::from_status("Heartbeat", s))?;
        Ok(resp.into_inner().active)
    }

    pub(crate) async fn leave(&self, session_id: &str) -> Result<(), SdkError> {
        self.client
            .clone()
            .leave(LeaveRequest {
                session_id: session_id.to_string(),
            })
            .await
            .map_err(|s| SdkError::from_status("Leave", s))?;
        Ok(())
    }
}
