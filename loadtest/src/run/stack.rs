//! The deployment a run drives ([`Stack`]): the synthetic source, the control plane
//! (embedded SQLite) and a data-plane child process started here, or an existing
//! control plane and broadcast ([`super::External`]).

use super::config::RunConfig;
use super::dataplane::scrape_wire_egress;
use crate::deployment::{AdminClient, admin_client};
use crate::error::HarnessError;
use crate::source::{SourceConfig, SyntheticSource};
use starling_controlplane::{ControlPlane, ControlPlaneHandle, DatabaseConfig, ServiceConfig};
use starling_proto::v1::{BroadcastRef, CreateBroadcastRequest, SourceHealth};
use std::io::{BufRead, BufReader as StdBufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// The deployment a run drives.
pub(super) struct Stack {
    pub(super) control_url: String,
    pub(super) transport: starling_proto::transport::Transport,
    pub(super) broadcast_id: String,
    /// Delivered stream rate measured by the data plane (see [`RunReport::stream_kbps`]).
    pub(super) stream_kbps: Option<u32>,
    pub(super) admin: Option<AdminClient>,
    pub(super) pattern_seed: Option<u64>,
    pub(super) metrics_url: Option<(String, String)>,
    pub(super) local: Option<LocalStack>,
}

pub(super) struct LocalStack {
    _source: SyntheticSource,
    control: ControlPlaneHandle,
    dataplane: Child,
    _dir: tempfile::TempDir,
}

pub(super) const SOURCE_SEED: u64 = 0x5eed_0006;

pub(super) fn exe(cfg: &RunConfig) -> Result<PathBuf, HarnessError> {
    match &cfg.exe {
        Some(p) => Ok(p.clone()),
        None => std::env::current_exe()
            .map_err(|e| HarnessError::Start(format!("current executable: {e}"))),
    }
}

/// `http://host:port` → (`host:port`, host).
pub(super) fn split_http(url: &str) -> Option<(String, String)> {
    let rest = url.strip_prefix("http://")?;
    let hostport = rest.split('/').next()?.to_owned();
    let host = hostport
        .rsplit_once(':')
        .map_or(hostport.clone(), |(h, _)| h.to_owned());
    Some((hostport, host))
}

impl Stack {
    pub(super) async fn start(cfg: &RunConfig) -> Result<Stack, HarnessError> {
        if let Some(ext) = &cfg.external {
            let admin = match &ext.admin_key {
                Some(k) => Some(admin_client(&ext.control_url, k, &ext.transport).await?),
                None => None,
            };
            return Ok(Stack {
                control_url: ext.control_url.clone(),
                transport: ext.transport.clone(),
                broadcast_id: ext.broadcast_id.clone(),
                stream_kbps: None,
                admin,
                pattern_seed: None,
                metrics_url: ext.dataplane_http.as_deref().and_then(split_http),
                local: None,
            });
        }
        let source = SyntheticSource::start(SourceConfig {
            bitrate_kbps: cfg.bitrate_kbps,
            seed: SOURCE_SEED,
            ..SourceConfig::default()
        })
        .await
        .map_err(|e| HarnessError::Start(format!("synthetic source: {e}")))?;
        let dir = tempfile::Builder::new()
            .prefix("starling-run-")
            .tempdir()
            .map_err(|e| HarnessError::Start(format!("temporary directory: {e}")))?;
        let mut cp = starling_controlplane::Config::new(
            ([127, 0, 0, 1], 0).into(),
            DatabaseConfig::Sqlite {
                path: dir.path().join("starling.db"),
            },
        );
        let admin_key = cp.auth.admin_key.clone().unwrap_or_default();
        cp.service = ServiceConfig {
            heartbeat_interval: cfg.heartbeat,
            ..ServiceConfig::default()
        };
        if cfg.net == super::Net::Sim {
            // Simulated peers share HTTP/2 connections from one address: the
            // advertised-address check and the per-address limits cannot hold.
            use starling_controlplane::limits::RateLimit;
            cp.service.trust.peer_addr_check = starling_controlplane::trust::PeerAddrCheck::Off;
            cp.service.limits.join = RateLimit::per_second(0.0, 1);
            cp.service.limits.unknown_session_lookups = RateLimit::per_second(0.0, 1);
        }
        // gRPC over TLS with a throwaway CA; the data-plane child trusts its root
        // through --ca-file, the workers through their hello.
        let tls = crate::tls::ThrowawayTls::new()?;
        cp.tls = Some(tls.server_tls());
        let transport = tls.transport();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, tls.root_pem())
            .map_err(|e| HarnessError::Start(format!("writing {}: {e}", ca_file.display())))?;
        let control = ControlPlane::bind(cp)
            .await
            .map_err(|e| HarnessError::Start(format!("control plane: {e}")))?
            .spawn();
        let control_url = control.url();

        // The data plane in a child process of this executable.
        let capacity = (cfg.peers.max(1000) * 2).to_string();
        let mut child = Command::new(exe(cfg)?)
            .args([
                "dataplane",
                "--control",
                &control_url,
                "--cores",
                &cfg.dataplane_cores.max(1).to_string(),
                "--capacity-viewers",
                &capacity,
            ])
            .arg("--ca-file")
            .arg(&ca_file)
            // The node key travels in the environment, not on the command line.
            .env("STARLING_NODE_KEY", &admin_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| HarnessError::Start(format!("data-plane process: {e}")))?;
        let stdout = child.stdout.take();
        let ready = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            if let Some(out) = stdout {
                let _ = StdBufReader::new(out).read_line(&mut line);
            }
            line
        });
        let line = match tokio::time::timeout(Duration::from_secs(30), ready).await {
            Ok(Ok(l)) => l,
            _ => String::new(),
        };
        let http = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .map(str::to_owned);
        let Some(http) = http else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HarnessError::Start(format!(
                "data-plane process did not start (said {line:?})"
            )));
        };
        let local = LocalStack {
            _source: source,
            control,
            dataplane: child,
            _dir: dir,
        };
        let mut admin = admin_client(&control_url, &admin_key, &transport).await?;
        let source_url = local._source.url();
        let created = admin
            .create_broadcast(CreateBroadcastRequest {
                name: "loadtest-run".into(),
                source_url,
                chunk_duration_ms: cfg.chunk_ms,
                substreams: cfg.substreams,
                public: true,
            })
            .await
            .map_err(|s| HarnessError::Admin(format!("CreateBroadcast: {}", s.message())))?
            .into_inner();
        // The node registers on its own; StartBroadcast needs an alive node.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match admin
                .start_broadcast(BroadcastRef {
                    id: created.id.clone(),
                })
                .await
            {
                Ok(_) => break,
                Err(s) if Instant::now() >= deadline => {
                    return Err(HarnessError::Admin(format!(
                        "StartBroadcast: {}",
                        s.message()
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let mut stack = Stack {
            control_url,
            transport,
            broadcast_id: created.id.clone(),
            stream_kbps: None,
            admin: Some(admin),
            pattern_seed: cfg.check_identity.then_some(SOURCE_SEED),
            metrics_url: split_http(&format!("http://{http}")),
            local: Some(local),
        };
        stack.stream_kbps = stack.wait_live().await?;
        Ok(stack)
    }

    /// Waits until the broadcast is live and returns its delivered stream rate once the
    /// data plane has measured it over at least a second of chunks (`None` if it has not
    /// within the wait).
    pub(super) async fn wait_live(&self) -> Result<Option<u32>, HarnessError> {
        let Some(admin) = &self.admin else {
            return Ok(None);
        };
        let mut live_at: Option<Instant> = None;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let b = admin
                .clone()
                .get_broadcast(BroadcastRef {
                    id: self.broadcast_id.clone(),
                })
                .await
                .map_err(|s| HarnessError::Admin(format!("GetBroadcast: {}", s.message())))?
                .into_inner();
            if b.source_health == SourceHealth::Up as i32
                && b.last_seq >= 1
                && !b.node_wire_addr.is_empty()
            {
                let since = *live_at.get_or_insert_with(Instant::now);
                // The rate is a window average the data plane reports with its
                // heartbeat: wait for one covering a second of chunks, or give up on
                // it after 5 s (the budgets then use the payload rate).
                if b.stream_kbps > 0 && b.last_seq >= 4 {
                    return Ok(Some(b.stream_kbps));
                }
                if since.elapsed() >= Duration::from_secs(5) {
                    tracing::warn!("no measured stream rate; budgets use the payload bitrate");
                    return Ok(None);
                }
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Start(format!(
                    "broadcast {} not live after 30 s (health {}, error {:?}, last_seq {})",
                    b.id, b.source_health, b.source_error, b.last_seq
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) async fn egress(&self) -> Option<u64> {
        let (hostport, host) = self.metrics_url.as_ref()?;
        scrape_wire_egress(hostport, host).await
    }

    pub(super) async fn grid(&self) -> Option<serde_json::Value> {
        let admin = self.admin.as_ref()?;
        let b = admin
            .clone()
            .get_broadcast(BroadcastRef {
                id: self.broadcast_id.clone(),
            })
            .await
            .ok()?
            .into_inner();
        Some(serde_json::json!({
            "peers": b.peers,
            "demand_slots": b.demand_slots,
            "peer_supply_slots": b.peer_supply_slots,
            "booster_slots": b.booster_slots,
            "booster_kbps": b.booster_kbps,
            "fluid_bound_kbps": b.fluid_bound_kbps,
            "peer_share": b.peer_share,
            "max_depth": b.max_depth,
        }))
    }

    pub(super) fn dataplane_pid(&self) -> Option<u32> {
        self.local.as_ref().map(|l| l.dataplane.id())
    }

    pub(super) async fn shutdown(self) {
        if let Some(mut local) = self.local {
            // Closing its stdin stops the data-plane process.
            drop(local.dataplane.stdin.take());
            let mut child = local.dataplane;
            let waited = tokio::task::spawn_blocking(move || {
                for _ in 0..100 {
                    if let Ok(Some(_)) = child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
            });
            let _ = waited.await;
            let _ = tokio::time::timeout(Duration::from_secs(15), local.control.shutdown()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_url_host() {
        assert_eq!(
            split_http("http://127.0.0.1:7180/x"),
            Some(("127.0.0.1:7180".into(), "127.0.0.1".into()))
        );
    }
}
