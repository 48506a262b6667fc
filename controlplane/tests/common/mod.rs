//! Test databases: a SQLite file in a temp dir, or a fresh uniquely named Postgres
//! database on the server of `DATABASE_URL` (dropped at the end, also on panic).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, ConnectOptions};
use starling_controlplane::{DatabaseConfig, Store};

pub struct TestDb {
    pub store: Store,
    pub config: DatabaseConfig,
    _dir: Option<tempfile::TempDir>,
    pg_drop: Option<(String, String)>,
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let config = DatabaseConfig::Sqlite {
        path: dir.path().join("nested").join("starling.db"),
    };
    let store = Store::connect(&config).await.unwrap();
    TestDb {
        store,
        config,
        _dir: Some(dir),
        pg_drop: None,
    }
}

/// `None` (after a loud skip message) when `DATABASE_URL` is unset, unless
/// `STARLING_REQUIRE_POSTGRES=1`, in which case the test fails.
pub async fn postgres(test: &str) -> Option<TestDb> {
    let url = match std::env::var("DATABASE_URL") {
        Ok(u) if !u.trim().is_empty() => u,
        _ => {
            if std::env::var("STARLING_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!(
                    "STARLING_REQUIRE_POSTGRES=1 but DATABASE_URL is not set: cannot run the \
                     Postgres half of {test}"
                );
            }
            // Written to the real stderr (not through `eprintln!`, which the test
            // harness captures) so the skip is visible in a normal `cargo test` run.
            static ONCE: std::sync::Once = std::sync::Once::new();
            ONCE.call_once(|| {
                use std::io::Write as _;
                let _ = writeln!(
                    std::io::stderr(),
                    "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
                     !!! SKIPPING the Postgres half of these tests: DATABASE_URL is not set.\n\
                     !!! Run `eval \"$(scripts/pg-throwaway.sh start)\"` first, and set\n\
                     !!! STARLING_REQUIRE_POSTGRES=1 in CI so this skip becomes a failure.\n\
                     !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
                );
            });
            return None;
        }
    };
    let name = format!(
        "starling_test_{}_{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let admin = PgConnectOptions::from_str(&url).unwrap();
    let mut conn = admin.connect().await.unwrap();
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&mut conn)
        .await
        .unwrap();
    drop(conn);
    let db_url = {
        let mut u = url::Url::parse(&url).unwrap();
        u.set_path(&format!("/{name}"));
        u.to_string()
    };
    let config = DatabaseConfig::Postgres { url: db_url };
    let store = Store::connect(&config).await.unwrap();
    Some(TestDb {
        store,
        config,
        _dir: None,
        pg_drop: Some((url, name)),
    })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((url, name)) = self.pg_drop.take() else {
            return;
        };
        // Drop runs inside a tokio runtime (possibly while unwinding): do the async
        // cleanup on a separate thread with its own runtime.
        let result = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut conn = PgConnectOptions::from_str(&url)?.connect().await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: could not drop test database: {e}"),
            Err(_) => eprintln!("warning: test database cleanup thread panicked"),
        }
    }
}

/// Generates one `#[tokio::test]` per backend for each listed `async fn(Store)`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let db = $crate::common::sqlite().await;
                    super::$name(db.store.clone()).await;
                    db.store.close().await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = $crate::common::postgres(stringify!($name)).await else {
                        return;
                    };
                    super::$name(db.store.clone()).await;
                    db.store.close().await;
                }
            )*
        }
    };
}
