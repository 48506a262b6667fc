//! OpenTelemetry export of the real `starling-controlplane` binary: an in-test OTLP/gRPC
//! trace collector receives its spans (periodic batches while it runs, and the queued
//! ones flushed on SIGTERM), and an unreachable collector never stops the server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use starling_controlplane::BearerInterceptor;
use starling_proto::v1::admin_service_client::AdminServiceClient;
use starling_proto::v1::{BroadcastRef, CreateBroadcastRequest, ListBroadcastsRequest};
use tokio::sync::watch;

const ADMIN_KEY: &str = "otlp-test-admin-key-0123456789";
/// Generous bound on anything awaited (startup, an export batch); never asserted on.
const PATIENCE: Duration = Duration::from_secs(60);

/// An OTLP trace collector keeping everything it receives.
#[derive(Clone)]
struct Collector(watch::Sender<Vec<ResourceSpans>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let spans = request.into_inner().resource_spans;
        self.0.send_modify(|all| all.extend(spans));
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn start_collector() -> (SocketAddr, watch::Receiver<Vec<ResourceSpans>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = watch::channel(Vec::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, rx)
}

/// (service.name, span name) of every span received.
fn spans(all: &[ResourceSpans]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for rs in all {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                Value::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                out.push((service.clone(), span.name.clone()));
            }
        }
    }
    out
}

/// The binary under test, its stderr read line by line on a thread.
struct Server {
    child: Child,
    lines: mpsc::Receiver<String>,
    log: String,
}

impl Server {
    fn start(data_dir: &std::path::Path, otlp_args: &[&str], bsp_delay_ms: u64) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling-controlplane"))
            .env("STARLING_INSECURE_PLAINTEXT", "1")
            .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
            .args(["--admin-key", ADMIN_KEY])
            .arg("--data-dir")
            .arg(data_dir)
            .args(otlp_args)
            .env_remove("DATABASE_URL")
            .env_remove("STARLING_ADMIN_JWT_KEYS")
            .env_remove("STARLING_OTLP_ENDPOINT")
            .env_remove("STARLING_OTLP_SERVICE_NAME")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .env("OTEL_BSP_SCHEDULE_DELAY", bsp_delay_ms.to_string())
            .env("STARLING_LOG", "info")
            .env("STARLING_LOG_FORMAT", "text")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Server {
            child,
            lines,
            log: String::new(),
        }
    }

    /// Waits for a stderr line containing `needle`; returns it.
    fn wait_line(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(PATIENCE) {
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

    fn url(&mut self) -> String {
        let line = self.wait_line("listening on ");
        let addr = line
            .split("listening on ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap();
        format!("http://{addr}")
    }

    /// SIGTERM, then the exit status must be success; returns the whole log.
    async fn stop(mut self) -> String {
        let kill = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        let mut child = self.child;
        let status = tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap();
        // The reader thread ends at EOF (the process is gone).
        while let Ok(line) = self.lines.recv_timeout(PATIENCE) {
            self.log.push_str(&line);
            self.log.push('\n');
        }
        assert!(status.success(), "exit {status:?}; log:\n{}", self.log);
        self.log
    }
}

/// A few admin calls through the exporting server.
async fn admin_calls(url: &str) {
    let channel = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin =
        AdminServiceClient::with_interceptor(channel, BearerInterceptor::new(ADMIN_KEY).unwrap());
    let b = admin
        .create_broadcast(CreateBroadcastRequest {
            name: "otlp".into(),
            source_url: "http://127.0.0.1:1/live".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let got = admin
        .get_broadcast(BroadcastRef { id: b.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.id, b.id);
    let list = admin
        .list_broadcasts(ListBroadcastsRequest {
            include_stopped: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(list.broadcasts.iter().any(|x| x.id == b.id), "{list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_the_collector_in_batches_while_serving() {
    let (collector, mut received) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{collector}");
    let mut server = Server::start(dir.path(), &["--otlp-endpoint", &endpoint], 100);
    let url = server.url();
    admin_calls(&url).await;

    // Exported by the periodic batch, the server still running.
    let got = tokio::time::timeout(
        PATIENCE,
        received.wait_for(|all| spans(all).iter().any(|(_, n)| n == "controlplane.start")),
    )
    .await
    .is_ok();
    let all = spans(&received.borrow());
    assert!(got, "spans received: {all:?}; log:\n{}", server.log);
    assert!(
        all.iter()
            .all(|(service, _)| service == "starling-controlplane"),
        "{all:?}"
    );
    // Still serving with the exporter on.
    admin_calls(&url).await;

    let log = server.stop().await;
    assert!(log.contains("exporting traces over OTLP"), "{log}");
    assert!(!log.contains("ExportError"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_spans_are_flushed_on_sigterm_under_the_configured_service_name() {
    let (collector, received) = start_collector().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{collector}");
    // A batch delay of an hour: nothing is sent before the shutdown flush.
    let mut server = Server::start(
        dir.path(),
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-service-name",
            "cp-under-test",
        ],
        3_600_000,
    );
    let url = server.url();
    admin_calls(&url).await;
    server.stop().await;
    // The server exits only after the flush was answered.
    let all = spans(&received.borrow());
    assert!(
        all.contains(&(
            "cp-under-test".to_string(),
            "controlplane.start".to_string()
        )),
        "{all:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_is_logged_and_never_stops_the_server() {
    // A port nobody listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{closed}");
    let mut server = Server::start(dir.path(), &["--otlp-endpoint", &endpoint], 100);
    let url = server.url();
    // The SDK reports the failed batch export in the log (internal-logs)...
    server.wait_line("ExportError");
    // ...and the server keeps serving, then stops cleanly.
    admin_calls(&url).await;
    server.stop().await;
}
