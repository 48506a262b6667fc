//! Broadcasts: their rows, lifecycle state, node assignment and ingest health.

use sqlx::{ColumnIndex, Decode, Row, Type};
use starling_proto::v1::{BroadcastState, SourceHealth};

use super::{Store, StoreError, get, to_i32, to_i64, to_u32, unique_violation};

/// A broadcast as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BroadcastRecord {
    /// Short url-safe id.
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// http:// source URL.
    pub source_url: String,
    /// Target chunk duration.
    pub chunk_duration_ms: u32,
    /// Number of substreams.
    pub substreams: u32,
    /// Lifecycle state.
    pub state: BroadcastState,
    /// Last reported source health.
    pub source_health: SourceHealth,
    /// Last reported source error (empty when healthy).
    pub source_error: String,
    /// Data-plane node assigned to ingest it (LIVE only).
    pub node_id: Option<String>,
    /// Highest chunk sequence reported.
    pub last_seq: u64,
    /// MIME type reported by the ingesting node.
    pub content_type: String,
    /// Viewers reported by the ingesting node.
    pub viewers_now: u32,
    /// Creation time, unix ms.
    pub created_at_ms: i64,
    /// Last update time, unix ms.
    pub updated_at_ms: i64,
    /// Viewers may join without a credential.
    pub public: bool,
    /// The current run: how many times the broadcast entered LIVE (0 = never).
    pub run_epoch: u64,
}

/// Input of [`Store::create_broadcast`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBroadcast {
    /// Id (already generated).
    pub id: String,
    /// Name.
    pub name: String,
    /// Source URL.
    pub source_url: String,
    /// Chunk duration.
    pub chunk_duration_ms: u32,
    /// Substreams.
    pub substreams: u32,
    /// Viewers may join without a credential.
    pub public: bool,
}

/// One broadcast's health as reported by its ingesting node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestReport {
    /// Broadcast id.
    pub broadcast_id: String,
    /// Source health.
    pub health: SourceHealth,
    /// Error text, empty when healthy.
    pub error: String,
    /// Highest chunk sequence cut.
    pub last_seq: u64,
    /// MIME type of the stream.
    pub content_type: String,
    /// Viewers on this node for this broadcast.
    pub viewers: u32,
}

macro_rules! broadcast_cols {
    () => {
        "id, name, source_url, chunk_duration_ms, substreams, state, source_health, \
         source_error, node_id, last_seq, content_type, viewers_now, created_at_ms, \
         updated_at_ms, public, run_epoch"
    };
}

fn decode_broadcast<'r, R>(row: &'r R) -> Result<BroadcastRecord, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    bool: Decode<'r, R::Database> + Type<R::Database>,
    i32: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
{
    let state: i32 = get(row, "state")?;
    let health: i32 = get(row, "source_health")?;
    let last_seq: i64 = get(row, "last_seq")?;
    Ok(BroadcastRecord {
        id: get(row, "id")?,
        name: get(row, "name")?,
        source_url: get(row, "source_url")?,
        chunk_duration_ms: to_u32(get(row, "chunk_duration_ms")?, "chunk_duration_ms")?,
        substreams: to_u32(get(row, "substreams")?, "substreams")?,
        state: BroadcastState::try_from(state)
            .map_err(|_| StoreError::Corrupt(format!("unknown broadcast state {state}")))?,
        source_health: SourceHealth::try_from(health)
            .map_err(|_| StoreError::Corrupt(format!("unknown source health {health}")))?,
        source_error: get(row, "source_error")?,
        node_id: get(row, "node_id")?,
        last_seq: u64::try_from(last_seq)
            .map_err(|_| StoreError::Corrupt(format!("negative last_seq {last_seq}")))?,
        content_type: get(row, "content_type")?,
        viewers_now: to_u32(get(row, "viewers_now")?, "viewers_now")?,
        created_at_ms: get(row, "created_at_ms")?,
        updated_at_ms: get(row, "updated_at_ms")?,
        public: get(row, "public")?,
        run_epoch: {
            let r: i64 = get(row, "run_epoch")?;
            u64::try_from(r).map_err(|_| StoreError::Corrupt(format!("negative run_epoch {r}")))?
        },
    })
}

impl Store {
    /// Inserts a broadcast in state CREATED, health UNKNOWN, no node.
    pub async fn create_broadcast(
        &self,
        new: &NewBroadcast,
        now_ms: i64,
    ) -> Result<BroadcastRecord, StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO broadcasts (id, name, source_url, chunk_duration_ms, substreams, \
             state, source_health, source_error, node_id, last_seq, content_type, \
             viewers_now, created_at_ms, updated_at_ms, public) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, '', NULL, 0, '', 0, $8, $8, $9) RETURNING ",
            broadcast_cols!()
        );
        on_pool!(self, pool => {
            let row = sqlx::query(SQL)
                .bind(&new.id)
                .bind(&new.name)
                .bind(&new.source_url)
                .bind(to_i32(new.chunk_duration_ms))
                .bind(to_i32(new.substreams))
                .bind(BroadcastState::Created as i32)
                .bind(SourceHealth::Unknown as i32)
                .bind(now_ms)
                .bind(new.public)
                .fetch_one(pool)
                .await
                .map_err(|e| unique_violation(e, "broadcast", &new.id))?;
            decode_broadcast(&row)
        })
    }

    /// The broadcast with this id, if any.
    pub async fn get_broadcast(&self, id: &str) -> Result<Option<BroadcastRecord>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            broadcast_cols!(),
            " FROM broadcasts WHERE id = $1"
        );
        on_pool!(self, pool => {
            match sqlx::query(SQL).bind(id).fetch_optional(pool).await? {
                Some(row) => Ok(Some(decode_broadcast(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// All broadcasts, oldest first; stopped ones only when `include_stopped`.
    pub async fn list_broadcasts(
        &self,
        include_stopped: bool,
    ) -> Result<Vec<BroadcastRecord>, StoreError> {
        const ALL: &str = concat!(
            "SELECT ",
            broadcast_cols!(),
            " FROM broadcasts ORDER BY created_at_ms, id"
        );
        const NOT_STOPPED: &str = concat!(
            "SELECT ",
            broadcast_cols!(),
            " FROM broadcasts WHERE state <> $1 ORDER BY created_at_ms, id"
        );
        on_pool!(self, pool => {
            let rows = if include_stopped {
                sqlx::query(ALL).fetch_all(pool).await?
            } else {
                sqlx::query(NOT_STOPPED)
                    .bind(BroadcastState::Stopped as i32)
                    .fetch_all(pool)
                    .await?
            };
            rows.iter().map(decode_broadcast).collect()
        })
    }

    /// Broadcasts in the given state, oldest first.
    pub async fn list_broadcasts_in_state(
        &self,
        state: BroadcastState,
    ) -> Result<Vec<BroadcastRecord>, StoreError> {
        const SQL: &str = concat!(
            "SELECT ",
            broadcast_cols!(),
            " FROM broadcasts WHERE state = $1 ORDER BY created_at_ms, id"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(SQL).bind(state as i32).fetch_all(pool).await?;
            rows.iter().map(decode_broadcast).collect()
        })
    }

    /// Sets the lifecycle state. Entering LIVE from another state starts a new run
    /// (`run_epoch` + 1). Leaving LIVE (to CREATED or STOPPED) also clears the
    /// node assignment and the ingest-reported fields (health UNKNOWN, no error, no
    /// viewers). Returns the updated broadcast, `None` when the id is unknown.
    pub async fn set_broadcast_state(
        &self,
        id: &str,
        state: BroadcastState,
        now_ms: i64,
    ) -> Result<Option<BroadcastRecord>, StoreError> {
        const LIVE: &str = concat!(
            "UPDATE broadcasts SET state = $2, updated_at_ms = $3, run_epoch = CASE WHEN \
             state = $2 THEN run_epoch ELSE run_epoch + 1 END WHERE id = $1 RETURNING ",
            broadcast_cols!()
        );
        const NOT_LIVE: &str = concat!(
            "UPDATE broadcasts SET state = $2, updated_at_ms = $3, node_id = NULL, \
             source_health = $4, source_error = '', viewers_now = 0 WHERE id = $1 RETURNING ",
            broadcast_cols!()
        );
        on_pool!(self, pool => {
            let row = if state == BroadcastState::Live {
                sqlx::query(LIVE)
                    .bind(id)
                    .bind(state as i32)
                    .bind(now_ms)
                    .fetch_optional(pool)
                    .await?
            } else {
                sqlx::query(NOT_LIVE)
                    .bind(id)
                    .bind(state as i32)
                    .bind(now_ms)
                    .bind(SourceHealth::Unknown as i32)
                    .fetch_optional(pool)
                    .await?
            };
            match row {
                Some(row) => Ok(Some(decode_broadcast(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// Assigns (or, with `None`, unassigns) the ingesting node. The ingest-reported
    /// fields are reset (health UNKNOWN, no error, no viewers) since the new node has
    /// not reported yet. Returns the updated broadcast, `None` when the id is unknown.
    pub async fn set_broadcast_node(
        &self,
        id: &str,
        node_id: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<BroadcastRecord>, StoreError> {
        const SQL: &str = concat!(
            "UPDATE broadcasts SET node_id = $2, updated_at_ms = $3, source_health = $4, \
             source_error = '', viewers_now = 0 WHERE id = $1 RETURNING ",
            broadcast_cols!()
        );
        on_pool!(self, pool => {
            let row = sqlx::query(SQL)
                .bind(id)
                .bind(node_id)
                .bind(now_ms)
                .bind(SourceHealth::Unknown as i32)
                .fetch_optional(pool)
                .await?;
            match row {
                Some(row) => Ok(Some(decode_broadcast(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// Records what `node_id` reports about one of its ingests. Only applied when the
    /// broadcast is LIVE and assigned to that node, so a stale node cannot overwrite
    /// the state reported by the current one. Returns whether it was applied.
    pub async fn record_ingest_health(
        &self,
        node_id: &str,
        report: &IngestReport,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        const SQL: &str = "UPDATE broadcasts SET source_health = $3, source_error = $4, \
             last_seq = $5, content_type = $6, viewers_now = $7, updated_at_ms = $8 \
             WHERE id = $1 AND node_id = $2 AND state = $9";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL)
                .bind(&report.broadcast_id)
                .bind(node_id)
                .bind(report.health as i32)
                .bind(&report.error)
                .bind(to_i64(report.last_seq))
                .bind(&report.content_type)
                .bind(to_i32(report.viewers))
                .bind(now_ms)
                .bind(BroadcastState::Live as i32)
                .execute(pool)
                .await?;
            Ok(done.rows_affected() > 0)
        })
    }
}
