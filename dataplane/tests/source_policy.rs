//! The source policy (SSRF guard) on a running node: a source on loopback is refused
//! unless allow-listed, by address and by name (checked after DNS resolution), and an
//! HLS playlist on an allowed address cannot redirect the node to an internal one.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use starling_dataplane::source_policy::SourcePolicy;
use starling_dataplane::{Node, SourceHealth, StaticBroadcast};

/// Waits until `id`'s source reports `want`, or the deadline; returns the last status.
fn wait_health(node: &Node, id: &str, want: SourceHealth) -> (SourceHealth, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = node.status(id);
        let now = s.as_ref().map(|s| (s.health, s.error.clone()));
        if let Some((h, e)) = &now
            && (*h == want || Instant::now() > deadline)
        {
            return (*h, e.clone());
        }
        if now.is_none() && Instant::now() > deadline {
            return (SourceHealth::Connecting, "no status".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn node(sources: &[(&str, String)], policy: SourcePolicy) -> Node {
    let sbs: Vec<StaticBroadcast> = sources
        .iter()
        .map(|(id, url)| format!("{id}={url}").parse().unwrap())
        .collect();
    let mut cfg = common::config(sbs, 1);
    cfg.source_policy = policy;
    Node::start(cfg).unwrap()
}

#[test]
fn loopback_sources_are_refused_unless_allowed() {
    let src = common::start_source();
    let port = src.port();
    let refused = node(
        &[
            ("by-addr", format!("http://{src}/live.ts")),
            ("by-name", format!("http://localhost:{port}/live.ts")),
        ],
        SourcePolicy::default(),
    );
    for id in ["by-addr", "by-name"] {
        let (h, err) = wait_health(&refused, id, SourceHealth::Down);
        assert_eq!(h, SourceHealth::Down, "{id}: {err}");
        assert!(
            err.contains("internal addresses") && err.contains("--allow-source-net"),
            "{id}: {err}"
        );
        // It stays refused: never up, nothing cut.
        std::thread::sleep(Duration::from_millis(1500));
        let s = refused.status(id).unwrap();
        assert_ne!(s.health, SourceHealth::Up, "{id}");
        assert_eq!(s.last_seq, None, "{id} cut chunks from a refused source");
    }
    refused.shutdown();

    let allowed = node(
        &[("by-name", format!("http://localhost:{port}/live.ts"))],
        SourcePolicy::with_loopback(),
    );
    let (h, err) = wait_health(&allowed, "by-name", SourceHealth::Up);
    assert_eq!(h, SourceHealth::Up, "{err}");
    allowed.shutdown();
}

/// Answers every request with a redirect to `to`.
fn redirector(to: String) -> SocketAddr {
    // 127.0.0.2 is loopback too (all of 127/8 is), but a different address to allow.
    let l = TcpListener::bind("127.0.0.2:0").unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut buf = [0u8; 2048];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    });
    a
}

#[test]
fn a_playlist_cannot_redirect_to_an_internal_address() {
    let internal = common::start_source(); // 127.0.0.1: not allowed below
    let hop = redirector(format!("http://{internal}/live.m3u8"));
    let only_hop = SourcePolicy::new(vec![hop.ip().to_string().parse().unwrap()]);
    let n = node(&[("hls", format!("http://{hop}/live.m3u8"))], only_hop);
    let (h, err) = wait_health(&n, "hls", SourceHealth::Down);
    assert_eq!(h, SourceHealth::Down, "{err}");
    assert!(err.contains("--allow-source-net"), "{err}");
    n.shutdown();
}
