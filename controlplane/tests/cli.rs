//! End-to-end test of the two binaries: `starling-controlplane` on SQLite with port 0,
//! driven by `starling-admin` exactly as the e2e scripts do, plus a fake data-plane
//! node over the real EdgeService so `wait --health up` can succeed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::node_command::Command as NodeCmd;
use starling_proto::v1::{
    CommandsRequest, HealthReport, IngestHealth, RegisterNodeRequest, SourceHealth,
};
use tokio_stream::StreamExt;

/// The zero-setup admin key file written by the server under test.
static ADMIN_KEY_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn admin(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling-admin"));
    cmd.env("STARLING_CONTROL_URL", url)
        .env_remove("STARLING_ADMIN_KEY")
        .env_remove("STARLING_ADMIN_JWT")
        .env_remove("STARLING_ADMIN_KEY_FILE");
    if let Some(path) = ADMIN_KEY_FILE.get() {
        cmd.env("STARLING_ADMIN_KEY_FILE", path);
    }
    cmd.args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_end_to_end_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
        .args(["--listen", "127.0.0.1:0", "--node-timeout-ms", "10000"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("DATABASE_URL")
        .env_remove("STARLING_ADMIN_KEY")
        .env_remove("STARLING_ADMIN_JWT_KEYS")
        .env_remove("STARLING_NODE_KEY")
        .env_remove("STARLING_NODE_KEY_FILE")
        .env("STARLING_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = server.id();
    let err = server.stderr.take().unwrap();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
                let _ = addr_tx.send(addr);
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let addr = addr_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("server did not print its address");
    assert!(dir.path().join("data").join("starling.db").exists());
    let url = format!("http://{addr}");

    // Zero-setup mode: the admin key was written to <data-dir>/admin.key (0600); without
    // it admin calls are refused.
    let key_file = dir.path().join("data").join("admin.key");
    assert!(key_file.exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let out = admin(&url, &["list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));
    let key = std::fs::read_to_string(&key_file).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_starling-admin"))
        .env("STARLING_CONTROL_URL", &url)
        .env("STARLING_ADMIN_KEY", key.trim())
        .args(["list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    ADMIN_KEY_FILE.set(key_file).unwrap();

    // create --id-only: the id alone on stdout.
    let out = admin(
        &url,
        &[
            "create",
            "--name",
            "e2e",
            "--source",
            "http://127.0.0.1:1/live",
            "--id-only",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(
        !id.is_empty() && !id.contains(char::is_whitespace),
        "{id:?}"
    );

    // Default create output: id on the first line.
    let out = admin(
        &url,
        &[
            "create",
            "--name",
            "second",
            "--source",
            "http://127.0.0.1:1/x",
        ],
    );
    assert!(out.status.success());
    let first_line = stdout(&out).lines().next().unwrap().to_string();
    assert!(!first_line.contains(' '), "{first_line:?}");

    let out = admin(&url, &["get", &id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["state"], "created");
    assert_eq!(v["chunk_duration_ms"], 1000);

    // Errors: exit 1 with the gRPC status on stderr.
    let out = admin(&url, &["get", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
    let out = admin(
        &url,
        &["create", "--name", "x", "--source", "https://h/live"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("https:// is not supported"),
        "{}",
        stderr(&out)
    );

    let out = admin(&url, &["start", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("state:         live"),
        "{}",
        stdout(&out)
    );

    // No node yet: wait times out with exit 3.
    let out = admin(&url, &["wait", &id, "--health", "up", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("timed out"), "{}", stderr(&out));

    // A fake node picks the broadcast up and reports UP; `wait` then succeeds.
    let register = RegisterNodeRequest {
        node_name: "fake".into(),
        wire_addr: "127.0.0.1:9000".into(),
        http_addr: "127.0.0.1:9080".into(),
        cores: 1,
        capacity_viewers: 10,
        chunk_signing_key: None,
    };
    // Nodes need the node key, which defaults to the zero-setup admin key.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let e = EdgeServiceClient::new(channel.clone())
        .register(register.clone())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut edge = EdgeServiceClient::with_interceptor(
        channel,
        starling_controlplane::BearerInterceptor::new(key.trim()).unwrap(),
    );
    let node_id = edge.register(register).await.unwrap().into_inner().node_id;
    let mut commands = edge
        .commands(CommandsRequest {
            node_id: node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // The stream starts with the chunk-token keys.
    let keys = tokio::time::timeout(Duration::from_secs(20), commands.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&keys.command, Some(NodeCmd::Keys(k)) if k.token_keys.len() == 1),
        "{keys:?}"
    );
    let cmd = tokio::time::timeout(Duration::from_secs(20), commands.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(NodeCmd::Ingest(ingest)) = cmd.command else {
        panic!("expected ingest, got {cmd:?}");
    };
    assert_eq!(ingest.broadcast_id, id);
    let ack = edge
        .report_health(HealthReport {
            node_id: node_id.clone(),
            ingests: vec![IngestHealth {
                broadcast_id: id.clone(),
                health: SourceHealth::Up as i32,
                content_type: "video/mp2t".into(),
                ..Default::default()
            }],
            viewers: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ack.known);
    let url2 = url.clone();
    let id2 = id.clone();
    let out = tokio::task::spawn_blocking(move || {
        admin(
            &url2,
            &["wait", &id2, "--health", "up", "--timeout", "30s", "--json"],
        )
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["source_health"], "up");
    assert_eq!(v["node_id"], node_id.as_str());
    assert_eq!(v["node_http_addr"], "127.0.0.1:9080");

    let out = admin(&url, &["list", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);

    let out = admin(&url, &["stop", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = admin(&url, &["list"]);
    assert!(out.status.success());
    assert!(!stdout(&out).contains(&id), "{}", stdout(&out));
    let out = admin(&url, &["list", "--all"]);
    assert!(stdout(&out).contains(&id), "{}", stdout(&out));

    // SIGTERM: graceful shutdown (the node's command stream is open) and exit 0.
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap()
        .unwrap();
    let log = reader.join().unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("backend sqlite"), "{log}");
    drop(commands);
}
