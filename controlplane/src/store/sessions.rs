//! Viewer sessions: the record of the audience (join, heartbeats, leave).

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{Store, StoreError, get, unique_violation};

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

/// Rows per multi-row `INSERT` on SQLite: 5 bound parameters each, under SQLite's
/// historical limit of 999 parameters per statement.
pub const SQLITE_ROWS_PER_INSERT: usize = 199;

macro_rules! session_cols {
    () => {
        "id, broadcast_id, client_version, node_id, joined_at_ms, last_seen_ms, left_at_ms"
    };
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

impl Store {
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

    /// Inserts many active sessions (each with its join time) in ONE transaction: one
    /// `INSERT ... SELECT FROM UNNEST` on Postgres, multi-row `VALUES` statements of at
    /// most [`SQLITE_ROWS_PER_INSERT`] rows on SQLite (its bound-parameter limit). All or
    /// nothing: any failing row (a duplicate id, an unknown broadcast) fails the batch.
    pub async fn create_sessions(&self, rows: &[(NewSession, i64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        match self {
            Store::Postgres(pool) => {
                const SQL: &str = "INSERT INTO sessions (id, broadcast_id, client_version, \
                     node_id, joined_at_ms, last_seen_ms, left_at_ms) \
                     SELECT v.id, v.b, v.cv, v.n, v.t, v.t, NULL \
                     FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[]) \
                     AS v(id, b, cv, n, t)";
                let ids: Vec<&str> = rows.iter().map(|(s, _)| s.id.as_str()).collect();
                let bs: Vec<&str> = rows.iter().map(|(s, _)| s.broadcast_id.as_str()).collect();
                let cvs: Vec<&str> = rows
                    .iter()
                    .map(|(s, _)| s.client_version.as_str())
                    .collect();
                let ns: Vec<Option<&str>> =
                    rows.iter().map(|(s, _)| s.node_id.as_deref()).collect();
                let ts: Vec<i64> = rows.iter().map(|&(_, t)| t).collect();
                sqlx::query(SQL)
                    .bind(ids)
                    .bind(bs)
                    .bind(cvs)
                    .bind(ns)
                    .bind(ts)
                    .execute(pool)
                    .await
                    .map_err(|e| unique_violation(e, "session", "in this batch"))?;
                Ok(())
            }
            Store::Sqlite(pool) => {
                let mut tx = pool.begin().await?;
                for chunk in rows.chunks(SQLITE_ROWS_PER_INSERT) {
                    let mut sql = String::from(
                        "INSERT INTO sessions (id, broadcast_id, client_version, node_id, \
                         joined_at_ms, last_seen_ms, left_at_ms) VALUES ",
                    );
                    for i in 0..chunk.len() {
                        let b = i * 5;
                        if i > 0 {
                            sql.push_str(", ");
                        }
                        sql.push_str(&format!(
                            "(${}, ${}, ${}, ${}, ${}, ${}, NULL)",
                            b + 1,
                            b + 2,
                            b + 3,
                            b + 4,
                            b + 5,
                            b + 5
                        ));
                    }
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                    for (s, t) in chunk {
                        q = q
                            .bind(&s.id)
                            .bind(&s.broadcast_id)
                            .bind(&s.client_version)
                            .bind(s.node_id.as_deref())
                            .bind(*t);
                    }
                    q.execute(&mut *tx)
                        .await
                        .map_err(|e| unique_violation(e, "session", "in this batch"))?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
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
    pub async fn touch_sessions<S: AsRef<str>>(
        &self,
        touches: &[(S, i64)],
    ) -> Result<u64, StoreError> {
        if touches.is_empty() {
            return Ok(0);
        }
        match self {
            Store::Postgres(pool) => {
                const SQL: &str = "UPDATE sessions AS s SET last_seen_ms = v.t \
                     FROM UNNEST($1::text[], $2::bigint[]) AS v(id, t) \
                     WHERE s.id = v.id AND s.left_at_ms IS NULL AND s.last_seen_ms < v.t";
                let ids: Vec<&str> = touches.iter().map(|(id, _)| id.as_ref()).collect();
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
                        .bind(id.as_ref())
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
}
