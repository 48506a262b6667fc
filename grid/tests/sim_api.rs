//! `starling_grid::sim` from outside the crate, as the load test will drive it: only the
//! public API, virtual time only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use starling_grid::sim::{Drive, Latency, PeerSpec, Sim, SimConfig, SimReport, UploadProfile};

fn run(seed: u64, loss: f64) -> SimReport {
    let mut sim = Sim::new(SimConfig {
        latency: Latency::Uniform {
            min: Duration::from_millis(10),
            max: Duration::from_millis(60),
        },
        loss,
        seed,
        measure_from: Duration::from_secs(10),
        ..SimConfig::new(800, 4, Duration::from_millis(250))
    })
    .unwrap();
    let mut pool = sim.flash_crowd(
        50,
        Duration::ZERO,
        Duration::from_secs(3),
        &UploadProfile::new(&[1.5, 2.0], 2.0),
    );
    sim.join_at(Duration::from_secs(5), PeerSpec::with_upload(0));
    sim.churn(
        &mut pool,
        Duration::from_secs(10),
        Duration::from_secs(25),
        Duration::from_secs(1),
        0.5,
        &UploadProfile::new(&[1.5], 2.0),
    );
    sim.run_until(Duration::from_secs(30));
    sim.report()
}

#[test]
fn a_swarm_is_driven_through_the_public_api_deterministically() {
    let a = run(21, 0.0);
    assert_eq!(a, run(21, 0.0));
    assert_eq!(a.peers_alive, 51);
    assert_eq!(a.lost_frames, 0);
    assert!(a.continuity >= 0.99, "{a:#?}");
    assert!(a.peer_share >= 0.9, "{a:#?}");
}

#[test]
fn lost_frames_are_repaired() {
    // 1 % of the frames between peers are lost (chunks, maps, requests alike).
    let r = run(22, 0.01);
    eprintln!("loss: {r:#?}");
    assert!(r.lost_frames > 50, "{} lost", r.lost_frames);
    assert!(r.continuity >= 0.99, "{r:#?}");
}

#[test]
fn a_bad_configuration_is_refused() {
    let cfg = SimConfig {
        drive: Drive::Periodic(Duration::ZERO),
        ..SimConfig::new(800, 4, Duration::from_millis(250))
    };
    assert!(Sim::new(cfg).is_err());
    assert!(Sim::new(SimConfig::new(0, 4, Duration::from_millis(250))).is_err());
    assert!(Sim::new(SimConfig::new(800, 4, Duration::ZERO)).is_err());
}
