//! Persistent state of the control plane: one interface ([`Store`]) over two backends,
//! PostgreSQL (production, shared by replicas) and embedded SQLite (zero-setup default).
//!
//! Every query is written once, with `$N` placeholders that both drivers understand,
//! and executed on whichever pool the store holds. Times are unix milliseconds passed
//! in by the caller (never read from a clock here), so behaviour is deterministic under
//! test. Enums are stored as their proto integer values.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ColumnIndex, Decode, Row, Type};
use starling_proto::v1::{BroadcastState, SourceHealth};

/// Which database to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseConfig {
    /// A PostgreSQL server, e.g. `postgres://user@host:5432/starling`.
    Postgres {
        /// Connection URL.
        url: String,
    },
    /// An embedded SQLite database file, created (with its directory) if missing.
    Sqlite {
        /// Path of the database file.
        path: PathBuf,
    },
}

impl DatabaseConfig {
    /// Postgres when `url` is set (and not empty), otherwise SQLite at
    /// `data_dir/starling.db`.
    pub fn from_url_or_data_dir(url: Option<&str>, data_dir: &std::path::Path) -> Self {
        match url.map(str::trim).filter(|u| !u.is_empty()) {
            Some(url) => DatabaseConfig::Postgres {
                url: url.to_string(),
            },
            None => DatabaseConfig::Sqlite {
                path: data_dir.join("starling.db"),
            },
        }
    }

    /// Human-readable description without credentials, for logs.
    pub fn describe(&self) -> String {
        match self {
            DatabaseConfig::Postgres { url } => match url::Url::parse(url) {
                Ok(u) => format!(
                    "postgres ({}:{}{})",
                    u.host_str().unwrap_or("?"),
                    u.port().unwrap_or(5432),
                    u.path()
                ),
                Err(_) => "postgres".to_string(),
            },
            DatabaseConfig::Sqlite { path } => format!("sqlite ({})", path.display()),
        }
    }
}

/// Errors from the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database driver failed (connection, query, constraint...).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// Running the schema migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// Creating the SQLite data directory failed.
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A row with this primary key already exists.
    #[error("{what} {id} already exists")]
    AlreadyExists {
        /// Kind of row.
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A stored value is out of range (e.g. an unknown enum value).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

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

/// A viewer session as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Session id.
    pub id: String,
    /// Broadcast joined.
    pub broadcast_id: String,
    /// Client identification.
    pub client_version: String,
    /// Data-plane node handed out at join.
    pub node_id: Option<String>,
    /// Join time, unix ms.
    pub joined_at_ms: i64,
    /// Last heartbeat, unix ms.
    pub last_seen_ms: i64,
    /// Leave time (or end of broadcast), unix ms; `None` while active.
    pub left_at_ms: Option<i64>,
}

/// Input of [`Store::create_session`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSession {
    /// Session id (already generated).
    pub id: String,
    /// Broadcast id (must exist).
    pub broadcast_id: String,
    /// Client identification.
    pub client_version: String,
    /// Node handed out.
    pub node_id: Option<String>,
}

/// The control plane's database: Postgres or SQLite behind one interface.
#[derive(Debug, Clone)]
pub enum Store {
    /// PostgreSQL pool.
    Postgres(PgPool),
    /// SQLite pool (WAL mode).
    Sqlite(SqlitePool),
}

/// Runs `$body` with `$pool` bound to whichever pool the store holds; the body is
/// expanded once per backend, so the same query text and binds serve both.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

macro_rules! broadcast_cols {
    () => {
        "id, name, source_url, chunk_duration_ms, substreams, state, source_health, \
         source_error, node_id, last_seq, content_type, viewers_now, created_at_ms, \
         updated_at_ms, public"
    };
}

macro_rules! node_cols {
    () => {
        "id, name, wire_addr, http_addr, cores, capacity_viewers, alive, viewers, \
         registered_at_ms, last_seen_ms, chunk_key_id, chunk_key"
    };
}

macro_rules! session_cols {
    () => {
        "id, broadcast_id, client_version, node_id, joined_at_ms, last_seen_ms, left_at_ms"
    };
}

fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u32(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

fn get<'r, R, T>(row: &'r R, col: &'static str) -> Result<T, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(row.try_get(col)?)
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
    })
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

fn decode_session<'r, R>(row: &'r R) -> Result<SessionRecord, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    String: Decode<'r, R::Database> + Type<R::Database>,
    Option<String>: Decode<'r, R::Database> + Type<R::Database>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(SessionRecord {
        id: get(row, "id")?,
        broadcast_id: get(row, "broadcast_id")?,
        client_version: get(row, "client_version")?,
        node_id: get(row, "node_id")?,
        joined_at_ms: get(row, "joined_at_ms")?,
        last_seen_ms: get(row, "last_seen_ms")?,
        left_at_ms: get(row, "left_at_ms")?,
    })
}

fn unique_violation(err: sqlx::Error, what: &'static str, id: &str) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists {
            what,
            id: id.to_string(),
        },
        _ => StoreError::Database(err),
    }
}

impl Store {
    /// Connects to the configured database (creating the SQLite file and its directory
    /// if missing, in WAL mode) and runs the schema migrations.
    pub async fn connect(config: &DatabaseConfig) -> Result<Store, StoreError> {
        let store = match config {
            DatabaseConfig::Postgres { url } => {
                let pool = PgPoolOptions::new()
                    .max_connections(32)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                Store::Postgres(pool)
            }
            DatabaseConfig::Sqlite { path } => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
                        path: dir.to_path_buf(),
                        source,
                    })?;
                }
                let options = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // WAL + NORMAL: no fsync per commit (only at checkpoints). A commit
                    // can be lost to a power cut, never to a crash of the process, and
                    // the file never corrupts; FULL made every join and report batch
                    // wait for the disk while holding the single writer lock.
                    .synchronous(SqliteSynchronous::Normal)
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(10));
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .connect_with(options)
                    .await?;
                Store::Sqlite(pool)
            }
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Runs the embedded migrations for this backend (idempotent).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            Store::Postgres(pool) => starling_migrations::postgres().run(pool).await?,
            Store::Sqlite(pool) => starling_migrations::sqlite().run(pool).await?,
        }
        Ok(())
    }

    /// "postgres" or "sqlite".
    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Postgres(_) => "postgres",
            Store::Sqlite(_) => "sqlite",
        }
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    // ------------------------------------------------------------------ broadcasts

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

    /// Sets the lifecycle state. Leaving LIVE (to CREATED or STOPPED) also clears the
    /// node assignment and the ingest-reported fields (health UNKNOWN, no error, no
    /// viewers). Returns the updated broadcast, `None` when the id is unknown.
    pub async fn set_broadcast_state(
        &self,
        id: &str,
        state: BroadcastState,
        now_ms: i64,
    ) -> Result<Option<BroadcastRecord>, StoreError> {
        const LIVE: &str = concat!(
            "UPDATE broadcasts SET state = $2, updated_at_ms = $3 WHERE id = $1 RETURNING ",
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

    // ------------------------------------------------------------------ nodes

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

    // ------------------------------------------------------------------ sessions

    /// Inserts an active session. The broadcast must exist.
    pub async fn create_session(
        &self,
        new: &NewSession,
        now_ms: i64,
    ) -> Result<SessionRecord, StoreError> {
        const SQL: &str = concat!(
            "INSERT INTO sessions (id, broadcast_id, client_version, node_id, joined_at_ms, \
             last_seen_ms, left_at_ms) VALUES ($1, $2, $3, $4, $5, $5, NULL) RETURNING ",
            session_cols!()
        );
        on_pool!(self, pool => {
            let row = sqlx::query(SQL)
                .bind(&new.id)
                .bind(&new.broadcast_id)
                .bind(&new.client_version)
                .bind(new.node_id.as_deref())
                .bind(now_ms)
                .fetch_one(pool)
                .await
                .map_err(|e| unique_violation(e, "session", &new.id))?;
            decode_session(&row)
        })
    }

    /// The session with this id (active or ended), if any.
    pub async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        const SQL: &str = concat!("SELECT ", session_cols!(), " FROM sessions WHERE id = $1");
        on_pool!(self, pool => {
            match sqlx::query(SQL).bind(id).fetch_optional(pool).await? {
                Some(row) => Ok(Some(decode_session(&row)?)),
                None => Ok(None),
            }
        })
    }

    /// Heartbeat of an active session. Returns false when unknown or ended.
    pub async fn touch_session(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        const SQL: &str =
            "UPDATE sessions SET last_seen_ms = $2 WHERE id = $1 AND left_at_ms IS NULL";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL).bind(id).bind(now_ms).execute(pool).await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Records many heartbeats at once (session id, time), in one statement on Postgres
    /// and one transaction on SQLite; ended and unknown sessions are skipped and a time
    /// never moves backwards. Returns how many sessions were updated.
    pub async fn touch_sessions(&self, touches: &[(String, i64)]) -> Result<u64, StoreError> {
        if touches.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(pool) => {
                const SQL: &str = "UPDATE sessions AS s SET last_seen_ms = v.t \
                     FROM UNNEST($1::text[], $2::bigint[]) AS v(id, t) \
                     WHERE s.id = v.id AND s.left_at_ms IS NULL AND s.last_seen_ms < v.t";
                let ids: Vec<&str> = touches.iter().map(|(id, _)| id.as_str()).collect();
                let times: Vec<i64> = touches.iter().map(|&(_, t)| t).collect();
                let done = sqlx::query(SQL).bind(ids).bind(times).execute(pool).await?;
                Ok(done.rows_affected())
            }
            Store::Sqlite(pool) => {
                const SQL: &str = "UPDATE sessions SET last_seen_ms = $2 \
                     WHERE id = $1 AND left_at_ms IS NULL AND last_seen_ms < $2";
                let mut tx = pool.begin().await?;
                let mut n = 0;
                for (id, t) in touches {
                    n += sqlx::query(SQL)
                        .bind(id)
                        .bind(*t)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(n)
            }
        }
    }

    /// Ends an active session. Returns false when unknown or already ended.
    pub async fn end_session(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        const SQL: &str =
            "UPDATE sessions SET left_at_ms = $2 WHERE id = $1 AND left_at_ms IS NULL";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL).bind(id).bind(now_ms).execute(pool).await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Ends every active session of a broadcast; returns how many.
    pub async fn end_broadcast_sessions(
        &self,
        broadcast_id: &str,
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        const SQL: &str = "UPDATE sessions SET left_at_ms = $2 \
             WHERE broadcast_id = $1 AND left_at_ms IS NULL";
        on_pool!(self, pool => {
            let done = sqlx::query(SQL)
                .bind(broadcast_id)
                .bind(now_ms)
                .execute(pool)
                .await?;
            Ok(done.rows_affected())
        })
    }

    /// Number of active sessions of a broadcast.
    pub async fn count_active_sessions(&self, broadcast_id: &str) -> Result<u64, StoreError> {
        const SQL: &str =
            "SELECT COUNT(*) AS n FROM sessions WHERE broadcast_id = $1 AND left_at_ms IS NULL";
        on_pool!(self, pool => {
            let row = sqlx::query(SQL).bind(broadcast_id).fetch_one(pool).await?;
            let n: i64 = get(&row, "n")?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }

    // ------------------------------------------------------------------ token keys

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
