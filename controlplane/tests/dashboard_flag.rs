//! `starling-controlplane --dashboard-listen 127.0.0.1:0` serves the dashboard and says
//! where; its API answers 401 without the zero-setup admin key and 200 with it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `GET path` with an optional bearer token; returns the status code and the body.
fn get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = bearer
        .map(|b| format!("Authorization: Bearer {b}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

#[test]
fn the_binary_serves_the_dashboard_behind_the_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut server = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
        .env("STARLING_INSECURE_PLAINTEXT", "1")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "off",
            "--dashboard-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("DATABASE_URL")
        .env_remove("STARLING_ADMIN_KEY")
        .env_remove("STARLING_ADMIN_JWT_KEYS")
        .env_remove("STARLING_DASHBOARD_LISTEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = server.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line
                .split("starling-controlplane: dashboard on http://")
                .nth(1)
            {
                let addr = rest.split('/').next().unwrap_or_default().to_string();
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(60));
    let result = std::panic::catch_unwind(|| {
        let addr = addr.expect("the server did not print the dashboard's address");
        let (status, body) = get(&addr, "/", None);
        assert_eq!(status, 200);
        assert!(body.contains("dashboard.js"), "{body}");
        let (status, body) = get(&addr, "/api/broadcasts", None);
        assert_eq!(status, 401, "{body}");
        let key = std::fs::read_to_string(data.join("admin.key")).unwrap();
        let (status, body) = get(&addr, "/api/broadcasts", Some(key.trim()));
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["broadcasts"].as_array().map(Vec::len), Some(0), "{body}");
    });
    let _ = server.kill();
    let _ = server.wait();
    let _ = reader.join();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
