//! The dashboard's figures ([`crate::dashboard::Source`]): the admin service's
//! `ListBroadcasts` and `GetAudience`, the same code the gRPC calls run.

use starling_proto::v1::{AudiencePoint, Broadcast, GetAudienceRequest};

use super::{ApiError, Core};
use crate::dashboard::{Source, SourceError};

impl Source for Core {
    async fn broadcasts(&self, include_stopped: bool) -> Result<Vec<Broadcast>, SourceError> {
        self.list_broadcasts(include_stopped)
            .await
            .map(|r| r.broadcasts)
            .map_err(source_error)
    }

    async fn audience(
        &self,
        request: GetAudienceRequest,
    ) -> Result<Vec<AudiencePoint>, SourceError> {
        self.get_audience(request)
            .await
            .map(|r| r.points)
            .map_err(source_error)
    }
}

fn source_error(e: ApiError) -> SourceError {
    match e {
        ApiError::InvalidArgument(m) => SourceError::InvalidArgument(m),
        ApiError::NotFound(m) => SourceError::NotFound(m),
        e => SourceError::Unavailable(e.to_string()),
    }
}
