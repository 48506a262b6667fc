//! The one logging setup of Starling's binaries: a tracing-subscriber `fmt` layer (text
//! or one JSON object per line, to stderr) under an `EnvFilter`, plus, with the `otlp`
//! feature and an endpoint, an OpenTelemetry layer exporting span batches over
//! OTLP/gRPC. [`init`] installs it once per process and returns a [`Guard`] that
//! flushes the exporter when dropped (or on [`Guard::shutdown`]).

/// What [`init`] sets up (built by each binary from its flags).
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `EnvFilter` directives, e.g. `info` or `starling_dataplane=debug`.
    pub filter: String,
    /// One JSON object per line (with the span fields) instead of human-readable text.
    pub json: bool,
    /// OTLP/gRPC collector to export traces to (plain `http://` only); `None`: no
    /// export. See [`otlp_endpoint`].
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported traces; `None`: `OTEL_SERVICE_NAME`, then
    /// [`LogConfig::default_service_name`].
    pub otlp_service_name: Option<String>,
    /// The binary's name: the default `service.name` and the tracer's name.
    pub default_service_name: &'static str,
}

/// Why [`init`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// The filter is not valid `EnvFilter` syntax (nothing was installed).
    #[error("bad log filter {filter:?}: {source}")]
    Filter {
        filter: String,
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// The OTLP exporter could not be built.
    #[error("--otlp-endpoint {endpoint:?}: {message}")]
    Otlp { endpoint: String, message: String },
    /// An OTLP endpoint was given to a build without the `otlp` feature.
    #[error("--otlp-endpoint {0:?}: this build has no OpenTelemetry exporter")]
    OtlpUnsupported(String),
    /// A subscriber was already installed in this process.
    #[error("logging already initialised: {0}")]
    AlreadyInitialised(String),
}

/// The OTLP endpoint from a flag, else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
/// then `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when unset, empty or `off`. (Binaries call
/// it: which environment variables count is their choice.)
pub fn otlp_endpoint(flag: Option<&str>) -> Option<String> {
    let endpoint = match flag {
        Some(s) => s.to_string(),
        None => std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .ok()?,
    };
    let endpoint = endpoint.trim();
    (!endpoint.is_empty() && !endpoint.eq_ignore_ascii_case("off")).then(|| endpoint.to_string())
}

/// Keeps the trace exporter alive; dropping it (or [`Guard::shutdown`]) flushes the
/// spans still queued, bounded to a few seconds (an unreachable collector only costs a
/// warning).
#[derive(Debug, Default)]
#[must_use = "dropping the guard stops the trace exporter"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    otlp: Option<otlp::Exporter>,
}

impl Guard {
    /// Flushes and stops the exporter now.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(e) = self.otlp.take() {
            e.shutdown();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long the final flush of the exporter may take.
#[cfg(feature = "otlp")]
const FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Installs the process's tracing subscriber as `cfg` says. The filter is checked
/// before anything is built. With an OTLP endpoint, the exporter runs on the current
/// Tokio runtime if there is one, else on a one-worker runtime of its own.
pub fn init(cfg: &LogConfig) -> Result<Guard, LoggingError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let env_filter = tracing_subscriber::EnvFilter::try_new(&cfg.filter).map_err(|source| {
        LoggingError::Filter {
            filter: cfg.filter.clone(),
            source,
        }
    })?;
    #[cfg(feature = "otlp")]
    let (exporter, otel) = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let e = otlp::Exporter::start(
                endpoint,
                cfg.otlp_service_name.as_deref(),
                cfg.default_service_name,
            )?;
            let layer = e.layer(cfg.default_service_name);
            (Some(e), Some(layer))
        }
        None => (None, None),
    };
    #[cfg(not(feature = "otlp"))]
    if let Some(endpoint) = &cfg.otlp_endpoint {
        return Err(LoggingError::OtlpUnsupported(endpoint.clone()));
    }
    let text = (!cfg.json).then(|| tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    let json = cfg.json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    let registry = tracing_subscriber::registry()
        .with(env_filter)
        .with(text)
        .with(json);
    #[cfg(feature = "otlp")]
    let registry = registry.with(otel);
    registry
        .try_init()
        .map_err(|e| LoggingError::AlreadyInitialised(e.to_string()))?;
    if let Some(endpoint) = &cfg.otlp_endpoint {
        tracing::info!(endpoint, "exporting traces over OTLP/gRPC");
    }
    Ok(Guard {
        #[cfg(feature = "otlp")]
        otlp: exporter,
    })
}

#[cfg(feature = "otlp")]
mod otlp {
    //! The OTLP/gRPC span exporter behind [`super::init`].

    use super::{FLUSH_TIMEOUT, LoggingError};
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::Layer as _;

    /// Batches are sent from the batch processor's thread over a gRPC channel driven by
    /// the caller's Tokio runtime, or (`runtime`) by a one-worker runtime of its own.
    #[derive(Debug)]
    pub(super) struct Exporter {
        provider: SdkTracerProvider,
        runtime: Option<tokio::runtime::Runtime>,
    }

    impl Exporter {
        pub(super) fn start(
            endpoint: &str,
            service_name: Option<&str>,
            default_service_name: &str,
        ) -> Result<Exporter, LoggingError> {
            use opentelemetry_otlp::WithExportConfig as _;
            let err = |message: String| LoggingError::Otlp {
                endpoint: endpoint.to_string(),
                message,
            };
            let runtime = match tokio::runtime::Handle::try_current() {
                Ok(_) => None,
                Err(_) => Some(
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(1)
                        .thread_name("otlp-export")
                        .enable_all()
                        .build()
                        .map_err(|e| err(format!("OTLP export runtime: {e}")))?,
                ),
            };
            let exporter = {
                let _rt = runtime.as_ref().map(tokio::runtime::Runtime::enter);
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .with_endpoint(endpoint)
                    .build()
                    .map_err(|e| err(e.to_string()))?
            };
            let service_name = service_name
                .map(str::to_string)
                .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
                .unwrap_or_else(|| default_service_name.to_string());
            let provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name(service_name)
                        .build(),
                )
                .build();
            Ok(Exporter { provider, runtime })
        }

        /// The tracing layer feeding this exporter. The exporter's own transport
        /// (tonic/h2/hyper) is never traced: at debug level each export would produce
        /// spans to export.
        pub(super) fn layer<S>(
            &self,
            tracer_name: &'static str,
        ) -> impl tracing_subscriber::Layer<S>
        where
            S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
        {
            tracing_opentelemetry::layer()
                .with_tracer(self.provider.tracer(tracer_name))
                .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                    !["h2", "hyper", "tonic", "tower", "opentelemetry"]
                        .iter()
                        .any(|t| m.target().starts_with(t))
                }))
        }

        /// Flushes the spans still queued and stops the exporter (bounded).
        pub(super) fn shutdown(self) {
            if let Err(e) = self.provider.shutdown_with_timeout(FLUSH_TIMEOUT) {
                tracing::warn!(error = %e, "OTLP trace export: final flush failed");
            }
            if let Some(rt) = self.runtime {
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            }
        }
    }
}
