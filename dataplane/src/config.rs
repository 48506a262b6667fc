//! Typed configuration of a data-plane node (the binary maps its flags onto this).

use crate::source_policy::SourcePolicy;
use std::net::SocketAddr;
use std::time::Duration;

/// A broadcast ingested at startup without a control plane (`--static-broadcast`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticBroadcast {
    pub id: String,
    pub url: String,
}

impl std::str::FromStr for StaticBroadcast {
    type Err = String;
    /// `ID=URL`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, url) = s
            .split_once('=')
            .ok_or_else(|| format!("expected ID=URL, got {s:?}"))?;
        let id = id.trim();
        if id.is_empty() || id.len() > starling_proto::wire::MAX_BROADCAST_ID {
            return Err(format!("broadcast id must be 1..=128 bytes, got {id:?}"));
        }
        if !url.starts_with("http://") {
            return Err(format!("only http:// sources are supported, got {url:?}"));
        }
        Ok(StaticBroadcast {
            id: id.to_owned(),
            url: url.trim().to_owned(),
        })
    }
}

/// A trusted chunk-token public key (`--token-key ID=BASE64`), for standalone nodes;
/// under a control plane the keys come from `RegisterNodeResponse` / `KeysCommand`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenKey {
    pub key_id: u32,
    /// Raw 32-byte Ed25519 public key.
    pub ed25519: [u8; 32],
}

/// Decodes base64 (standard or URL-safe alphabet, padding optional).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    let t = s.trim().trim_end_matches('=');
    URL_SAFE_NO_PAD
        .decode(t)
        .or_else(|_| STANDARD_NO_PAD.decode(t))
        .ok()
}

impl std::str::FromStr for TokenKey {
    type Err = String;
    /// `ID=BASE64` (key id as a decimal u32; 32-byte key, standard or URL-safe base64).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (id, key) = s
            .split_once('=')
            .ok_or_else(|| format!("expected KEY_ID=BASE64_PUBLIC_KEY, got {s:?}"))?;
        let key_id = id
            .trim()
            .parse()
            .map_err(|_| format!("key id must be a u32, got {id:?}"))?;
        let ed25519 = decode_base64(key)
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| {
                "the key must be 32 bytes of base64 (raw Ed25519 public key)".to_owned()
            })?;
        Ok(TokenKey { key_id, ed25519 })
    }
}

/// A chunk-signing private key as PKCS#8 DER (never printed by `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct ChunkKey(pub Vec<u8>);

impl std::fmt::Debug for ChunkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChunkKey(<redacted>)")
    }
}

impl ChunkKey {
    /// Reads the PKCS#8 key at `path`, or generates one and writes it there (mode 0600)
    /// when the file does not exist.
    pub fn load_or_create(path: &std::path::Path) -> Result<ChunkKey, crate::Error> {
        match std::fs::read(path) {
            Ok(der) => {
                starling_proto::integrity::ChunkSigner::new(0, &der).map_err(|e| {
                    crate::Error::Config(format!("chunk key file {}: {e}", path.display()))
                })?;
                Ok(ChunkKey(der))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let der = starling_proto::integrity::generate_pkcs8()
                    .map_err(|e| crate::Error::Config(e.to_string()))?;
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let write = opts
                    .open(path)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, &der));
                write.map_err(|e| {
                    crate::Error::Config(format!("cannot write chunk key {}: {e}", path.display()))
                })?;
                Ok(ChunkKey(der))
            }
            Err(e) => Err(crate::Error::Config(format!(
                "cannot read chunk key {}: {e}",
                path.display()
            ))),
        }
    }
}

/// The credential this node sends to the control plane as `authorization: Bearer <key>`
/// on every `EdgeService` call (`--node-key` / `--node-key-file`). Never printed by
/// `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeKey(String);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(<redacted>)")
    }
}

impl NodeKey {
    /// `key` with surrounding whitespace removed.
    ///
    /// # Errors
    /// Empty, or not printable ASCII without spaces (it must travel in a header).
    pub fn new(key: &str) -> Result<NodeKey, crate::Error> {
        let key = key.trim();
        if key.is_empty() {
            return Err(crate::Error::Config("the node key is empty".into()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(crate::Error::Config(
                "the node key must be printable ASCII without spaces".into(),
            ));
        }
        Ok(NodeKey(key.to_owned()))
    }

    /// Reads the key from `path` (surrounding whitespace ignored; e.g. the control
    /// plane's zero-setup `admin.key`).
    ///
    /// # Errors
    /// The file cannot be read or holds no usable key (the key is never in the message).
    pub fn read_file(path: &std::path::Path) -> Result<NodeKey, crate::Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            crate::Error::Config(format!("cannot read node key file {}: {e}", path.display()))
        })?;
        NodeKey::new(&text)
            .map_err(|e| crate::Error::Config(format!("node key file {}: {e}", path.display())))
    }

    /// The key itself (to send it).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// Timeouts and slow-viewer policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// One deadline for the whole handshake, counted from accept: a wire connection must
    /// be subscribed (`HELLO` … `SUBSCRIBE`, token accepted) and an HTTP request head
    /// complete within this, however many frames or bytes arrive meanwhile.
    pub handshake: Duration,
    /// A viewer whose socket accepts nothing for this long is dropped.
    pub write_stall: Duration,
    /// A source that sends nothing for this long is reconnected.
    pub source_idle: Duration,
    /// Connect + response-head timeout for sources.
    pub source_connect: Duration,
    /// A wire connection to which nothing was sent for this long gets a `PING`.
    pub keepalive: Duration,
    /// A subscribed wire connection from which nothing (not even `PONG`) was received
    /// for this long is closed with `ERROR(IDLE_TIMEOUT)`.
    pub idle: Duration,
    /// Skips to the live edge allowed before `GOODBYE(TooSlow)`.
    pub max_skips: u32,
    /// A live start (wire `SUBSCRIBE` live, HTTP `GET /live/ID`) begins at the newest
    /// random-access chunk at least this far behind the live edge: the viewer gets this
    /// much stream at once and can start playing without waiting for its buffer to
    /// fill. Zero: the newest random-access chunk.
    pub live_start_behind: Duration,
    /// First reconnect delay; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Kernel send buffer of each viewer connection (`SO_SNDBUF`, which Linux doubles),
    /// in bytes; 0 leaves the kernel's autotuning, which lets a viewer that reads
    /// nothing hold up to `net.ipv4.tcp_wmem` max (4 MiB) before `write_stall` and the
    /// skip-ahead policy see it. Default 256 KiB: a second of a 2 Mbit/s stream.
    pub send_buffer_bytes: usize,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            write_stall: Duration::from_secs(10),
            source_idle: Duration::from_secs(10),
            source_connect: Duration::from_secs(5),
            keepalive: Duration::from_secs(5),
            idle: Duration::from_secs(30),
            max_skips: 3,
            live_start_behind: Duration::from_millis(1000),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            send_buffer_bytes: 256 * 1024,
        }
    }
}

/// A per-connection rate limit: up to `burst` events at once, then one per `interval`
/// (a token bucket of `burst` tokens refilled every `interval`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub interval: Duration,
}

impl RateLimit {
    /// `per_minute` events per minute on average (at least 1), bursts of `burst`.
    pub fn per_minute(per_minute: u32, burst: u32) -> RateLimit {
        RateLimit {
            burst,
            interval: Duration::from_secs(60) / per_minute.max(1),
        }
    }

    /// `per_second` events per second on average (at least 1), bursts of `burst`.
    pub fn per_second(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            burst,
            interval: Duration::from_secs(1) / per_second.max(1),
        }
    }
}

/// Caps on connections and per-connection rates (see [`crate::limits`]). Connection
/// caps are per node (shared by every executor) and count wire and HTTP connections
/// together; a source address is an IPv4 address or an IPv6 /64, loopback included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections not yet authenticated (wire: before `SUBSCRIBE` and its token are
    /// accepted; HTTP: before `GET /live/{id}` is admitted), node-wide. Beyond it a new
    /// connection gets `ERROR(SERVER_BUSY)` (HTTP 503) and is closed.
    pub max_unauthenticated: u32,
    /// Of those, from one source address (so one address cannot take them all).
    pub max_unauthenticated_per_address: u32,
    /// Open connections from one source address, authenticated or not.
    pub max_per_address: u32,
    /// `REQUEST`s per wire connection; one beyond is answered `NOT_FOUND(seq)`.
    pub requests: RateLimit,
    /// `TOKEN` renewals per subscribed wire connection; one beyond closes it with
    /// `ERROR(SERVER_BUSY)`.
    pub token_renewals: RateLimit,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_unauthenticated: 2048,
            max_unauthenticated_per_address: 64,
            max_per_address: 1000,
            requests: RateLimit::per_second(32, 128),
            token_renewals: RateLimit::per_minute(30, 8),
        }
    }
}

/// Everything a node needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC URL of the control plane (`https://host:port`); `None` = standalone.
    pub control_url: Option<String>,
    /// How the control plane is reached: TLS (the default: built-in roots, or a CA and
    /// a client certificate for mutual TLS), or plaintext for an `http://` URL (the
    /// explicit, insecure opt-in).
    pub control_transport: starling_proto::transport::Transport,
    /// Credential sent on every call to the control plane (its node key, or an admin
    /// key); `None` = none, and a control plane refuses the node (logged, retried).
    pub node_key: Option<NodeKey>,
    /// Broadcasts ingested at startup.
    pub static_broadcasts: Vec<StaticBroadcast>,
    /// Target chunk duration of static broadcasts.
    pub static_chunk_ms: u32,
    /// Substreams K of static broadcasts (1..=64; the control plane sends its own K).
    pub static_substreams: u16,
    pub wire_listen: SocketAddr,
    pub http_listen: SocketAddr,
    /// Host advertised to the control plane (with the bound ports).
    pub advertise_host: String,
    pub node_name: String,
    /// glommio executors (one per core); 0 = all available cores.
    pub cores: usize,
    pub window_secs: u32,
    pub max_chunk_bytes: usize,
    /// io_uring registered memory per executor (memlock-bound).
    pub io_memory_kib: usize,
    pub capacity_viewers: u32,
    pub timeouts: Timeouts,
    /// Connection caps and per-connection rate limits.
    pub limits: ConnLimits,
    /// Chunk-signing key (PKCS#8); `None` = a fresh key for this run. Its key id is
    /// the first 4 bytes (big endian) of the public key.
    pub chunk_key: Option<ChunkKey>,
    /// Token keys trusted in addition to the control plane's (standalone mode).
    pub token_keys: Vec<TokenKey>,
    /// Static broadcasts accept viewers without a chunk token (default); false = a
    /// valid token (from `token_keys`) is required.
    pub static_public: bool,
    /// Clock skew tolerated on token `issued_at` / `expires_at`.
    pub token_skew: Duration,
    /// How long a revoked peer's tokens stay refused (at least the longest token
    /// lifetime the control plane issues; extended to the expiry of any of the peer's
    /// tokens this node has seen).
    pub revocation_hold: Duration,
    /// Which addresses sources may be pulled from (after DNS resolution, every request
    /// and redirect): public ones, plus the allow-list. Default: public only.
    pub source_policy: SourcePolicy,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            control_url: None,
            control_transport: starling_proto::transport::Transport::default(),
            node_key: None,
            static_broadcasts: Vec::new(),
            static_chunk_ms: 1000,
            static_substreams: 4,
            wire_listen: SocketAddr::from(([0, 0, 0, 0], 7100)),
            http_listen: SocketAddr::from(([0, 0, 0, 0], 7180)),
            advertise_host: "127.0.0.1".into(),
            node_name: "dataplane".into(),
            cores: 0,
            window_secs: 30,
            max_chunk_bytes: 1024 * 1024,
            io_memory_kib: 512,
            capacity_viewers: 10_000,
            timeouts: Timeouts::default(),
            limits: ConnLimits::default(),
            chunk_key: None,
            token_keys: Vec::new(),
            static_public: true,
            token_skew: Duration::from_secs(5),
            revocation_hold: Duration::from_secs(300),
            source_policy: SourcePolicy::default(),
        }
    }
}

impl Config {
    /// Executors to start.
    pub fn executor_count(&self) -> usize {
        if self.cores == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            self.cores
        }
    }
}
