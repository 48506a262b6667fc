//! End-to-end test of the two binaries: `starling-controlplane` on SQLite with port 0,
//! driven by `starling-admin` exactly as the e2e scripts do, plus a fake data-plane
//! node over the real EdgeService so `wait --health up` can succeed; and `audience` and
//! `top` over a broadcast with joined, reporting viewers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use starling_proto::v1::edge_service_client::EdgeServiceClient;
use starling_proto::v1::node_command::Command as NodeCmd;
use starling_proto::v1::viewer_service_client::ViewerServiceClient;
use starling_proto::v1::{
    CommandsRequest, HealthReport, IngestHealth, JoinRequest, RegisterNodeRequest, ReportRequest,
    SourceHealth, ViewerReport,
};
use tokio_stream::StreamExt;

/// The zero-setup admin key file written by the server under test.
static ADMIN_KEY_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

fn admin(url: &str, args: &[&str]) -> Output {
    admin_with(url, ADMIN_KEY_FILE.get().map(|p| p.as_path()), args)
}

/// `starling-admin ARGS` against `url`, authenticated by `key_file` (none: no key).
fn admin_with(url: &str, key_file: Option<&std::path::Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_starling-admin"));
    // These tests run plaintext gRPC (tests/tls.rs covers TLS).
    cmd.env("STARLING_CONTROL_URL", url)
        .env("STARLING_INSECURE_PLAINTEXT", "1")
        .env_remove("STARLING_ADMIN_KEY")
        .env_remove("STARLING_ADMIN_JWT")
        .env_remove("STARLING_ADMIN_KEY_FILE");
    if let Some(path) = key_file {
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

/// A `starling-controlplane` child on SQLite in a temporary directory, on a free port.
struct Server {
    dir: tempfile::TempDir,
    server: std::process::Child,
    pid: u32,
    /// Collects the server's stderr until it exits.
    reader: std::thread::JoinHandle<String>,
    url: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
            .env("STARLING_INSECURE_PLAINTEXT", "1")
            // Port 0 for metrics too: tests run side by side.
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .args(extra)
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
        Server {
            dir,
            server,
            pid,
            reader,
            url: format!("http://{addr}"),
        }
    }

    fn key_file(&self) -> std::path::PathBuf {
        self.dir.path().join("data").join("admin.key")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binaries_end_to_end_on_sqlite() {
    let Server {
        dir,
        mut server,
        pid,
        reader,
        url,
    } = Server::start(&["--node-timeout-ms", "10000"]);
    assert!(dir.path().join("data").join("starling.db").exists());

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
        .env("STARLING_INSECURE_PLAINTEXT", "1")
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

    // Per-node credentials: `node add` prints one (once), a node registers with it
    // under its name; `node revoke` shuts it out; `node list` shows no secret.
    let out = admin(&url, &["node", "add", "edge-cli"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cred = stdout(&out).trim().to_string();
    assert!(cred.starts_with("stn1.edge-cli."), "{cred:?}");
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut named = EdgeServiceClient::with_interceptor(
        channel,
        starling_controlplane::BearerInterceptor::new(&cred).unwrap(),
    );
    let reg = RegisterNodeRequest {
        node_name: "edge-cli".into(),
        wire_addr: "127.0.0.1:9001".into(),
        http_addr: "127.0.0.1:9081".into(),
        cores: 1,
        capacity_viewers: 10,
        chunk_signing_key: None,
    };
    named.register(reg.clone()).await.unwrap();
    let out = admin(&url, &["node", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("edge-cli"), "{}", stdout(&out));
    assert!(!stdout(&out).contains(&cred[14..]), "{}", stdout(&out));
    let out = admin(&url, &["node", "revoke", "edge-cli"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
    let e = named.register(reg).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

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

fn unix_ms() -> i64 {
    starling_proto::time::unix_ms_i64()
}

/// `audience` and `top` against a broadcast with three joined viewers whose quality
/// reports this test sends (timed over the next three minutes: the control plane takes
/// client times up to 5 minutes ahead), compared with the sums of those reports and
/// with `get --json`; then their errors and exit codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_and_top_show_a_broadcast_with_viewers() {
    // Long heartbeat and node timeouts: nothing here heartbeats, and nothing may expire
    // while a loaded machine runs the test.
    let srv = Server::start(&[
        "--node-timeout-ms",
        "600000",
        "--heartbeat-interval-ms",
        "600000",
    ]);
    let url = srv.url.clone();
    let key_file = srv.key_file();
    let key = std::fs::read_to_string(&key_file).unwrap();
    let run = |args: &[&str]| admin_with(&url, Some(&key_file), args);

    // A fake node that ingests the broadcast at 1000 kbps.
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut edge = EdgeServiceClient::with_interceptor(
        channel.clone(),
        starling_controlplane::BearerInterceptor::new(key.trim()).unwrap(),
    );
    let node_id = edge
        .register(RegisterNodeRequest {
            node_name: "fake".into(),
            wire_addr: "127.0.0.1:9000".into(),
            http_addr: "127.0.0.1:9080".into(),
            cores: 1,
            capacity_viewers: 100,
            chunk_signing_key: None,
        })
        .await
        .unwrap()
        .into_inner()
        .node_id;
    let mut commands = edge
        .commands(CommandsRequest {
            node_id: node_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let out = run(&[
        "create",
        "--name",
        "audience test",
        "--source",
        "http://127.0.0.1:1/live",
        "--substreams",
        "4",
        "--public",
        "--id-only",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    let out = run(&["start", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    loop {
        let cmd = tokio::time::timeout(Duration::from_secs(30), commands.next())
            .await
            .expect("no ingest command")
            .unwrap()
            .unwrap();
        if matches!(&cmd.command, Some(NodeCmd::Ingest(i)) if i.broadcast_id == id) {
            break;
        }
    }
    edge.report_health(HealthReport {
        node_id: node_id.clone(),
        ingests: vec![IngestHealth {
            broadcast_id: id.clone(),
            health: SourceHealth::Up as i32,
            content_type: "video/mp2t".into(),
            last_seq: 10,
            viewers: 3,
            bitrate_kbps: 1000,
            ..Default::default()
        }],
        viewers: 3,
    })
    .await
    .unwrap();

    // No reports yet: an empty table, and a JSON document without points.
    let out = run(&["audience", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("(no viewer reports in this range)"),
        "{}",
        stdout(&out)
    );

    // Three viewers join and report every 20 s for 180 s (client times ahead of now).
    let mut viewer = ViewerServiceClient::new(channel.clone());
    let mut sessions = Vec::new();
    for i in 0..3u16 {
        let s = viewer
            .join(JoinRequest {
                holder_key: vec![7; 32],
                broadcast_id: id.clone(),
                client_version: "cli-test".into(),
                peer_addr: format!("127.0.0.1:{}", 41_000 + i),
                upload_kbps: 2_000,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .session_id;
        sessions.push(s);
    }
    let t0 = unix_ms();
    let (mut server_total, mut peer_total) = (0u64, 0u64);
    for (i, s) in sessions.iter().enumerate() {
        let iu = i as u64;
        let reports: Vec<ViewerReport> = (1..=9u64)
            .map(|k| ViewerReport {
                report_seq: k,
                at_unix_ms: t0 + i64::try_from(k * 20_000).unwrap(),
                bytes_from_server: k * (200_000 + 10_000 * iu),
                bytes_from_peers: k * (600_000 + 50_000 * iu),
                startup_ms: 300 + 100 * u32::try_from(i).unwrap(),
                stall_ms: k * 10,
                stalls: u32::try_from(k).unwrap(),
                r#final: k == 9,
                ..Default::default()
            })
            .collect();
        server_total += 9 * (200_000 + 10_000 * iu);
        peer_total += 9 * (600_000 + 50_000 * iu);
        let acked = viewer
            .report(ReportRequest {
                session_id: s.clone(),
                reports,
            })
            .await
            .unwrap()
            .into_inner()
            .acked_seq;
        assert_eq!(acked, 9);
    }

    // JSON: the sums of the reports, per minute and in total.
    let out = run(&["audience", &id, "--to", "+10m", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(v["broadcast_id"], id.as_str());
    assert_eq!(v["step_s"], 60);
    let points = v["points"].as_array().unwrap();
    assert!((3..=30).contains(&points.len()), "{v}");
    let sum = |key: &str| -> u64 { points.iter().map(|p| p[key].as_u64().unwrap()).sum() };
    assert_eq!(sum("server_egress_bytes"), server_total, "{v}");
    assert_eq!(sum("peer_bytes"), peer_total, "{v}");
    for p in points {
        assert_eq!(p["start_unix_ms"].as_i64().unwrap() % 60_000, 0, "{p}");
        assert!(p["start"].as_str().unwrap().ends_with(":00Z"), "{p}");
    }
    let total = &v["total"];
    assert_eq!(total["server_egress_bytes"].as_u64(), Some(server_total));
    assert_eq!(total["peer_bytes"].as_u64(), Some(peer_total));
    assert_eq!(total["peak_viewers"], 3);
    assert_eq!(total["startup_p50_ms"], 400);
    assert_eq!(total["startup_p95_ms"], 500);
    let share = total["peer_share"].as_f64().unwrap();
    #[allow(clippy::cast_precision_loss)]
    let expected_share = peer_total as f64 / (peer_total + server_total) as f64;
    assert!((share - expected_share).abs() < 1e-9, "{share}");
    // Watch time: 180 s per session give or take the join (at most 30 s counted for the
    // first report).
    let watch = total["watch_time_s"].as_f64().unwrap();
    assert!(
        (3.0 * 160.0..=3.0 * 180.0 + 1.0).contains(&watch),
        "{watch}"
    );

    // The table: 5-minute steps over [-5m, +10m), then the total row.
    let out = run(&[
        "audience", &id, "--from", "-5m", "--to", "now+10m", "--step", "5m",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("START (UTC)") && lines[0].ends_with("STARTUP_P95"),
        "{text}"
    );
    for col in [
        "VIEWERS",
        "PEAK",
        "WATCH",
        "PEER_SHARE",
        "SERVER_EGRESS",
        "PEER_BYTES",
        "REBUFFER",
        "STARTUP_P50",
    ] {
        assert!(lines[0].contains(col), "{col}: {text}");
    }
    assert!((5..=6).contains(&lines.len()), "{text}");
    for row in &lines[1..lines.len() - 1] {
        assert!(
            row.starts_with("20") && row[..20].ends_with(":00Z"),
            "{row}"
        );
    }
    let total_row: Vec<&str> = lines[lines.len() - 1].split_whitespace().collect();
    assert_eq!(total_row[0], "total", "{text}");
    assert_eq!(total_row[2], "3", "peak: {text}");
    assert_eq!(
        total_row[4],
        format!("{:.1}%", expected_share * 100.0),
        "{text}"
    );
    assert!(
        lines[lines.len() - 1].ends_with("400 ms       500 ms"),
        "{text}"
    );

    // Errors: an unknown broadcast (1), a step that is not whole minutes and an empty
    // range (2, usage).
    let out = run(&["audience", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("NotFound"), "{}", stderr(&out));
    let out = run(&["audience", &id, "--step", "90s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("multiple of 60"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let out = run(&["audience", &id, "--from", "+1m", "--to", "-1m"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("empty range"), "{}", stderr(&out));
    let out = run(&["audience", &id, "--from", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("RFC 3339"), "{}", stderr(&out));

    // top --once: the grid figures get --json shows.
    let out = run(&["get", &id, "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let b: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(b["peers"], 3, "{b}");
    assert_eq!(b["stream_kbps"], 1000, "{b}");
    let out = run(&["top", "--once"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    println!("{text}");
    assert!(
        !text.contains('\x1b'),
        "escape sequences off a terminal: {text:?}"
    );
    assert!(text.starts_with("starling top  "), "{text}");
    assert!(
        text.contains("1 live broadcast: 3 peers, 3 viewers, booster "),
        "{text}"
    );
    let header = text.lines().find(|l| l.starts_with("ID ")).unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "ID",
            "HEALTH",
            "STREAM_KBPS",
            "VIEWERS",
            "PEERS",
            "PEER_SHARE",
            "SHARE_1M",
            "BOOSTER_KBPS",
            "BOUND_KBPS",
            "DEPTH",
            "NAME"
        ]
    );
    let row: Vec<&str> = text
        .lines()
        .find(|l| l.starts_with(id.as_str()))
        .unwrap_or_else(|| panic!("no row for {id}: {text}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[1], "up");
    assert_eq!(row[2], "1000");
    assert_eq!(row[3], "3");
    assert_eq!(row[4], "3");
    assert_eq!(row[7], b["booster_kbps"].to_string(), "{text}\n{b}");
    assert_eq!(row[8], b["fluid_bound_kbps"].to_string(), "{text}\n{b}");
    assert_eq!(row[9], b["max_depth"].to_string(), "{text}\n{b}");
    assert_eq!(row[10..].join(" "), "audience test");
    assert!(b["fluid_bound_kbps"].as_u64().unwrap() > 0, "{b}");

    // Repeated tables off a terminal; JSON lines.
    let out = run(&["top", "--iterations", "3", "--interval", "100ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("starling top  ").count(), 3, "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with(id.as_str())).count(),
        3
    );
    let out = run(&["top", "--json", "--iterations", "2", "--interval", "100ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["broadcasts"][0]["id"], id.as_str());
    assert_eq!(lines[1]["broadcasts"][0]["peers"], 3);

    // top's errors: bad usage (2), no credential (1, the status on stderr).
    let out = run(&["top", "--once", "--iterations", "2"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = run(&["top", "--interval", "0s", "--once"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = admin_with(&url, None, &["top", "--once"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));

    // On a terminal (a pty from util-linux `script`): full screen, given back on Ctrl-C.
    let (url2, key2, id2) = (url.clone(), key_file.clone(), id.clone());
    tokio::task::spawn_blocking(move || top_on_a_terminal(&url2, &key2, &id2))
        .await
        .unwrap();

    // A stopped broadcast leaves top.
    let out = run(&["stop", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(&["top", "--once"]);
    assert!(
        stdout(&out).contains("(no live broadcasts)"),
        "{}",
        stdout(&out)
    );

    drop(commands);
    let Server {
        mut server,
        reader,
        dir: _dir,
        ..
    } = srv;
    let _ = server.kill();
    let _ = server.wait();
    let _ = reader.join();
}

/// `top` under a pseudo-terminal: it enters the alternate screen and hides the cursor,
/// draws frames, and on Ctrl-C (the byte 0x03 typed into the terminal) shows the cursor,
/// leaves the alternate screen and exits 0. Skipped when `script` is missing.
fn top_on_a_terminal(url: &str, key_file: &std::path::Path, id: &str) {
    use std::io::{Read as _, Write as _};
    if Command::new("script").arg("--version").output().is_err() {
        let required = std::env::var("STARLING_REQUIRE_MEDIA").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "util-linux `script` is required (STARLING_REQUIRE_MEDIA=1)"
        );
        println!("SKIPPED: top on a terminal (util-linux `script` not installed)");
        return;
    }
    let admin = env!("CARGO_BIN_EXE_starling-admin");
    let mut child = Command::new("script")
        .args([
            "-qfec",
            // `exec`: no shell in between (dash, CI's /bin/sh, dies of the SIGINT that
            // top handles, and `script -e` then reports 130).
            &format!("exec {admin} top --interval 100ms"),
            "/dev/null",
        ])
        .env("STARLING_CONTROL_URL", url)
        .env("STARLING_INSECURE_PLAINTEXT", "1")
        .env("STARLING_ADMIN_KEY_FILE", key_file)
        .env_remove("STARLING_ADMIN_KEY")
        .env_remove("STARLING_ADMIN_JWT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let pump = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // Two frames, then Ctrl-C.
    while String::from_utf8_lossy(&seen).matches(id).count() < 2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(b) => seen.extend(b),
            Err(e) => {
                let _ = child.kill();
                panic!("{e:?}; top printed {:?}", String::from_utf8_lossy(&seen));
            }
        }
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&[3]).unwrap();
    stdin.flush().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("top did not end on Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(stdin);
    let _ = pump.join();
    while let Ok(b) = rx.try_recv() {
        seen.extend(b);
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(status.success(), "{status:?}: {text:?}");
    assert!(text.starts_with("\x1b[?1049h\x1b[?25l"), "{text:?}");
    assert!(text.contains("\x1b[H"), "{text:?}");
    assert!(text.contains("1 live broadcast: 3 peers"), "{text:?}");
    assert!(
        text.trim_end().ends_with("\x1b[?25h\x1b[?1049l"),
        "{text:?}"
    );
}
