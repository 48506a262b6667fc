//! Helpers shared by the rights and reports acceptance tests: viewer JWTs minted by
//! hand (the broadcaster's backend), and a raw wire-protocol connection for clients
//! that are not the SDK (a polluter, a revoked viewer that keeps trying).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use starling_proto::holder::{HolderKey, Verifier};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Bytes, BytesMut};
use ring::signature::{Ed25519KeyPair, KeyPair};
use starling_proto::wire::{
    self, Decoder, Frame, Hello, Limits, Reason, Role, StartAt, StreamInfo, Subscribe,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

pub fn unix_secs() -> u64 {
    unix_ms() / 1000
}

/// The broadcaster's backend: an Ed25519 key pair that mints EdDSA viewer JWTs.
pub struct Issuer {
    key: Ed25519KeyPair,
}

impl Issuer {
    /// A fresh random key.
    pub fn generate() -> Issuer {
        let pkcs8 = starling_proto::token::generate_pkcs8().unwrap();
        Issuer {
            key: Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap(),
        }
    }

    /// The key the control plane verifies with.
    pub fn credential_key(&self) -> starling_controlplane::credential::CredentialKey {
        starling_controlplane::credential::CredentialKey::ed25519_raw(
            self.key.public_key().as_ref(),
        )
        .unwrap()
    }

    /// A JWT with exactly these claims (`{"alg":"EdDSA","typ":"JWT"}`).
    pub fn mint(&self, claims: &serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
        let signing_input = format!("{header}.{payload}");
        let sig = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    /// A viewer credential for `broadcast` (or `"*"`), valid for an hour, for the
    /// deployment's audience, from its issuer.
    pub fn viewer(&self, subject: &str, broadcast: &str) -> String {
        let now = unix_secs();
        self.mint(&serde_json::json!({
            "sub": subject,
            "broadcast": broadcast,
            "aud": starling_loadtest::deployment::VIEWER_JWT_AUDIENCE,
            "iss": starling_loadtest::deployment::VIEWER_JWT_ISSUER,
            "iat": now,
            "exp": now + 3600,
        }))
    }
}

/// One wire-protocol connection, read and written by the same task.
pub struct RawConn {
    pub stream: TcpStream,
    pub decoder: Decoder,
    pub buf: BytesMut,
}

/// Why a dial failed.
#[derive(Debug)]
pub enum DialError {
    Io(String),
    /// The other side answered `ERROR` / `GOODBYE`.
    Refused(Reason),
    Protocol(String),
}

impl RawConn {
    pub fn new(stream: TcpStream) -> RawConn {
        let _ = stream.set_nodelay(true);
        RawConn {
            stream,
            decoder: Decoder::new(Limits::default()),
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    pub async fn send(&mut self, f: &Frame) -> std::io::Result<()> {
        let b = wire::encode_to_bytes(f).map_err(std::io::Error::other)?;
        self.stream.write_all(&b).await
    }

    /// The next frame; `Ok(None)` at EOF.
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(f) = self
                .decoder
                .decode(&mut self.buf)
                .map_err(|e| e.to_string())?
            {
                return Ok(Some(f));
            }
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    /// `HELLO(role, token)` → `HELLO_ACK`, `SUBSCRIBE(broadcast, live, mask)` →
    /// `STREAM_INFO`.
    pub async fn dial(
        addr: &str,
        role: Role,
        token: Bytes,
        broadcast: &str,
        mask: u64,
        verifier: Verifier,
    ) -> Result<(RawConn, StreamInfo), DialError> {
        Self::dial_ticketed(addr, role, token, broadcast, mask, &[], verifier).await
    }

    /// [`RawConn::dial`], sending parent `tickets` (`TICKET` frames) before `SUBSCRIBE`.
    pub async fn dial_ticketed(
        addr: &str,
        role: Role,
        token: Bytes,
        broadcast: &str,
        mask: u64,
        tickets: &[Bytes],
        verifier: Verifier,
    ) -> Result<(RawConn, StreamInfo), DialError> {
        let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
            .await
            .map_err(|_| DialError::Io("connect timed out".into()))?
            .map_err(|e| DialError::Io(e.to_string()))?;
        let mut c = RawConn::new(stream);
        let io = |e: std::io::Error| DialError::Io(e.to_string());
        c.send(&Frame::Hello(Hello {
            min_version: wire::MIN_PROTOCOL_VERSION,
            max_version: wire::PROTOCOL_VERSION,
            role,
            token: token.clone(),
        }))
        .await
        .map_err(io)?;
        let mut subscribed = false;
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), c.next())
                .await
                .map_err(|_| DialError::Io("handshake timed out".into()))?
                .map_err(DialError::Protocol)?;
            match f {
                None => return Err(DialError::Io("closed during the handshake".into())),
                Some(Frame::HelloAck(ack)) if !subscribed => {
                    subscribed = true;
                    if !token.is_empty() {
                        let proof = raw_holder().prove(&ack.nonce, &token, verifier);
                        c.send(&Frame::Proof(Bytes::copy_from_slice(&proof)))
                            .await
                            .map_err(io)?;
                    }
                    for t in tickets {
                        c.send(&Frame::Ticket(t.clone())).await.map_err(io)?;
                    }
                    c.send(&Frame::Subscribe(Subscribe {
                        broadcast_id: broadcast.to_string(),
                        start: StartAt::Live,
                        substream_mask: mask,
                    }))
                    .await
                    .map_err(io)?;
                }
                Some(Frame::StreamInfo(info)) if subscribed => return Ok((c, info)),
                Some(Frame::Ping(n)) => c.send(&Frame::Pong(n)).await.map_err(io)?,
                Some(Frame::Pong(_)) => {}
                Some(Frame::Error(r) | Frame::Goodbye(r)) => return Err(DialError::Refused(r)),
                Some(other) => {
                    return Err(DialError::Protocol(format!(
                        "unexpected frame {other:?} during the handshake"
                    )));
                }
            }
        }
    }

    pub fn into_split(self) -> (RawReader, OwnedWriteHalf) {
        let (r, w) = self.stream.into_split();
        (
            RawReader {
                read: r,
                decoder: self.decoder,
                buf: self.buf,
            },
            w,
        )
    }
}

/// The read half of a [`RawConn`].
pub struct RawReader {
    pub read: OwnedReadHalf,
    pub decoder: Decoder,
    pub buf: BytesMut,
}

impl RawReader {
    pub async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some(f) = self
                .decoder
                .decode(&mut self.buf)
                .map_err(|e| e.to_string())?
            {
                return Ok(Some(f));
            }
            let n = self
                .read
                .read_buf(&mut self.buf)
                .await
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(None);
            }
        }
    }
}

pub async fn write_frame(w: &mut OwnedWriteHalf, f: &Frame) -> std::io::Result<()> {
    let b = wire::encode_to_bytes(f).map_err(std::io::Error::other)?;
    w.write_all(&b).await
}

/// Reads an env var as a number, or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `DATABASE_URL` for the Postgres variants. `None` = skip, unless
/// `STARLING_REQUIRE_POSTGRES=1` (CI), where a missing URL is a failure.
pub fn postgres_url() -> Option<String> {
    match std::env::var("DATABASE_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u),
        _ => {
            assert!(
                std::env::var("STARLING_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "STARLING_REQUIRE_POSTGRES=1 but DATABASE_URL is not set"
            );
            eprintln!("DATABASE_URL not set: skipping the Postgres variant");
            None
        }
    }
}

/// Fetches `url` (plain HTTP/1.1 GET over a TCP socket) and returns the body.
pub async fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(text)
}

/// Sum of the samples of a Prometheus counter whose labels contain `label_part`.
pub fn metric_sum(text: &str, name: &str, label_part: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l.contains(label_part))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The key of the raw wire clients the tests write by hand: their raw joins send its
/// public half (`JoinRequest.holder_key`), their dials prove it.
pub fn raw_holder() -> &'static HolderKey {
    static K: std::sync::OnceLock<HolderKey> = std::sync::OnceLock::new();
    K.get_or_init(|| HolderKey::from_seed(&[11; 32]).expect("holder key"))
}
