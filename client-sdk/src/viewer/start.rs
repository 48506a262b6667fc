//! Starting a viewer: `Join` through the control plane or connect straight to a data
//! plane, open the first data-plane connection, build the shared state, and spawn the
//! tasks (HTTP endpoint, session upkeep, reports, and either the plain receiver or the
//! peer-grid relay engine).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use starling_proto::wire::StartAt;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::config::{ViewerConfig, report_interval};
use super::handle::Viewer;
use super::peer_listener::{RelayPrep, prepare_relay};
use super::receiver::{Receiver, Target, open_conn};
use super::session::{Upkeep, upkeep};
use crate::conn::WireConn;
use crate::control::{Control, JoinInfo, Offer};
use crate::error::SdkError;
use crate::http;
use crate::hub::{Hub, HubLimits};
use crate::reorder::ReorderBuffer;
use crate::report_queue::Baseline;
use crate::rights::{OwnToken, Rights};
use crate::shared::{Session, Shared};

impl Viewer {
    /// Joins `config.broadcast_id` through the control plane at `config.control_url`,
    /// connects to the data-plane node it names and subscribes at the live edge.
    /// Returns once the data plane has accepted the subscription (`STREAM_INFO`);
    /// refusals (unknown broadcast, no rights...) come back as typed errors.
    ///
    /// With a grid assignment (a control plane that returns parents), the viewer also
    /// relays: it listens for peer connections ([`ViewerConfig::relay`]), receives each
    /// substream from its assigned parent, repairs gaps from mesh neighbours and plays
    /// out [`ViewerConfig::target_lag`] behind live. Without one (an older control
    /// plane), it receives the whole stream from the data plane as before.
    pub async fn join(mut config: ViewerConfig) -> Result<Viewer, SdkError> {
        config.validate()?;
        if config.holder.is_none() {
            let key = starling_proto::holder::HolderKey::generate()
                .map_err(|e| SdkError::Config(format!("cannot make a holder key: {e}")))?;
            config.holder = Some(Arc::new(key));
        }
        let started = Instant::now();
        let listener = bind_http(&config).await?;
        let RelayPrep {
            listener: peer_listener,
            offer,
            mapping,
        } = prepare_relay(&config).await?;
        let mut control_options = config.control_options(crate::control::control_bind_ip(
            config.relay.listen.ip(),
            &config.control_url,
        ));
        // The control plane observes the peer listener port's public mapping (hole
        // punching, [`crate::punch`]).
        control_options.bind_from = peer_listener.as_ref().and_then(|l| l.local_addr().ok());
        let control = match Control::new(
            &config.control_url,
            &config.broadcast_id,
            config.credential.as_deref(),
            &config.client_version,
            &control_options,
        ) {
            Ok(c) => c,
            Err(e) => {
                unmap(mapping).await;
                return Err(e);
            }
        };
        let join = match control.join(&offer).await {
            Ok(j) => j,
            Err(e) => {
                unmap(mapping).await;
                return Err(e);
            }
        };
        let target = Target {
            wire_addr: join.wire_addr.clone(),
        };
        let grid = !join.assignment.parents.is_empty();
        let k = grid_substreams(&join);
        let first_mask = if grid {
            first_dp_mask(&join, k)
        } else {
            starling_proto::wire::ALL_SUBSTREAMS
        };
        let first = match open_conn(&config, &target, &join.token, StartAt::Live, first_mask).await
        {
            Ok(c) => c,
            Err(e) => {
                let _ =
                    tokio::time::timeout(config.connect_timeout, control.leave(&join.session_id))
                        .await;
                unmap(mapping).await;
                return Err(e);
            }
        };
        if !grid {
            drop(peer_listener);
            unmap(mapping).await;
            return Ok(Viewer::start(
                config,
                started,
                listener,
                Some((control, join)),
                target,
                first,
            ));
        }
        Viewer::start_grid(
            config,
            started,
            listener,
            control,
            join,
            offer,
            peer_listener,
            mapping,
            first,
            first_mask,
            k,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn start_grid(
        config: ViewerConfig,
        started: Instant,
        listener: Option<TcpListener>,
        control: Control,
        join: JoinInfo,
        offer: Offer,
        peer_listener: Option<TcpListener>,
        mapping: Option<crate::portmap::PortMapping>,
        first: WireConn,
        first_mask: u64,
        k: u16,
    ) -> Result<Viewer, SdkError> {
        let shared = new_shared(&config, started, Some(&join));
        shared.stats_mut().peer_id = Some(join.peer_id);
        let report_every = report_interval(&config, &join);
        let mut tasks = Vec::new();
        let local_addr = spawn_http(listener, &shared, &mut tasks);
        let chunk_ms = join
            .params
            .as_ref()
            .map(|p| p.chunk_duration_ms)
            .filter(|&ms| ms > 0)
            .unwrap_or(if first.info.chunk_duration_ms > 0 {
                first.info.chunk_duration_ms
            } else {
                1000
            });
        tracing::info!(
            peer_id = join.peer_id,
            substreams = k,
            chunk_ms,
            child_slots = join.child_slots,
            stream_kbps = join.stream_kbps,
            peer_addr = offer.peer_addr,
            "joined the peer grid"
        );
        let peer_addr = (!offer.peer_addr.is_empty()).then(|| offer.peer_addr.clone());
        let seed = join.assignment.clone();
        // Hole punching towards children, when the control plane asks (we are then
        // reachable only that way): links it opens go to the peer listener.
        let (punched_tx, punched_rx) = tokio::sync::mpsc::channel(crate::punch::PUNCHED_QUEUE);
        let puncher = peer_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|local| crate::punch::Puncher::new(local, punched_tx));
        let (events, engine_tasks) = crate::relay::start(crate::relay::GridSetup {
            shared: shared.clone(),
            control: control.clone(),
            join,
            offer,
            first,
            first_mask,
            listener: peer_listener,
            k,
            chunk: Duration::from_millis(u64::from(chunk_ms)),
            lag: config.target_lag,
            upload_kbps: config.relay.upload_kbps(),
            estimate_upload: config.relay.max_upload_kbps.is_none(),
            limits: config.limits(),
            peer_limits: config.peer_limits,
            key_hold: config.key_hold,
            parent_window: config.parent_window,
            parent_max_missed: config.parent_max_missed,
            idle: config.idle_timeout,
            connect_timeout: config.connect_timeout,
            reconnect_initial: config.reconnect_initial,
            reconnect_max: config.reconnect_max,
            rejoin_after_failures: config.rejoin_after_failures,
            max_links_per_ip: config.relay.max_links_per_ip,
            punched: Some(punched_rx),
        })?;
        tasks.extend(engine_tasks);
        tasks.push(tokio::spawn(upkeep(
            Upkeep {
                control: control.clone(),
                shared: shared.clone(),
                grid: Some(events),
                offered_kbps: config.relay.upload_kbps(),
                refresh_every: config.key_hold.min_interval,
                reconnect_initial: config.reconnect_initial,
                reconnect_max: config.reconnect_max,
                stream: config.session_stream,
                puncher,
            },
            seed,
        )));
        if let Some(m) = &mapping {
            tasks.push(tokio::spawn(crate::portmap::renew_loop(m.clone())));
        }
        tasks.push(tokio::spawn(crate::report::report_loop(
            control.clone(),
            shared.clone(),
            report_every,
        )));
        Ok(Viewer {
            shared,
            control: Some(control),
            local_addr,
            peer_addr,
            tasks,
            port_mapping: mapping,
            left: false,
        })
    }

    /// Connects straight to a data-plane wire address (`host:port`), without a control
    /// plane: for standalone data planes and tests. `config.chunk_token` is sent in
    /// `HELLO`.
    pub async fn connect_direct(
        wire_addr: impl Into<String>,
        config: ViewerConfig,
    ) -> Result<Viewer, SdkError> {
        config.validate()?;
        let started = Instant::now();
        let listener = bind_http(&config).await?;
        let target = Target {
            wire_addr: wire_addr.into(),
        };
        let first = open_conn(
            &config,
            &target,
            &config.chunk_token,
            StartAt::Live,
            starling_proto::wire::ALL_SUBSTREAMS,
        )
        .await?;
        Ok(Viewer::start(
            config, started, listener, None, target, first,
        ))
    }

    fn start(
        config: ViewerConfig,
        started: Instant,
        listener: Option<TcpListener>,
        control: Option<(Control, JoinInfo)>,
        target: Target,
        first: WireConn,
    ) -> Viewer {
        let shared = new_shared(&config, started, control.as_ref().map(|(_, j)| j));
        let mut tasks = Vec::new();
        let local_addr = spawn_http(listener, &shared, &mut tasks);
        let report_every = control.as_ref().map(|(_, j)| report_interval(&config, j));
        let seed = control
            .as_ref()
            .map(|(_, j)| j.assignment.clone())
            .unwrap_or_default();
        let control = control.map(|(c, _)| c);
        if let Some(c) = &control {
            tasks.push(tokio::spawn(upkeep(
                Upkeep {
                    control: c.clone(),
                    shared: shared.clone(),
                    grid: None,
                    offered_kbps: 0,
                    refresh_every: config.key_hold.min_interval,
                    reconnect_initial: config.reconnect_initial,
                    reconnect_max: config.reconnect_max,
                    stream: config.session_stream,
                    puncher: None,
                },
                seed,
            )));
            if let Some(every) = report_every {
                tasks.push(tokio::spawn(crate::report::report_loop(
                    c.clone(),
                    shared.clone(),
                    every,
                )));
            }
        }
        let receiver = Receiver {
            shared: shared.clone(),
            reorder: ReorderBuffer::new(config.reorder),
            control: control.clone(),
            target,
            config,
            chunk_ms: 1000,
        };
        tasks.push(tokio::spawn(receiver.run(first)));
        Viewer {
            shared,
            control,
            local_addr,
            peer_addr: None,
            tasks,
            port_mapping: None,
            left: false,
        }
    }
}

/// Spawns the local HTTP endpoint on `listener`, if any; returns its address.
fn spawn_http(
    listener: Option<TcpListener>,
    shared: &Arc<Shared>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Option<SocketAddr> {
    let listener = listener?;
    let addr = listener.local_addr().ok();
    tasks.push(tokio::spawn(http::serve(listener, shared.clone())));
    addr
}

fn new_shared(config: &ViewerConfig, started: Instant, join: Option<&JoinInfo>) -> Arc<Shared> {
    let hub = Hub::new(HubLimits {
        history_chunks: config.history_chunks,
        history_bytes: config.history_bytes,
        queue_chunks: config.subscriber_queue_chunks,
    });
    if let Some(ct) = join
        .and_then(|j| j.params.as_ref())
        .map(|p| p.content_type.as_str())
    {
        hub.set_content_type(ct);
    }
    let rights = match join {
        Some(j) => Rights::new(
            &config.broadcast_id,
            config.token_skew,
            OwnToken {
                token: j.token.clone(),
                expires_at_ms: j.token_expires_at_ms,
            },
            &j.token_keys,
            &j.chunk_keys,
            config.verified_signatures.clone(),
        ),
        None => Rights::new(
            &config.broadcast_id,
            config.token_skew,
            OwnToken {
                token: config.chunk_token.clone(),
                expires_at_ms: 0,
            },
            &[],
            &[],
            None,
        ),
    };
    let rights = rights.with_chunk_clock(
        config.clock.clone(),
        config.chunk_max_age,
        config.chunk_max_future,
    );
    rights.set_holder(config.holder.clone());
    if let Some(j) = join {
        rights.set_ticket_keys(&j.ticket_keys, false);
        rights.set_run(j.run_epoch);
        rights.observe_server_time(j.server_time);
    }
    let session = join.map(|j| Session {
        id: j.session_id.clone(),
        heartbeat: j.heartbeat,
        baseline: Baseline::default(),
    });
    let shared = Arc::new(Shared::new(
        config.broadcast_id.clone(),
        hub,
        started,
        rights,
        session,
        config.report_queue,
    ));
    shared.stats_mut().observed_addr = join.and_then(|j| j.observed_addr);
    shared
}

/// Number of substreams of a grid assignment: the stream parameters', else as many as
/// the parents list covers (1..=64).
fn grid_substreams(join: &JoinInfo) -> u16 {
    let k = join.params.as_ref().map_or(0, |p| p.substreams);
    let k = if k == 0 {
        join.assignment
            .parents
            .iter()
            .map(|(s, _)| s.saturating_add(1))
            .max()
            .unwrap_or(1)
    } else {
        k
    };
    u16::try_from(k.clamp(1, 64)).unwrap_or(64)
}

/// The substreams the data plane feeds in a join's assignment (all = the whole stream).
fn first_dp_mask(join: &JoinInfo, k: u16) -> u64 {
    let all = if k >= 64 { u64::MAX } else { (1u64 << k) - 1 };
    let mut mask = all;
    for (s, p) in &join.assignment.parents {
        if *s < u32::from(k)
            && let Some(p) = p.peer()
            && p.id != join.peer_id
        {
            mask &= !(1u64 << s);
        }
    }
    if mask == all {
        starling_proto::wire::ALL_SUBSTREAMS
    } else {
        mask
    }
}

async fn bind_http(config: &ViewerConfig) -> Result<Option<TcpListener>, SdkError> {
    match config.http_listen {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|e| SdkError::HttpBind {
                addr: addr.to_string(),
                source: e.into(),
            }),
    }
}

/// Removes a port mapping made for a relay that will not relay after all.
async fn unmap(mapping: Option<crate::portmap::PortMapping>) {
    if let Some(m) = mapping {
        m.remove(Duration::from_secs(1)).await;
    }
}
