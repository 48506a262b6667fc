//! The in-process stand-in for the control plane: the grid's own
//! [`ControlPlane`] (the real [`GridAssigner`] plus report counting) behind the
//! fabric's [`Up`]/[`Input`] messages, with no latency. For tests of the fabric alone;
//! a run uses the real control plane over gRPC.

use std::time::Duration;

use starling_grid::assign::{GridAssigner, GridConfig, PeerInfo};
use starling_grid::sim::{ControlPlane, ToControl, ToPeer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::msg::{Input, Up};

/// Distinct reporters that get a peer demoted (as the grid's simulator).
const REPORTERS_TO_DEMOTE: usize = 3;

/// Runs the in-process control plane for a stream of `stream_kbps` in `substreams`:
/// reads `up` until it closes, answers on `fabric`. Peer ids are local indices + 1.
///
/// # Errors
/// The assigner's refusal of the configuration.
pub fn spawn(
    stream_kbps: u32,
    substreams: u16,
    mut up: mpsc::Receiver<Up>,
    fabric: mpsc::Sender<Input>,
) -> Result<JoinHandle<()>, starling_grid::assign::GridError> {
    let assigner = GridAssigner::new(GridConfig {
        substreams,
        stream_kbps,
        ..GridConfig::default()
    })?;
    let mut cp = ControlPlane::new(assigner, REPORTERS_TO_DEMOTE);
    let origin = Instant::now();
    Ok(tokio::spawn(async move {
        while let Some(m) = up.recv().await {
            let now: Duration = origin.elapsed();
            let id = |index: usize| index as u64 + 1;
            let msg = match m {
                Up::Join { index, upload_kbps } => {
                    let slots = cp.assigner().slots_for(upload_kbps);
                    let out = cp.handle(
                        ToControl::Join {
                            id: id(index),
                            info: PeerInfo {
                                upload_kbps,
                                addr_prefix: 0,
                                now,
                                can_punch: true,
                            },
                        },
                        now,
                    );
                    if !forward(&fabric, out, Some(slots)).await {
                        return;
                    }
                    continue;
                }
                Up::ReSearch {
                    index,
                    substream,
                    exclude,
                } => ToControl::ReSearch {
                    child: id(index),
                    substream,
                    exclude,
                },
                Up::Report { index, parent } => ToControl::Report {
                    reporter: id(index),
                    parent,
                },
                Up::Leave { index } => ToControl::Leave(id(index)),
                Up::Subscribe { .. } | Up::ServerRequest { .. } => continue,
            };
            let out = cp.handle(msg, now);
            if !forward(&fabric, out, None).await {
                return;
            }
        }
    }))
}

/// Sends the control plane's answers to the fabric; `false` when it is gone.
async fn forward(
    fabric: &mpsc::Sender<Input>,
    out: Vec<(u64, ToPeer)>,
    join_slots: Option<u32>,
) -> bool {
    for (id, m) in out {
        let index = id.saturating_sub(1) as usize;
        let input = match m {
            ToPeer::Joined {
                parents,
                neighbours,
            } => Input::Joined {
                index,
                peer_id: id,
                child_slots: join_slots.unwrap_or(0),
                parents,
                neighbours,
                rpc_ms: Some(0),
                bytes: None,
            },
            ToPeer::Refused => Input::Failed {
                index,
                error: "join refused: no capacity".into(),
            },
            ToPeer::Assign { substream, parent } => Input::Assign {
                index,
                substream,
                parent,
                research: false,
            },
            ToPeer::ReSearched { substream, parent } => Input::Assign {
                index,
                substream,
                parent,
                research: true,
            },
        };
        if fabric.send(input).await.is_err() {
            return false;
        }
    }
    true
}
