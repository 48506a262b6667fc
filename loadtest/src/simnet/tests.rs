//! The fabric alone, in real time: the in-process server and control plane.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tokio::sync::mpsc;

use super::fabric::Fabric;
use super::msg::{FabricConfig, ServerMode};
use super::{SimNetConfig, local};
use crate::pattern::Pattern;
use crate::swarm::UploadProfile;

/// 300 viewers (a third not relaying, mean upload 1.25×) join at once and play for
/// at least 10 s of stream each: every one joins, plays what it is due, every played
/// byte is the source's, and the peers carry most of the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_peers_play_the_source() {
    let net = SimNetConfig::new(64, 4, Duration::from_millis(250));
    let (up_tx, up_rx) = mpsc::channel(65_536);
    let fabric = Fabric::spawn(
        FabricConfig {
            net,
            upload: UploadProfile::mixed(),
            index_offset: 0,
            pattern: Some(Pattern::new(7)),
            server: ServerMode::InProcess,
        },
        up_tx,
    );
    let cp = local::spawn(64, 4, up_rx, fabric.sender()).unwrap();
    fabric.add(300).await;
    // 10 s of stream is 40 chunks: wait until every viewer has been due 40 beyond
    // its start-up (conditions only; the bound is generous).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let snap = loop {
        let snap = fabric.snapshot(true).await.unwrap();
        let done = snap.records.len() == 300
            && snap
                .records
                .iter()
                .all(|r| r.chunks_played + r.chunks_skipped >= 40);
        if done || tokio::time::Instant::now() > deadline {
            break snap;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let s = &snap.sample;
    eprintln!(
        "active {} played {} skipped {} share {:.3} continuity {:.4} net {:?} errors {:?}",
        s.active,
        s.chunks_played,
        s.chunks_skipped,
        snap.peer_share(),
        snap.continuity(),
        snap.net,
        snap.errors
    );
    let mut by_upload: std::collections::BTreeMap<u32, (u64, u64, u64, u64, usize)> =
        std::collections::BTreeMap::new();
    for r in &snap.records {
        let e = by_upload.entry(r.upload_kbps).or_default();
        e.0 += r.chunks_played;
        e.1 += r.chunks_skipped;
        e.2 += r.bytes_from_server;
        e.3 += r.bytes_from_peers;
        e.4 += 1;
    }
    eprintln!("by upload (played, skipped, server, peers, n): {by_upload:?}");
    let worst: Vec<_> = snap
        .records
        .iter()
        .filter(|r| r.chunks_played < 30)
        .take(5)
        .collect();
    eprintln!("worst: {worst:?}");
    assert_eq!(s.active, 300, "every viewer joined and stayed");
    assert!(
        snap.records.iter().all(|r| r.chunks_played >= 30),
        "every viewer plays"
    );
    assert_eq!(s.not_identical, 0, "every played byte is the source's");
    assert_eq!(snap.played_without_bytes, 0);
    assert!(s.output_bytes >= 300 * 30 * 2000, "bytes were checked");
    assert!(
        snap.continuity() >= 0.995,
        "continuity {}",
        snap.continuity()
    );
    assert!(snap.peer_share() >= 0.9, "peer share {}", snap.peer_share());
    fabric.stop().await;
    cp.await.unwrap();
}
