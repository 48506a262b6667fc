//! Persistent state of the control plane: one interface ([`Store`]) over two backends,
//! PostgreSQL (production, shared by replicas) and embedded SQLite (zero-setup default).
//!
//! Every query is written once, with `$N` placeholders that both drivers understand,
//! and executed on whichever pool the store holds. Times are unix milliseconds passed
//! in by the caller (never read from a clock here), so behaviour is deterministic under
//! test. Enums are stored as their proto integer values.

//!
//! One submodule per table family, each adding its part of `impl Store`: `broadcasts`,
//! `nodes`, `node_credentials`, `sessions`, `token_keys`.

use std::path::PathBuf;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ColumnIndex, Decode, Row, Type};

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

mod broadcasts;
mod node_credentials;
mod nodes;
mod sessions;
mod token_keys;

pub use broadcasts::{BroadcastRecord, IngestReport, NewBroadcast};
pub use node_credentials::NodeCredentialRecord;
pub use nodes::{NewNode, NodeKey, NodeRecord};
pub use sessions::{NewSession, SessionRecord};
pub use token_keys::TokenKeyRecord;

pub(super) fn to_i32(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn to_u32(v: i32, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

pub(super) fn get<'r, R, T>(row: &'r R, col: &'static str) -> Result<T, StoreError>
where
    R: Row,
    &'static str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    Ok(row.try_get(col)?)
}

pub(super) fn unique_violation(err: sqlx::Error, what: &'static str, id: &str) -> StoreError {
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
                    // One writer at a time whatever the number (SQLite), and WAL
                    // readers are quick: 4 connections join as fast as 8 (control-bench)
                    // and hold less memory (each has its own page cache and thread).
                    .max_connections(4)
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
}
