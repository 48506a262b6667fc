//! Real media through the SDK: an MPEG-TS stream made by ffmpeg goes through the in-test
//! data plane, the SDK, and then (a) the local HTTP endpoint into ffmpeg, (b) the
//! `starling-play` binary's stdout. Both must decode with zero errors. Skipped when
//! ffmpeg is not installed, except where media tests are required (`CI=true` or
//! `STARLING_REQUIRE_MEDIA=1`): there a missing ffmpeg fails them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{Fixture, Script, ts_chunks};
use starling_sdk::{Viewer, ViewerConfig};
use tokio::sync::Semaphore;

const GUARD: Duration = Duration::from_secs(60);

/// Whether a missing ffmpeg must fail the tests instead of skipping them.
fn media_required() -> bool {
    let on = |name: &str| {
        std::env::var(name).is_ok_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
    };
    on("CI") || on("STARLING_REQUIRE_MEDIA")
}

/// Two seconds of MPEG-TS made by ffmpeg; `None` (skip) only when ffmpeg is not
/// installed and media tests are not required. An ffmpeg that runs and fails panics.
fn make_ts() -> Option<Vec<u8>> {
    let result = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=25",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:sample_rate=44100",
            "-t",
            "2",
            "-c:v",
            "mpeg2video",
            "-g",
            "25",
            "-c:a",
            "mp2",
            "-f",
            "mpegts",
            "-",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output();
    let out = match result {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !media_required() => {
            eprintln!("ffmpeg not available: skipped");
            return None;
        }
        Err(e) => {
            let why = if media_required() {
                " (media tests are required: CI=true or STARLING_REQUIRE_MEDIA=1)"
            } else {
                ""
            };
            panic!("cannot run ffmpeg: {e}{why}; install it (Debian package `ffmpeg`)")
        }
    };
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "ffmpeg could not make the test stream: {}",
        out.status
    );
    Some(out.stdout)
}

fn ts_script(ts: &[u8]) -> Script {
    let mut script = Script::numbered("ts", 0);
    script.chunks = ts_chunks(ts, 40);
    assert!(
        script.chunks.len() < 64,
        "must fit the SDK's default history"
    );
    script
}

#[tokio::test]
async fn ffmpeg_decodes_the_local_http_stream_without_errors() {
    let Some(ts) = make_ts() else {
        return;
    };
    let mut script = ts_script(&ts);
    let gate = Arc::new(Semaphore::new(0));
    script.goodbye = Some(gate.clone());
    let fx = Fixture::start(script).await;
    let mut cfg = ViewerConfig::new("ts");
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let viewer = Viewer::connect_direct(fx.addr.to_string(), cfg)
        .await
        .unwrap();
    let url = viewer.local_url().unwrap();
    let ffmpeg = tokio::task::spawn_blocking(move || {
        Command::new("ffmpeg")
            .args(["-v", "error", "-i", &url, "-f", "null", "-"])
            .stdin(Stdio::null())
            .output()
    });
    // End the broadcast once ffmpeg is attached, so that its input ends.
    tokio::time::timeout(GUARD, async {
        while viewer.stats().consumers == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("ffmpeg never connected");
    gate.add_permits(1);
    let out = tokio::time::timeout(GUARD, ffmpeg)
        .await
        .expect("ffmpeg hung")
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ffmpeg failed: {stderr}");
    assert!(stderr.trim().is_empty(), "decode errors: {stderr}");
}

#[cfg(unix)]
#[tokio::test]
async fn starling_play_writes_decodable_media_to_stdout_and_exits_on_sigint() {
    use std::io::Read;
    let Some(ts) = make_ts() else {
        return;
    };
    let fx = Fixture::start(ts_script(&ts)).await;
    let addr = fx.addr.to_string();
    let expected = ts.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling-play"))
            .args(["--broadcast", "ts", "--dataplane", &addr, "-o", "-"])
            .env_remove("STARLING_CONTROL_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut got = vec![0u8; expected.len()];
        stdout.read_exact(&mut got).unwrap();
        // Ctrl-C.
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).unwrap();
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        (got, rest, status, stderr)
    });
    let (got, rest, status, stderr) = tokio::time::timeout(GUARD, out)
        .await
        .expect("starling-play hung")
        .unwrap();
    assert!(got == ts, "stdout differs from the stream");
    assert!(rest.is_empty(), "extra bytes on stdout");
    assert!(status.success(), "exit status {status}: {stderr}");
    assert!(
        stderr.contains("starling-play: playing broadcast ts at http://127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("played"), "no stats line: {stderr}");
    // The bytes decode cleanly.
    let dir = std::env::temp_dir().join(format!("starling-play-{}.ts", std::process::id()));
    std::fs::write(&dir, &got).unwrap();
    let probe = Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(&dir)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&dir);
    let perr = String::from_utf8_lossy(&probe.stderr);
    assert!(probe.status.success() && perr.trim().is_empty(), "{perr}");
}
