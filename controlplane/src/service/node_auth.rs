//! Per-node credentials (issue 18, part 4): the admin RPCs that make, revoke and list
//! them, and the check of an `EdgeService` call's identity.
//!
//! A per-node credential (`stn1.NAME.SECRET`) is checked against the stored SHA-256 of
//! its secret and **binds the caller to the node named NAME**: it registers only under
//! that name, and opens command streams and reports health only for nodes registered
//! under it. Revoking it refuses its next call (this process at once, other replicas
//! within [`CREDENTIAL_CACHE_TTL`]) and declares its alive nodes dead, so that their
//! broadcasts move and viewers stop trusting their chunk keys. The static node key is
//! the legacy / zero-setup mode: its holder (and an admin) may act as any node, except
//! under a name that has a credential in force.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_proto::v1::{
    AddNodeCredentialResponse, ListNodeCredentialsResponse, NodeCredentialInfo,
    RevokeNodeCredentialResponse,
};

use super::{ApiError, ApiResult, Core, now_ms};
use crate::auth::{NodeIdentity, constant_time_eq, new_node_credential, valid_node_name};
use crate::store::{NodeCredentialRecord, StoreError};

/// How long this process trusts its copy of the credential table (revocations by other
/// replicas take effect within it).
pub const CREDENTIAL_CACHE_TTL: Duration = Duration::from_secs(5);

/// The credential table, by name, as last read.
pub(super) type CredentialCache =
    parking_lot::Mutex<Option<(Instant, Arc<HashMap<String, NodeCredentialRecord>>)>>;

/// What an `EdgeService` caller may act as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum NodeAuth {
    /// A per-node credential in force: only the node named so.
    Named(String),
    /// The static node key or an admin credential (or no interceptor at all, in
    /// process): any node whose name has no credential in force.
    Legacy,
}

impl Core {
    async fn node_credentials(&self) -> ApiResult<Arc<HashMap<String, NodeCredentialRecord>>> {
        if let Some((at, map)) = &*self.node_credentials.lock()
            && at.elapsed() < CREDENTIAL_CACHE_TTL
        {
            return Ok(map.clone());
        }
        let rows = self.store.list_node_credentials().await?;
        let map: Arc<HashMap<_, _>> =
            Arc::new(rows.into_iter().map(|r| (r.name.clone(), r)).collect());
        *self.node_credentials.lock() = Some((Instant::now(), map.clone()));
        Ok(map)
    }

    /// Checks the identity the node interceptor found (`None`: no interceptor).
    pub(super) async fn authorize_node(&self, who: Option<&NodeIdentity>) -> ApiResult<NodeAuth> {
        let Some(NodeIdentity::Credential(claim)) = who else {
            return Ok(NodeAuth::Legacy);
        };
        let creds = self.node_credentials().await?;
        match creds.get(&claim.name) {
            Some(c)
                if c.revoked_at_ms.is_none()
                    && constant_time_eq(&c.secret_sha256, &claim.secret_sha256) =>
            {
                Ok(NodeAuth::Named(claim.name.clone()))
            }
            _ => Err(ApiError::Auth(tonic::Status::unauthenticated(
                "node credential rejected: unknown, revoked or wrong secret",
            ))),
        }
    }

    /// The name a node registers under: a named credential's own (a different
    /// `node_name` is refused); a legacy caller's choice unless a credential in force
    /// has that name.
    pub(super) async fn registered_name(&self, auth: &NodeAuth, asked: &str) -> ApiResult<String> {
        match auth {
            NodeAuth::Named(name) => {
                if !asked.is_empty() && asked != name {
                    return Err(ApiError::PermissionDenied(format!(
                        "node credential is for node {name:?}, not {asked:?}"
                    )));
                }
                Ok(name.clone())
            }
            NodeAuth::Legacy => {
                if self
                    .node_credentials()
                    .await?
                    .get(asked)
                    .is_some_and(|c| c.revoked_at_ms.is_none())
                {
                    return Err(ApiError::PermissionDenied(format!(
                        "node {asked:?} has its own credential: the shared node key cannot \
                         register under that name"
                    )));
                }
                Ok(asked.to_string())
            }
        }
    }

    /// Refuses a named caller acting for a node registered under another name.
    pub(super) async fn check_node_binding(&self, auth: &NodeAuth, node_id: &str) -> ApiResult<()> {
        let NodeAuth::Named(name) = auth else {
            return Ok(());
        };
        match self.store.get_node(node_id).await? {
            Some(n) if n.name != *name => Err(ApiError::PermissionDenied(format!(
                "node credential {name:?} cannot act for node {node_id} (registered as {:?})",
                n.name
            ))),
            _ => Ok(()),
        }
    }

    pub(super) async fn add_node_credential(
        &self,
        name: &str,
    ) -> ApiResult<AddNodeCredentialResponse> {
        let Some((credential, hash)) = new_node_credential(name) else {
            return Err(ApiError::InvalidArgument(format!(
                "node name {name:?}: 1..={} of [A-Za-z0-9._-], not starting with a dot",
                crate::auth::MAX_NODE_NAME
            )));
        };
        let r = self.store.add_node_credential(name, &hash, now_ms()).await;
        *self.node_credentials.lock() = None;
        match r {
            Ok(()) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                return Err(ApiError::AlreadyExists(format!(
                    "node credential {name} already exists (revoked names stay taken)"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(name, "node credential added");
        Ok(AddNodeCredentialResponse {
            name: name.to_string(),
            credential,
        })
    }

    pub(super) async fn revoke_node_credential(
        &self,
        name: &str,
    ) -> ApiResult<RevokeNodeCredentialResponse> {
        if !valid_node_name(name) {
            return Err(ApiError::InvalidArgument(format!(
                "node name {name:?} is not valid"
            )));
        }
        let revoked = self.store.revoke_node_credential(name, now_ms()).await;
        *self.node_credentials.lock() = None;
        let revoked = revoked?;
        // Its nodes are dead at once: their broadcasts move, viewers drop their keys.
        let _guard = self.assign_lock.lock().await;
        let mut dead = Vec::new();
        for n in self.store.list_alive_nodes().await? {
            if n.name == name {
                let marked = self.store.mark_node_dead(&n.id).await;
                self.join_cache.forget_node(&n.id);
                marked?;
                dead.push(n.id);
            }
        }
        let result = self.reconcile_locked().await;
        {
            let mut links = self.links.lock();
            for id in &dead {
                links.remove(id);
            }
        }
        result?;
        tracing::warn!(
            name,
            revoked,
            nodes_declared_dead = dead.len(),
            "node credential revoked"
        );
        Ok(RevokeNodeCredentialResponse { revoked })
    }

    pub(super) async fn list_node_credentials(&self) -> ApiResult<ListNodeCredentialsResponse> {
        let rows = self.store.list_node_credentials().await?;
        Ok(ListNodeCredentialsResponse {
            credentials: rows
                .into_iter()
                .map(|r| NodeCredentialInfo {
                    name: r.name,
                    created_at_unix_ms: r.created_at_ms,
                    revoked_at_unix_ms: r.revoked_at_ms.unwrap_or(0),
                })
                .collect(),
        })
    }
}
