//! Telemetry shared by Starling's two servers (control plane and data plane).
//!
//! * [`prom`]: the one Prometheus text exposition writer (format 0.0.4): families with
//!   `# HELP`/`# TYPE`, label-value escaping, counters, gauges, histograms. No
//!   dependency; what to expose stays in each server's `metrics` module.
//! * `logging` (feature `logging`): the one tracing-subscriber setup (text or JSON to
//!   stderr, an `EnvFilter`), with an optional OpenTelemetry OTLP/gRPC exporter
//!   (feature `otlp`). Only binaries call it.

#[cfg(feature = "logging")]
pub mod logging;
pub mod prom;
