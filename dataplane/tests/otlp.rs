//! OpenTelemetry export of the real `starling-dataplane` binary: its start-up and
//! shutdown spans reach an in-test OTLP/gRPC trace collector, flushed on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::ResourceSpans;
use tokio::sync::watch;

/// An OTLP trace collector keeping everything it receives.
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
        for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            out.push((service.clone(), span.name.clone()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_shutdown_spans_are_flushed_to_the_collector_on_sigterm() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let (tx, received) = watch::channel(Vec::new());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let mut child = Command::new(env!("CARGO_BIN_EXE_starling-dataplane"))
        .args(["--cores", "1", "--io-memory-kib", "256", "--log", "info"])
        .args([
            "--wire-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--otlp-endpoint", &format!("http://{collector}")])
        // A source nobody serves: the node runs (ingest retries in the background).
        .args(["--static-broadcast", "t=http://127.0.0.1:1/live.ts"])
        .env_remove("STARLING_CONTROL_URL")
        .env_remove("STARLING_STATIC_BROADCASTS")
        .env_remove("STARLING_OTLP_SERVICE_NAME")
        .env_remove("OTEL_SERVICE_NAME")
        // A batch delay of an hour: nothing is sent before the shutdown flush.
        .env("OTEL_BSP_SCHEDULE_DELAY", "3600000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (line_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = line_tx.send(line);
        }
    });
    let mut log = String::new();
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("node did not start ({e}); log:\n{log}"));
        log.push_str(&line);
        log.push('\n');
        if line.contains("wire listening on") {
            break;
        }
    }

    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    log.extend(lines.iter().map(|l| l + "\n"));
    assert!(status.success(), "exit {status:?}; log:\n{log}");

    // The node exits only after the flush was answered.
    let all = spans(&received.borrow());
    for name in ["dataplane.start", "dataplane.shutdown"] {
        assert!(
            all.contains(&("starling-dataplane".to_string(), name.to_string())),
            "{name} missing from {all:?}; log:\n{log}"
        );
    }
}
