//! gRPC over TLS against the real `starling-controlplane` binary, with a real
//! certificate chain (root CA → intermediate → server leaf; clients trust the root
//! only): verified clients get through (the library transport and `starling-admin
//! --ca-file`), a client trusting another CA and a plaintext client are refused;
//! the certificate is reloaded on SIGHUP and on a file change (a new connection sees
//! the new leaf, an old connection keeps working, a bad pair is refused and the old one
//! kept); mutual TLS for nodes (`--tls-client-ca --require-node-client-cert`); and no
//! start without a certificate unless `--insecure-plaintext`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use starling_controlplane::BearerInterceptor;
use starling_proto::transport::{ClientIdentity, ClientTls, Transport, endpoint, error_chain};
use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::{PublicKey, RegisterNodeRequest};
use starling_testpki::{Leaf, Pki};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const ADMIN_KEY: &str = "tls-test-admin-key-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(60);

/// The binary under test; its stderr lines go to a channel.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: String,
    addr: String,
}

impl Server {
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(["--admin-key", ADMIN_KEY])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(extra)
            .env_remove("STARLING_INSECURE_PLAINTEXT")
            .env_remove("STARLING_TLS_CERT")
            .env_remove("STARLING_TLS_KEY")
            .env_remove("DATABASE_URL")
            .env("STARLING_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut s = Server {
            child,
            lines,
            log: String::new(),
            addr: String::new(),
        };
        let line = s.wait_line("listening on ");
        s.addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .unwrap()
            .to_owned();
        assert!(line.contains("over TLS"), "{line}");
        s
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Waits for a stderr line containing `needle` (lines before it are kept in `log`).
    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push_str(&line);
                    self.log.push('\n');
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e}); log:\n{}", self.log),
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Files {
    dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

fn files(pki: &Pki, leaf: &Leaf) -> Files {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = leaf.write_to(dir.path(), "server").unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, pki.root_pem()).unwrap();
    Files {
        dir,
        cert,
        key,
        root,
    }
}

fn tls_args(f: &Files) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        f.cert.display().to_string(),
        "--tls-key".into(),
        f.key.display().to_string(),
    ]
}

fn trusting(pki: &Pki) -> Transport {
    Transport::Tls(ClientTls::with_ca_pem(pki.root_pem().into_bytes()))
}

async fn channel(url: &str, transport: &Transport) -> Result<Channel, String> {
    endpoint(url, transport)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| error_chain(&e))
}

async fn health(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .map(|r| r.into_inner().status)
}

/// The leaf certificate (DER) the server presents to a new connection.
async fn presented_leaf(addr: &str, pki: &Pki) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pki.root_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    let (_, conn) = tls.get_ref();
    assert_eq!(conn.alpn_protocol(), Some(&b"h2"[..]));
    conn.peer_certificates().unwrap()[0].to_vec()
}

use rustls_pki_types::pem::PemObject as _;

fn admin(url: &str, extra: &[&str], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_starling-admin"))
        .args(["--control-url", url, "--admin-key", ADMIN_KEY])
        .args(extra)
        .args(args)
        .env_remove("STARLING_INSECURE_PLAINTEXT")
        .env_remove("STARLING_CA_FILE")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_chain_admits_verified_clients_only() {
    let pki = Pki::new("tls-test").unwrap();
    let leaf = pki.loopback_server(100).unwrap();
    let f = files(&pki, &leaf);
    let server = Server::start(
        f.dir.path(),
        &tls_args(&f).iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Trusting the root only: the intermediate comes from the server's chain.
    let ch = channel(&server.url(), &trusting(&pki)).await.unwrap();
    assert_eq!(health(ch).await.unwrap(), 1, "SERVING");
    assert_eq!(presented_leaf(&server.addr, &pki).await, leaf.der);
    // By name too (the leaf names localhost).
    let port = server.addr.rsplit(':').next().unwrap();
    let ch = channel(&format!("https://localhost:{port}"), &trusting(&pki))
        .await
        .unwrap();
    assert_eq!(health(ch).await.unwrap(), 1);

    // starling-admin --ca-file.
    let out = admin(
        &server.url(),
        &["--ca-file", f.root.to_str().unwrap()],
        &["list"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A client that trusts another CA is refused at the handshake, and says why.
    let other = Pki::new("someone-else").unwrap();
    let err = match channel(&server.url(), &trusting(&other)).await {
        Ok(ch) => health(ch).await.map(|_| ()).unwrap_err().to_string(),
        Err(e) => e,
    };
    println!("other CA: {err}");
    assert!(err.contains("certificate"), "{err}");
    let other_root = f.dir.path().join("other.pem");
    std::fs::write(&other_root, other.root_pem()).unwrap();
    let out = admin(
        &server.url(),
        &["--ca-file", other_root.to_str().unwrap()],
        &["list"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("starling-admin with another CA: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("certificate"), "{stderr}");
    // The built-in web PKI roots do not know the throwaway CA either.
    assert!(
        channel(&server.url(), &Transport::default()).await.is_err()
            || health(channel(&server.url(), &Transport::default()).await.unwrap())
                .await
                .is_err()
    );

    // A plaintext client to the TLS port fails cleanly (an error, not a hang).
    let plain_url = format!("http://{}", server.addr);
    let plain = match channel(&plain_url, &Transport::Plaintext).await {
        Ok(ch) => tokio::time::timeout(WAIT, health(ch))
            .await
            .expect("plaintext call hung")
            .map(|_| ()),
        Err(e) => Err(tonic::Status::unavailable(e)),
    };
    println!("plaintext client: {plain:?}");
    assert!(plain.is_err());
    // And an http:// URL without the opt-in is refused before any connection.
    let out = admin(&plain_url, &[], &["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--insecure-plaintext"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_reloaded_on_sighup_and_on_change() {
    let pki = Pki::new("tls-reload").unwrap();
    let first = pki.loopback_server(1).unwrap();
    let f = files(&pki, &first);
    let mut server = Server::start(
        f.dir.path(),
        &tls_args(&f).iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let old = channel(&server.url(), &trusting(&pki)).await.unwrap();
    assert_eq!(health(old.clone()).await.unwrap(), 1);
    assert_eq!(presented_leaf(&server.addr, &pki).await, first.der);

    // New files, then SIGHUP: new connections get the new leaf.
    let second = pki.loopback_server(2).unwrap();
    second.write_to(f.dir.path(), "server").unwrap();
    server.signal("-HUP");
    server.wait_line("TLS certificate reloaded");
    assert_eq!(presented_leaf(&server.addr, &pki).await, second.der);
    // The connection made before still works.
    assert_eq!(health(old.clone()).await.unwrap(), 1);

    // A bad pair (a key that is not the certificate's) is refused; the old one stays.
    let stray = pki.loopback_server(3).unwrap();
    std::fs::write(&f.key, &stray.key_pem).unwrap();
    server.signal("-HUP");
    server.wait_line("new TLS certificate refused");
    assert_eq!(presented_leaf(&server.addr, &pki).await, second.der);
    assert_eq!(health(old.clone()).await.unwrap(), 1);

    // A change of the files alone (no signal) is picked up by the poll.
    let fourth = pki.loopback_server(4).unwrap();
    std::fs::write(&f.cert, &fourth.chain_pem).unwrap();
    std::fs::write(&f.key, &fourth.key_pem).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if presented_leaf(&server.addr, &pki).await == fourth.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not reloaded; log:\n{}",
            server.log
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(health(old).await.unwrap(), 1);
    let fresh = channel(&server.url(), &trusting(&pki)).await.unwrap();
    assert_eq!(health(fresh).await.unwrap(), 1);
}

fn registration(name: &str) -> RegisterNodeRequest {
    RegisterNodeRequest {
        node_name: name.into(),
        wire_addr: format!("{name}.test:9000"),
        http_addr: format!("{name}.test:9080"),
        cores: 1,
        capacity_viewers: 100,
        chunk_signing_key: Some(PublicKey {
            key_id: 0x7e57_0001,
            ed25519: vec![7; 32],
        }),
    }
}

async fn register(channel: Channel, name: &str) -> Result<(), tonic::Status> {
    EdgeServiceClient::with_interceptor(channel, BearerInterceptor::new(ADMIN_KEY).unwrap())
        .register(registration(name))
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_need_a_client_certificate_when_required() {
    let pki = Pki::new("tls-mtls").unwrap();
    let f = files(&pki, &pki.loopback_server(1).unwrap());
    let mut args = tls_args(&f);
    args.extend([
        "--tls-client-ca".into(),
        f.root.display().to_string(),
        "--require-node-client-cert".into(),
    ]);
    let mut server = Server::start(
        f.dir.path(),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // Without a client certificate: the handshake passes (viewers have none), health
    // answers, and EdgeService refuses with UNAUTHENTICATED and a log line.
    let bare = channel(&server.url(), &trusting(&pki)).await.unwrap();
    assert_eq!(health(bare.clone()).await.unwrap(), 1);
    let refused = register(bare, "no-cert").await.unwrap_err();
    println!("no client certificate: {refused:?}");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("client certificate"),
        "{refused:?}"
    );
    server.wait_line("no verified TLS client certificate");

    // With a certificate issued under the client CA: registered.
    let cert = pki.client("node-1", 10).unwrap();
    let with_cert = Transport::Tls(ClientTls {
        identity: Some(ClientIdentity {
            cert_pem: cert.chain_pem.into_bytes(),
            key_pem: cert.key_pem.into_bytes(),
        }),
        ..ClientTls::with_ca_pem(pki.root_pem().into_bytes())
    });
    let ch = channel(&server.url(), &with_cert).await.unwrap();
    register(ch, "node-1").await.unwrap();

    // A certificate from another CA fails the handshake.
    let other = Pki::new("tls-mtls-other")
        .unwrap()
        .client("node-2", 11)
        .unwrap();
    let forged = Transport::Tls(ClientTls {
        identity: Some(ClientIdentity {
            cert_pem: other.chain_pem.into_bytes(),
            key_pem: other.key_pem.into_bytes(),
        }),
        ..ClientTls::with_ca_pem(pki.root_pem().into_bytes())
    });
    let r = match channel(&server.url(), &forged).await {
        Ok(ch) => register(ch, "node-2").await.map_err(|s| s.to_string()),
        Err(e) => Err(e),
    };
    println!("foreign client certificate: {r:?}");
    assert!(r.is_err());
}

#[test]
fn no_certificate_no_start_unless_insecure_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("STARLING_INSECURE_PLAINTEXT")
        .env_remove("STARLING_TLS_CERT")
        .env_remove("STARLING_TLS_KEY")
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--insecure-plaintext"), "{stderr}");

    // With the opt-in it serves, and warns.
    let mut child = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("STARLING_INSECURE_PLAINTEXT", "1")
        .env_remove("DATABASE_URL")
        .env("STARLING_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut warned = false;
    let mut log = String::new();
    for line in BufReader::new(err).lines() {
        let Ok(line) = line else { break };
        log.push_str(&line);
        log.push('\n');
        warned |= line.contains("WARN") && line.contains("WITHOUT TLS");
        if line.contains("listening on ") {
            assert!(line.contains("PLAINTEXT"), "{line}");
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(warned, "{log}");
}
