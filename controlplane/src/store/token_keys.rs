//! The control plane's chunk-token signing keys (rotation history).

use super::{Store, StoreError, get, unique_violation};

/// A chunk-token signing key of the control plane as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenKeyRecord {
    /// Key id (the highest one signs).
    pub key_id: u32,
    /// PKCS#8 private key.
    pub pkcs8: Vec<u8>,
    /// Creation time, unix ms.
    pub created_at_ms: i64,
    /// Set when a newer key replaced it: still accepted until then.
    pub retire_at_ms: Option<i64>,
}

impl std::fmt::Debug for TokenKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeyRecord")
            .field("key_id", &self.key_id)
            .field("created_at_ms", &self.created_at_ms)
            .field("retire_at_ms", &self.retire_at_ms)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Every chunk-token signing key, lowest key id first.
    pub async fn list_token_keys(&self) -> Result<Vec<TokenKeyRecord>, StoreError> {
        const SQL: &str = "SELECT key_id, pkcs8, created_at_ms, retire_at_ms FROM token_keys \
             ORDER BY key_id";
        on_pool!(self, pool => {
            let rows = sqlx::query(SQL).fetch_all(pool).await?;
            rows.iter()
                .map(|row| {
                    let id: i64 = get(row, "key_id")?;
                    Ok(TokenKeyRecord {
                        key_id: u32::try_from(id).map_err(|_| {
                            StoreError::Corrupt(format!("token key id out of range: {id}"))
                        })?,
                        pkcs8: get(row, "pkcs8")?,
                        created_at_ms: get(row, "created_at_ms")?,
                        retire_at_ms: get(row, "retire_at_ms")?,
                    })
                })
                .collect()
        })
    }

    /// Adds a signing key with the next key id (1 for the first) and retires every
    /// current key at `retire_at_ms` (keys already retiring keep their earlier time), in
    /// one transaction. Returns the new key id. Two replicas racing get distinct ids (one
    /// of them fails on the primary key and is reported as [`StoreError::AlreadyExists`]).
    pub async fn add_token_key(
        &self,
        pkcs8: &[u8],
        now_ms: i64,
        retire_at_ms: i64,
    ) -> Result<u32, StoreError> {
        const NEXT: &str = "SELECT COALESCE(MAX(key_id), 0) + 1 AS next FROM token_keys";
        const RETIRE: &str = "UPDATE token_keys SET retire_at_ms = $1 WHERE retire_at_ms IS NULL";
        const INSERT: &str = "INSERT INTO token_keys (key_id, pkcs8, created_at_ms, retire_at_ms) \
             VALUES ($1, $2, $3, NULL)";
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            let row = sqlx::query(NEXT).fetch_one(&mut *tx).await?;
            let next: i64 = get(&row, "next")?;
            let key_id = u32::try_from(next)
                .map_err(|_| StoreError::Corrupt(format!("token key id out of range: {next}")))?;
            sqlx::query(RETIRE).bind(retire_at_ms).execute(&mut *tx).await?;
            sqlx::query(INSERT)
                .bind(next)
                .bind(pkcs8)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(|e| unique_violation(e, "token key", &next.to_string()))?;
            tx.commit().await?;
            Ok(key_id)
        })
    }
}
