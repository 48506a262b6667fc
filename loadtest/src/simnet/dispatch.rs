//! The dispatcher of the fabric's viewers' control traffic: reads the fabric's [`Up`]
//! messages, opens the shared HTTP/2 connections ([`ControlConfig::sessions_per_channel`]
//! sessions per `tonic` channel, with the SDK's keep-alive) and starts one task per
//! session ([`super::session`]), fed by a small bounded queue; a viewer's `Subscribe`
//! and `ServerRequest` go to its data-plane connection. What the sessions share is in
//! [`super::control`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::control::{Cmd, ControlConfig, ControlCounters, Ctx};
use super::dataplane::DpCmd;
use super::msg::{Input, Up};
use super::session::session;

/// Per-session command queue.
const SESSION_QUEUE: usize = 16;
/// Per-viewer data-plane command queue.
const DP_QUEUE: usize = 64;
/// HTTP/2 keep-alive PING interval and timeout (the SDK's defaults: a dead control
/// plane or path fails the session streams, which are reopened).
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A session's queues, as the dispatcher holds them.
struct Queues {
    cmd: mpsc::Sender<Cmd>,
    dp: Option<mpsc::Sender<DpCmd>>,
}

/// Starts the dispatcher: reads the fabric's `up` until it closes. `Subscribe` and
/// `ServerRequest` go to the viewer's data-plane connection
/// ([`ControlConfig::data_plane`]).
pub fn spawn(
    cfg: ControlConfig,
    mut up: mpsc::Receiver<Up>,
    fabric: mpsc::Sender<Input>,
) -> (Arc<ControlCounters>, JoinHandle<()>) {
    let counters = Arc::new(ControlCounters::default());
    let ctx = Arc::new(Ctx {
        cfg,
        fabric,
        counters: counters.clone(),
    });
    let task = tokio::spawn(async move {
        let mut channels: Vec<Channel> = Vec::new();
        let mut sessions: BTreeMap<usize, Queues> = BTreeMap::new();
        let mut tasks = Vec::new();
        while let Some(m) = up.recv().await {
            let (index, cmd) = match m {
                Up::Join { index, upload_kbps } => {
                    let Some(ch) = channel_for(&ctx, &mut channels, index) else {
                        let _ = ctx
                            .fabric
                            .send(Input::Failed {
                                index,
                                error: "bad control-plane URL".into(),
                            })
                            .await;
                        continue;
                    };
                    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
                    let dp = ctx.cfg.data_plane.as_ref().map(|_| mpsc::channel(DP_QUEUE));
                    let dp_tx = dp.as_ref().map(|(t, _)| t.clone());
                    sessions.insert(index, Queues { cmd: tx, dp: dp_tx });
                    tasks.push(tokio::spawn(session(
                        ctx.clone(),
                        ch,
                        index,
                        upload_kbps,
                        rx,
                        dp,
                    )));
                    continue;
                }
                Up::ReSearch {
                    index,
                    substream,
                    exclude,
                } => (index, Cmd::ReSearch { substream, exclude }),
                Up::Report { index, parent } => (index, Cmd::Report { parent }),
                Up::Leave { index } => (index, Cmd::Leave),
                Up::Subscribe {
                    index,
                    mask,
                    resume,
                } => {
                    if let Some(dp) = sessions.get(&index).and_then(|q| q.dp.as_ref()) {
                        let _ = dp.send(DpCmd::Subscribe(mask, resume)).await;
                    }
                    continue;
                }
                Up::ServerRequest { index, seq } => {
                    if let Some(dp) = sessions.get(&index).and_then(|q| q.dp.as_ref()) {
                        let _ = dp.try_send(DpCmd::Request(seq));
                    }
                    continue;
                }
            };
            let leave = matches!(cmd, Cmd::Leave);
            if let Some(tx) = sessions.get(&index).map(|q| &q.cmd) {
                // Leaves wait for room; re-searches and reports are dropped when the
                // session is not keeping up (the node asks again).
                if leave {
                    let _ = tx.send(cmd).await;
                } else {
                    let _ = tx.try_send(cmd);
                }
            }
            if leave {
                sessions.remove(&index);
            }
        }
        drop(sessions);
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    });
    (counters, task)
}

fn channel_for(ctx: &Ctx, channels: &mut Vec<Channel>, index: usize) -> Option<Channel> {
    let c = index / ctx.cfg.sessions_per_channel.max(1);
    while channels.len() <= c {
        let ep = starling_proto::transport::endpoint(&ctx.cfg.control_url, &ctx.cfg.transport)
            .map_err(|e| tracing::error!(error = %e, "control channel"))
            .ok()?;
        let ep = ep
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        channels.push(ep.connect_lazy());
        ctx.counters.connections.fetch_add(1, Ordering::Relaxed);
    }
    channels.get(c).cloned()
}
