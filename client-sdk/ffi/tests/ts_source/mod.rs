//! A live MPEG-TS source for the tests: ffmpeg encodes a test pattern (H.264 with a
//! 1 s GOP, AAC) in real time to a pipe, and a small HTTP/1.1 server hands every client
//! the stream from the live position on (`Content-Type: video/mp2t`, a body that ends
//! when the connection does), always on a 188-byte packet boundary.

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

const TS_PACKET: usize = 188;

/// The running source; dropping it stops ffmpeg and the server.
pub struct TsSource {
    addr: SocketAddr,
    ffmpeg: Child,
    server: JoinHandle<()>,
}

impl TsSource {
    /// Starts ffmpeg and the server on a free loopback port.
    pub async fn start() -> TsSource {
        let mut ffmpeg = Command::new("ffmpeg")
            .args(["-nostdin", "-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "testsrc=size=320x240:rate=25"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100"])
            .args([
                "-c:v",
                "libx264",
                "-preset",
                "ultrafast",
                "-tune",
                "zerolatency",
            ])
            .args(["-g", "25", "-pix_fmt", "yuv420p", "-b:v", "300k"])
            .args(["-c:a", "aac", "-b:a", "64k", "-f", "mpegts", "pipe:1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start ffmpeg");
        let mut stdout = ffmpeg.stdout.take().expect("ffmpeg stdout");
        let (tx, _) = broadcast::channel::<Bytes>(1024);
        let feed = tx.clone();
        // Whole packets only, so that a client joining at any moment starts on one.
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut carry: Vec<u8> = Vec::new();
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                carry.extend_from_slice(&buf[..n]);
                let whole = carry.len() / TS_PACKET * TS_PACKET;
                if whole > 0 {
                    let rest = carry.split_off(whole);
                    // No client yet is fine: the stream is live.
                    let _ = feed.send(Bytes::from(std::mem::replace(&mut carry, rest)));
                }
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let server = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, tx.subscribe()));
            }
        });
        TsSource {
            addr,
            ffmpeg,
            server,
        }
    }

    /// The stream's URL.
    pub fn url(&self) -> String {
        format!("http://{}/live.ts", self.addr)
    }
}

impl Drop for TsSource {
    fn drop(&mut self) {
        self.server.abort();
        let _ = self.ffmpeg.kill();
        let _ = self.ffmpeg.wait();
    }
}

/// One client: reads its request head, then streams until it goes away or falls
/// behind (it then reconnects and resumes at the live position).
async fn serve(mut conn: TcpStream, mut rx: broadcast::Receiver<Bytes>) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 16 * 1024 {
            return;
        }
    }
    let response = "HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n";
    if conn.write_all(response.as_bytes()).await.is_err() {
        return;
    }
    while let Ok(b) = rx.recv().await {
        if conn.write_all(&b).await.is_err() {
            return;
        }
    }
}
