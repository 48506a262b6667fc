//! TLS on the gRPC hops of a whole deployment, over real sockets, with a real
//! certificate chain (the deployment's throwaway root CA → intermediate → server leaf;
//! clients trust the root only):
//!
//! 1. `a_viewer_joins_and_plays_through_tls`: an SDK viewer joins through TLS and plays
//!    the source byte for byte with every chunk verified (the data-plane node reached
//!    the control plane through TLS too); a viewer trusting another CA is refused with
//!    an error that names the certificate; a plaintext viewer against the TLS port fails
//!    cleanly; an `http://` URL without the plaintext opt-in is a configuration error.
//! 2. `nodes_register_only_with_a_client_certificate`: a control plane that requires
//!    node client certificates; a data-plane node without one is never registered, one
//!    with a certificate issued under the client CA is.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a panic

use std::time::Duration;

use starling_controlplane::{ControlPlane, DatabaseConfig, ServerTls, TlsIdentity};
use starling_loadtest::{Deployment, DeploymentConfig, OutputCheck};
use starling_proto::transport::{ClientIdentity, ClientTls, Transport};
use starling_sdk::{SdkError, Viewer, ViewerConfig};
use starling_testpki::Pki;

fn viewer_config(dep: &Deployment, transport: Transport) -> ViewerConfig {
    let mut vc = ViewerConfig::new(dep.broadcast_id());
    vc.control_url = dep.control_url();
    vc.transport = transport;
    vc.http_listen = None;
    vc.connect_timeout = Duration::from_secs(10);
    vc
}

async fn join_error(vc: ViewerConfig) -> SdkError {
    match tokio::time::timeout(Duration::from_secs(60), Viewer::join(vc))
        .await
        .expect("join hung")
    {
        Ok(v) => {
            let _ = v.leave().await;
            panic!("joined");
        }
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_joins_and_plays_through_tls() {
    let dep = Deployment::start(DeploymentConfig::default())
        .await
        .expect("deployment");
    assert!(
        dep.control_url().starts_with("https://"),
        "{}",
        dep.control_url()
    );

    let viewer = Viewer::join(viewer_config(&dep, dep.transport()))
        .await
        .expect("viewer through TLS");
    let pattern = dep.source().pattern();
    let mut sub = viewer.subscribe();
    let mut out = OutputCheck::default();
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while out.bytes < 100_000 {
            match sub.next_bytes().await {
                Some(b) => out.feed(&pattern, &b),
                None => break,
            }
        }
    })
    .await;
    println!(
        "through TLS: {} bytes checked, {}",
        out.bytes,
        viewer.stats()
    );
    assert!(
        out.bytes >= 100_000 && out.identical(),
        "{:?}",
        out.problems
    );
    assert!(viewer.stats().chunks_verified > 0);
    assert_eq!(viewer.stats().chunks_unverified, 0);
    let _ = viewer.leave().await;

    // Trusting another CA: refused at the handshake, and the error says so.
    let other = Pki::new("not-the-deployment").unwrap();
    let e = join_error(viewer_config(
        &dep,
        Transport::Tls(ClientTls::with_ca_pem(other.root_pem().into_bytes())),
    ))
    .await;
    println!("another CA: {e}");
    assert!(e.to_string().contains("certificate"), "{e:?}");

    // Plaintext to the TLS port: an error, not a hang.
    let mut plain = viewer_config(&dep, Transport::Plaintext);
    plain.control_url = dep.control_url().replacen("https://", "http://", 1);
    let e = join_error(plain.clone()).await;
    println!("plaintext client: {e}");

    // An http:// URL without the opt-in: a configuration error, nothing sent.
    plain.transport = dep.transport();
    let e = join_error(plain).await;
    println!("http:// without the opt-in: {e}");
    assert!(matches!(e, SdkError::Config(_)), "{e:?}");
    assert!(e.to_string().contains("plaintext"), "{e}");
    dep.shutdown().await;
}

fn node_config(
    control_url: &str,
    name: &str,
    transport: Transport,
    admin_key: &str,
) -> starling_dataplane::Config {
    starling_dataplane::Config {
        control_url: Some(control_url.to_owned()),
        control_transport: transport,
        node_key: Some(starling_dataplane::NodeKey::new(admin_key).unwrap()),
        wire_listen: ([127, 0, 0, 1], 0).into(),
        http_listen: ([127, 0, 0, 1], 0).into(),
        advertise_host: "127.0.0.1".into(),
        node_name: name.into(),
        cores: 1,
        io_memory_kib: 256,
        ..starling_dataplane::Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_register_only_with_a_client_certificate() {
    let pki = Pki::new("mtls-nodes").unwrap();
    let leaf = pki.loopback_server(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = starling_controlplane::Config::new(
        ([127, 0, 0, 1], 0).into(),
        DatabaseConfig::Sqlite {
            path: dir.path().join("starling.db"),
        },
    );
    let admin_key = config.auth.admin_key.clone().unwrap();
    config.tls = Some(ServerTls {
        client_ca_pem: Some(pki.root_pem().into_bytes()),
        require_node_client_cert: true,
        ..ServerTls::new(TlsIdentity::Pem {
            cert: leaf.chain_pem.into_bytes(),
            key: leaf.key_pem.into_bytes(),
        })
    });
    let cp = ControlPlane::bind(config).await.unwrap();
    let store = cp.store().clone();
    let cp = cp.spawn();
    let url = cp.url();

    let root_only = ClientTls::with_ca_pem(pki.root_pem().into_bytes());
    let cert = pki.client("node-with-cert", 2).unwrap();
    let with_cert = Transport::Tls(ClientTls {
        identity: Some(ClientIdentity {
            cert_pem: cert.chain_pem.into_bytes(),
            key_pem: cert.key_pem.into_bytes(),
        }),
        ..root_only.clone()
    });
    let bare_cfg = node_config(
        &url,
        "node-without-cert",
        Transport::Tls(root_only),
        &admin_key,
    );
    let good_cfg = node_config(&url, "node-with-cert", with_cert, &admin_key);
    let bare = tokio::task::spawn_blocking(move || starling_dataplane::Node::start(bare_cfg))
        .await
        .unwrap()
        .expect("node without a certificate starts (and is refused)");
    let good = tokio::task::spawn_blocking(move || starling_dataplane::Node::start(good_cfg))
        .await
        .unwrap()
        .expect("node with a certificate");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let names = loop {
        let names: Vec<String> = store
            .list_alive_nodes()
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.name)
            .collect();
        if names.iter().any(|n| n == "node-with-cert") {
            break names;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not registered: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Give the bare node a few more attempts, then it must still be absent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later: Vec<String> = store
        .list_alive_nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.name)
        .collect();
    println!("registered: {names:?}, later {later:?}");
    assert!(!later.iter().any(|n| n == "node-without-cert"), "{later:?}");
    assert!(later.iter().any(|n| n == "node-with-cert"), "{later:?}");
    for node in [bare, good] {
        node.shutdown();
        let _ = tokio::task::spawn_blocking(move || node.join()).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), cp.shutdown()).await;
}
