//! Per-node credentials (`starling-admin node add`): a name and the SHA-256 of its
//! secret; revoked ones keep their row.

use super::{Store, StoreError, get, unique_violation};

/// A node credential as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCredentialRecord {
    /// The node's name (it registers under it).
    pub name: String,
    /// SHA-256 of the secret.
    pub secret_sha256: Vec<u8>,
    /// Creation time, unix ms.
    pub created_at_ms: i64,
    /// Set once revoked.
    pub revoked_at_ms: Option<i64>,
}

impl std::fmt::Debug for NodeCredentialRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentialRecord")
            .field("name", &self.name)
            .field("created_at_ms", &self.created_at_ms)
            .field("revoked_at_ms", &self.revoked_at_ms)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Every node credential, by name.
    pub async fn list_node_credentials(&self) -> Result<Vec<NodeCredentialRecord>, StoreError> {
        const SQL: &str = "SELECT name, secret_sha256, created_at_ms, revoked_at_ms \
             FROM node_credentials ORDER BY name";
        on_pool!(self, pool => {
            let rows = sqlx::query(SQL).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    Ok(NodeCredentialRecord {
                        name: get(row, "name")?,
                        secret_sha256: get(row, "secret_sha256")?,
                        created_at_ms: get(row, "created_at_ms")?,
                        revoked_at_ms: get(row, "revoked_at_ms")?,
                    })
                })
                .collect()
        })
    }

    /// Adds a credential; [`StoreError::AlreadyExists`] when the name is taken (revoked
    /// names included: pick another name).
    pub async fn add_node_credential(
        &self,
        name: &str,
        secret_sha256: &[u8],
        now_ms: i64,
    ) -> Result<(), StoreError> {
        const SQL: &str = "INSERT INTO node_credentials (name, secret_sha256, created_at_ms, \
             revoked_at_ms) VALUES ($1, $2, $3, NULL)";
        on_pool!(self, pool => {
            sqlx::query(SQL)
                .bind(name)
                .bind(secret_sha256)
                .bind(now_ms)
                .execute(pool)
                .await
                .map_err(|e| unique_violation(e, "node credential", name))?;
            Ok(())
        })
    }

    /// Revokes a credential in force; returns whether one was.
    pub async fn revoke_node_credential(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE node_credentials SET revoked_at_ms = $2 \
             WHERE name = $1 AND revoked_at_ms IS NULL";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL).bind(name).bind(now_ms).execute(pool).await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
