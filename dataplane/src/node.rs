//! Starting a node: glommio executors (one per core) with the wire and HTTP listeners
//! bound with SO_REUSEPORT on each, plus one tokio thread for the control-plane link
//! and the ingest clients.

use crate::auth::Auth;
use crate::config::Config;
use crate::control::{self, NodeInfo};
use crate::error::Error;
use crate::ingest::{IngestManager, IngestSpec};
use crate::ring::{Broadcast, BroadcastStatus, Registry, StreamParams};
use crate::serve::{self, ServeCtx};
use futures_lite::StreamExt;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use starling_proto::integrity::ChunkSigner;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

enum Cmd {
    Start(IngestSpec),
    Stop(String),
}

/// A running data-plane node (in-process handle).
pub struct Node {
    wire_addr: SocketAddr,
    http_addr: SocketAddr,
    registry: Arc<Registry>,
    chunk_key_id: u32,
    chunk_public_key: [u8; 32],
    shutdown: watch::Sender<bool>,
    cmds: mpsc::UnboundedSender<Cmd>,
    threads: Vec<JoinHandle<()>>,
}

/// The chunk signer of a node: `cfg.chunk_key` or a fresh key; key id = the first 4
/// bytes (big endian) of the public key.
fn chunk_signer(cfg: &Config) -> Result<ChunkSigner, Error> {
    let der = match &cfg.chunk_key {
        Some(k) => k.0.clone(),
        None => starling_proto::integrity::generate_pkcs8()
            .map_err(|e| Error::Config(format!("chunk key: {e}")))?,
    };
    let probe = ChunkSigner::new(0, &der).map_err(|e| Error::Config(format!("chunk key: {e}")))?;
    let pk = probe.public_key();
    let key_id = u32::from_be_bytes([pk[0], pk[1], pk[2], pk[3]]);
    ChunkSigner::new(key_id, &der).map_err(|e| Error::Config(format!("chunk key: {e}")))
}

impl Node {
    /// Starts the node and returns once every listener is bound. Use port 0 in the
    /// listen addresses to get ephemeral ports ([`Node::wire_addr`] tells which).
    pub fn start(cfg: Config) -> Result<Node, Error> {
        if cfg.control_url.is_none() && cfg.static_broadcasts.is_empty() {
            return Err(Error::NothingToDo);
        }
        if let Some(url) = &cfg.control_url {
            // A URL whose scheme does not match the transport (http:// without the
            // plaintext opt-in) is a configuration error, not something to retry.
            starling_proto::transport::endpoint(url, &cfg.control_transport)
                .map_err(|e| Error::Config(e.to_string()))?;
        }
        if !(1..=64).contains(&cfg.static_substreams) {
            return Err(Error::Config("--static-substreams must be 1..=64".into()));
        }
        if cfg.timeouts.keepalive < std::time::Duration::from_millis(10)
            || cfg.timeouts.idle < std::time::Duration::from_millis(10)
        {
            return Err(Error::Config(
                "keep-alive and idle timeouts must be at least 10 ms".into(),
            ));
        }
        if cfg.timeouts.handshake < std::time::Duration::from_millis(10) {
            return Err(Error::Config(
                "the handshake timeout must be at least 10 ms".into(),
            ));
        }
        let l = &cfg.limits;
        if l.max_unauthenticated == 0
            || l.max_unauthenticated_per_address == 0
            || l.max_per_address == 0
        {
            return Err(Error::Config(
                "connection caps must be at least 1 (--max-unauthenticated, \
                 --max-unauthenticated-per-address, --max-conns-per-address)"
                    .into(),
            ));
        }
        if cfg.window_secs == 0 {
            return Err(Error::Config("--window-secs must be at least 1".into()));
        }
        let signer = Arc::new(chunk_signer(&cfg)?);
        let chunk_key_id = signer.key_id();
        let chunk_public_key = signer.public_key();
        {
            use base64::Engine as _;
            info!(
                key_id = chunk_key_id,
                public_key = %base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(chunk_public_key),
                "chunk signing key"
            );
        }
        let registry = Arc::new(Registry::with_auth_limits(
            Auth::new(
                cfg.token_keys
                    .iter()
                    .map(|k| (k.key_id, k.ed25519))
                    .collect(),
                u64::try_from(cfg.token_skew.as_millis()).unwrap_or(u64::MAX),
                u64::try_from(cfg.revocation_hold.as_millis()).unwrap_or(u64::MAX),
            ),
            &cfg.limits,
        ));
        // Static broadcasts exist as soon as `start` returns (viewers connecting at once
        // wait for the first chunk instead of getting UNKNOWN_BROADCAST).
        for sb in &cfg.static_broadcasts {
            let b = registry.get_or_insert(&sb.id, || {
                Broadcast::new(
                    &sb.id,
                    u64::from(cfg.window_secs) * 1000,
                    StreamParams {
                        content_type: String::new(),
                        chunk_duration_ms: cfg.static_chunk_ms,
                        substreams: cfg.static_substreams.clamp(1, 64),
                    },
                )
            });
            b.set_public(cfg.static_public);
        }
        let (shutdown, shutdown_rx) = watch::channel(false);
        let ctx = Arc::new(ServeCtx {
            registry: Arc::clone(&registry),
            timeouts: cfg.timeouts,
            capacity_viewers: cfg.capacity_viewers,
            requests: cfg.limits.requests,
            token_renewals: cfg.limits.token_renewals,
            logs: serve::LogGates::default(),
        });
        let n = cfg.executor_count().max(1);
        let mut threads = Vec::new();
        let mut addrs = (cfg.wire_listen, cfg.http_listen);
        for index in 0..n {
            let (ready_tx, ready_rx) = std_mpsc::channel();
            let ctx = Arc::clone(&ctx);
            let shutdown_rx = shutdown_rx.clone();
            let (wire, http) = addrs;
            let io_memory = cfg.io_memory_kib * 1024;
            let t = std::thread::Builder::new()
                .name(format!("starling-dp-{index}"))
                .spawn(move || {
                    executor_main(index, io_memory, wire, http, ctx, shutdown_rx, ready_tx)
                })
                .map_err(|e| Error::Executor {
                    index,
                    source: Box::new(e),
                })?;
            threads.push(t);
            match ready_rx.recv() {
                Ok(Ok(bound)) => addrs = bound,
                Ok(Err(e)) => {
                    let _ = shutdown.send(true);
                    for t in threads {
                        let _ = t.join();
                    }
                    return Err(e);
                }
                Err(_) => {
                    let _ = shutdown.send(true);
                    return Err(Error::Thread(format!(
                        "executor {index} died during startup"
                    )));
                }
            }
        }
        let (wire_addr, http_addr) = addrs;

        // Tokio side: ingest + control plane.
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("starling-dp-tokio")
            .build()
            .map_err(Error::Runtime)?;
        let node_info = NodeInfo {
            node_name: cfg.node_name.clone(),
            wire_addr: format!("{}:{}", cfg.advertise_host, wire_addr.port()),
            http_addr: format!("{}:{}", cfg.advertise_host, http_addr.port()),
            cores: u32::try_from(n).unwrap_or(u32::MAX),
            capacity_viewers: cfg.capacity_viewers,
            chunk_key_id,
            chunk_public_key,
            node_key: cfg.node_key.clone(),
            transport: cfg.control_transport.clone(),
        };
        let reg = Arc::clone(&registry);
        let t = std::thread::Builder::new()
            .name("starling-dp-tokio".into())
            .spawn(move || {
                rt.block_on(tokio_main(cfg, node_info, reg, signer, cmd_rx, shutdown_rx))
            })
            .map_err(|e| Error::Thread(e.to_string()))?;
        threads.push(t);
        Ok(Node {
            wire_addr,
            http_addr,
            registry,
            chunk_key_id,
            chunk_public_key,
            shutdown,
            cmds,
            threads,
        })
    }

    /// Bound wire-protocol address.
    pub fn wire_addr(&self) -> SocketAddr {
        self.wire_addr
    }

    /// Bound plain-HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The shared registry of broadcasts (and their rings).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Key id of the key this node signs chunks with.
    pub fn chunk_key_id(&self) -> u32 {
        self.chunk_key_id
    }

    /// Raw Ed25519 public key this node signs chunks with (verify with
    /// `starling_proto::integrity::ChunkVerifier`).
    pub fn chunk_public_key(&self) -> [u8; 32] {
        self.chunk_public_key
    }

    /// Revokes peers on a broadcast (as a `RevokeCommand` would).
    pub fn revoke(&self, broadcast_id: &str, peer_ids: &[u64]) {
        self.registry
            .revoke(broadcast_id, peer_ids, crate::ingest::now_ms());
    }

    /// Replaces the control plane's token keys (as a `KeysCommand` would).
    pub fn set_token_keys(&self, keys: &[starling_proto::v1::PublicKey]) {
        self.registry.auth().set_keys(keys);
    }

    /// Status of one broadcast.
    pub fn status(&self, broadcast_id: &str) -> Option<BroadcastStatus> {
        self.registry.get(broadcast_id).map(|b| b.status())
    }

    /// Starts an ingest (as an `IngestCommand` would).
    pub fn start_ingest(&self, spec: IngestSpec) {
        let _ = self.cmds.send(Cmd::Start(spec));
    }

    /// Stops an ingest (as a `StopIngestCommand` would).
    pub fn stop_ingest(&self, broadcast_id: &str) {
        let _ = self.cmds.send(Cmd::Stop(broadcast_id.to_owned()));
    }

    /// Asks every thread to stop (viewers are disconnected).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Blocks until every thread has ended (after [`Node::shutdown`], or on a fatal error).
    pub fn join(mut self) -> Result<(), Error> {
        let mut res = Ok(());
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                res = Err(Error::Thread("a data-plane thread panicked".into()));
            }
        }
        res
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

type Ready = std_mpsc::Sender<Result<(SocketAddr, SocketAddr), Error>>;

fn executor_main(
    index: usize,
    io_memory: usize,
    wire: SocketAddr,
    http: SocketAddr,
    ctx: Arc<ServeCtx>,
    mut shutdown: watch::Receiver<bool>,
    ready: Ready,
) {
    let ex = match LocalExecutorBuilder::new(Placement::Unbound)
        .name(&format!("starling-dp-{index}"))
        .io_memory(io_memory)
        .ring_depth(128)
        .make()
    {
        Ok(ex) => ex,
        Err(e) => {
            let _ = ready.send(Err(Error::Executor {
                index,
                source: e.to_string().into(),
            }));
            return;
        }
    };
    ex.run(async move {
        // glommio binds with SO_REUSEPORT: every executor listens on the same ports and
        // the kernel spreads connections over them.
        let wl = match TcpListener::bind(wire) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(Error::Bind {
                    addr: wire,
                    source: e.to_string().into(),
                }));
                return;
            }
        };
        let hl = match TcpListener::bind(http) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(Error::Bind {
                    addr: http,
                    source: e.to_string().into(),
                }));
                return;
            }
        };
        let (Ok(wa), Ok(ha)) = (wl.local_addr(), hl.local_addr()) else {
            let _ = ready.send(Err(Error::Thread("cannot read bound addresses".into())));
            return;
        };
        let _ = ready.send(Ok((wa, ha)));
        info!(executor = index, wire = %wa, http = %ha, "executor listening");
        let wctx = Arc::clone(&ctx);
        let wire_task = glommio::spawn_local(async move {
            let mut incoming = wl.incoming();
            while let Some(conn) = incoming.next().await {
                match conn {
                    Ok(s) => {
                        glommio::spawn_local(serve::wire_conn(s, Arc::clone(&wctx))).detach();
                    }
                    Err(e) => {
                        warn!(error = %e, "wire accept failed");
                        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach();
        let http_task = glommio::spawn_local(async move {
            let mut incoming = hl.incoming();
            while let Some(conn) = incoming.next().await {
                match conn {
                    Ok(s) => {
                        glommio::spawn_local(serve::http_conn(s, Arc::clone(&ctx))).detach();
                    }
                    Err(e) => {
                        warn!(error = %e, "http accept failed");
                        glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        })
        .detach();
        while !*shutdown.borrow_and_update() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
        wire_task.cancel();
        http_task.cancel();
        info!(executor = index, "executor stopping");
    });
}

async fn tokio_main(
    cfg: Config,
    node: NodeInfo,
    registry: Arc<Registry>,
    signer: Arc<ChunkSigner>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    mut shutdown: watch::Receiver<bool>,
) {
    let ingest = Arc::new(IngestManager::new(
        Arc::clone(&registry),
        u64::from(cfg.window_secs) * 1000,
        cfg.max_chunk_bytes,
        cfg.timeouts,
        signer,
        cfg.source_policy.clone(),
    ));
    for sb in &cfg.static_broadcasts {
        ingest.start(IngestSpec {
            broadcast_id: sb.id.clone(),
            source_url: sb.url.clone(),
            chunk_duration_ms: cfg.static_chunk_ms,
            substreams: cfg.static_substreams.clamp(1, 64),
            public: cfg.static_public,
            run_epoch: 0,
        });
    }
    let control = cfg.control_url.clone().map(|url| {
        tokio::spawn(control::run(
            url,
            node,
            Arc::clone(&registry),
            Arc::clone(&ingest),
            cfg.timeouts.backoff_min,
            cfg.timeouts.backoff_max,
            shutdown.clone(),
        ))
    });
    loop {
        tokio::select! {
            c = cmds.recv() => match c {
                Some(Cmd::Start(spec)) => ingest.start(spec),
                Some(Cmd::Stop(id)) => ingest.stop(&id),
                None => break,
            },
            r = shutdown.changed() => {
                if r.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    for id in ingest.ids() {
        ingest.stop(&id);
    }
    if let Some(c) = control
        && let Err(e) = c.await
    {
        error!(error = %e, "control link task failed");
    }
}
