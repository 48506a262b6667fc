//! Group commit of session rows: joins hand their [`NewSession`] to one writer task
//! through a bounded queue; the writer inserts whatever is queued (up to
//! [`crate::service::ServiceConfig::session_batch_max`] rows) in ONE statement and
//! transaction ([`Store::create_sessions`]) and answers each join through a oneshot once
//! its row is committed. Adaptive: no wait when idle (a lone join is written at once),
//! bigger batches exactly when joins arrive faster than one commit.
//!
//! A batch that fails is retried row by row, so one bad row (a duplicate id) fails only
//! its own join; a database that is down fails them all. The join then undoes its grid
//! admission (`service::join`). Shutdown: graceful shutdown waits for in-flight joins,
//! and each waits for its row, so the queue drains before the pool closes; the task
//! ends when the last sender (the [`Core`](super::Core)) is dropped.

use std::sync::OnceLock;

use tokio::sync::{mpsc, oneshot};

use crate::store::{NewSession, Store, StoreError};

/// Default most rows per batch.
pub const DEFAULT_SESSION_BATCH_MAX: usize = 512;

#[derive(Debug)]
struct Pending {
    row: (NewSession, i64),
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// Errors of [`SessionWriter::write`].
#[derive(Debug, thiserror::Error)]
pub(super) enum WriteError {
    /// The database refused the row (or is unreachable).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The writer task is gone (the process is shutting down).
    #[error("the session writer has stopped")]
    Stopped,
}

/// The queue to the session-row writer (its task is started by the first write, inside
/// the runtime that serves the joins).
#[derive(Debug)]
pub(super) struct SessionWriter {
    store: Store,
    max_batch: usize,
    queue: usize,
    tx: OnceLock<mpsc::Sender<Pending>>,
}

impl SessionWriter {
    /// `max_batch` rows per transaction (at least 1); at most `queue` rows waiting.
    pub(super) fn new(store: Store, max_batch: usize, queue: usize) -> SessionWriter {
        SessionWriter {
            store,
            max_batch: max_batch.max(1),
            queue: queue.max(1),
            tx: OnceLock::new(),
        }
    }

    fn sender(&self) -> &mpsc::Sender<Pending> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::channel(self.queue);
            tokio::spawn(run(self.store.clone(), rx, self.max_batch));
            tx
        })
    }

    /// Queues the session row (joined at `now_ms`) for the next batch; the receiver
    /// answers once it is committed. Waits only when the queue is full.
    pub(super) async fn enqueue(
        &self,
        row: NewSession,
        now_ms: i64,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, WriteError> {
        let (done, answer) = oneshot::channel();
        let pending = Pending {
            row: (row, now_ms),
            done,
        };
        let tx = self.sender();
        match tx.try_send(pending) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(p)) => {
                tx.send(p).await.map_err(|_| WriteError::Stopped)?;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(WriteError::Stopped),
        }
        Ok(answer)
    }
}

/// The answer of a row queued by [`SessionWriter::enqueue`].
pub(super) async fn committed(
    answer: oneshot::Receiver<Result<(), StoreError>>,
) -> Result<(), WriteError> {
    answer
        .await
        .map_err(|_| WriteError::Stopped)?
        .map_err(Into::into)
}

async fn run(store: Store, mut rx: mpsc::Receiver<Pending>, max_batch: usize) {
    let mut batch: Vec<Pending> = Vec::with_capacity(max_batch);
    while rx.recv_many(&mut batch, max_batch).await > 0 {
        let (rows, dones): (Vec<_>, Vec<_>) = batch.drain(..).map(|p| (p.row, p.done)).unzip();
        match store.create_sessions(&rows).await {
            Ok(()) => {
                for done in dones {
                    // A join whose caller went away: its row stays (an audience record
                    // of a viewer that never learnt its id, ended by session expiry).
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) if rows.len() == 1 => {
                tracing::warn!(error = %e, "session row write failed");
                if let Some(done) = dones.into_iter().next() {
                    let _ = done.send(Err(e));
                }
            }
            Err(e) => {
                tracing::warn!(rows = rows.len(), error = %e, "session batch failed; retrying its rows one by one");
                for (row, done) in rows.into_iter().zip(dones) {
                    let one = store.create_sessions(std::slice::from_ref(&row)).await;
                    let _ = done.send(one);
                }
            }
        }
    }
}
