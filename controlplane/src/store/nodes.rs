//! Data-plane nodes: registration, health reports, death.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{Store, StoreError, get, to_i32, to_u32, unique_violation};

/// A data-plane node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Node id (new at every registration).
    pub id: String,
    /// Name the node gave itself.
    pub name: String,
    /// host:port of its wire-protocol listener.
    pub wire_addr: String,
    /// host:port of its plain HTTP listener.
    pub http_addr: String,
    /// CPU cores.
    pub cores: u32,
    /// Viewer connections it accepts.
    pub capacity_viewers: u32,
    /// False once declared dead; a dead node never comes back (it re-registers).
    pub alive: bool,
    /// Viewers connected, from its last health report.
    pub viewers: u32,
    /// Registration time, unix ms.
    pub registered_at_ms: i64,
    /// Last health report (or registration), unix ms.
    pub last_seen_ms: i64,
    /// The key the node signs chunks with, if it declared one.
    pub chunk_key: Option<NodeKey>,
}

/// An Ed25519 public key with its key id (a node's chunk-signing key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKey {
    /// Key id chosen by the node.
    pub key_id: u32,
    /// 32 raw bytes.
    pub ed25519: Vec<u8>,
}

/// Input of [`Store::register_node`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNode {
    /// Id (already generated).
    pub id: String,
    /// Name.
    pub name: String,
    /// Wire address.
    pub wire_addr: String,
    /// HTTP address.
    pub http_addr: String,
    /// Cores.
    pub cores: u32,
    /// Capacity.
    pub capacity_viewers: u32,
    /// Chunk-signing key.
    pub chunk_key: Option<NodeKey>,
}

macro_rules! node_cols {
    () => {
        "id, name, wire_addr, http_addr, cores, capacity_viewers, alive, viewers, \
         registered_at_ms, last_seen_ms, chunk_key_id, chunk_key"
    };
}

fn decode_node<'r, R>(row: &'r R) -> Result<NodeRecord, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
    Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
{
    let key_id: Option<i64> = get(row, "chunk_key_id")?;
    let key: Option<Vec<u8>> = get(row, "chunk_key")?;
    let chunk_key = match (key_id, key) {
        (Some(id), Some(k)) => Some(NodeKey {
            key_id: u32::try_from(id)
                .map_err(|_| StoreError::Corrupt(format!("chunk_key_id out of range: {id}")))?,
            ed25519: k,
        }),
        _ => None,
    };
    Ok(NodeRecord {
        id: get(row, "id")?,
        name: get(row, "name")?,
        wire_addr: get(row, "wire_addr")?,
        http_addr: get(row, "http_addr")?,
        cores: to_u32(get(row, "cores")?, "cores")?,
        capacity_viewers: to_u32(get(row, "capacity_viewers")?, "capacity_viewers")?,
        alive: get(row, "alive")?,
        viewers: to_u32(get(row, "viewers")?, "viewers")?,
        registered_at_ms: get(row, "registered_at_ms")?,
        last_seen_ms: get(row, "last_seen_ms")?,
        chunk_key,
    })
}

impl Store {
    /// Inserts a node, alive, last seen now.
    pub async fn register_node(
        &self,
        new: &NewNode,
        now_ms: i64,
    ) -> Result<NodeRecord, StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO nodes (id, name, wire_addr, http_addr, cores, capacity_viewers, \
             alive, viewers, registered_at_ms, last_seen_ms, chunk_key_id, chunk_key) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $8, $9, $10) RETURNING ",
            node_cols!()
        );
        on_pool!(self, pool => {
            let row = sqlx::query(SQL)
                .bind(&new.id)
                .bind(&new.name)
                .bind(&new.wire_addr)
                .bind(&new.http_addr)
                .bind(to_i32(new.cores))
                .bind(to_i32(new.capacity_viewers))
                .bind(true)
                .bind(now_ms)
                .bind(new.chunk_key.as_ref().map(|k| i64::from(k.key_id)))
                .bind(new.chunk_key.as_ref().map(|k| k.ed25519.clone()))
                .fetch_one(pool)
                .await
                .map_err(|e| unique_violation(e, "node", &new.id))?;
            decode_node(&row)
        })
    }

    /// The node with this id (alive or dead), if any.
    pub async fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        const SQL: &str = concat!("SELECT ", node_cols!(), " FROM nodes WHERE id = $1");
        on_pool!(self, pool => {
            match sqlx::query(SQL).bind(id).fetch_optional(pool).await? {
                Some(row) => Ok(Some(decode_node(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// Heartbeat: updates `last_seen_ms` and the viewer count of an alive node.
    /// Returns false when the node is unknown or dead (it must re-register).
    pub async fn touch_node(
        &self,
        id: &str,
        viewers: u32,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE nodes SET last_seen_ms = $2, viewers = $3 \
             WHERE id = $1 AND alive = $4";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL)
                .bind(id)
                .bind(now_ms)
                .bind(to_i32(viewers))
                .bind(true)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Declares a node dead. Returns true when it was alive (this call changed it).
    pub async fn mark_node_dead(&self, id: &str) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE nodes SET alive = $2, viewers = 0 WHERE id = $1 AND alive = $3";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL)
                .bind(id)
                .bind(false)
                .bind(true)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// All alive nodes, oldest registration first.
    pub async fn list_alive_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            node_cols!(),
            " FROM nodes WHERE alive = $1 ORDER BY registered_at_ms, id"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(SQL).bind(true).fetch_all(pool).await?;
            rows.iter().map(decode_node).collect()
        })
    }
}
