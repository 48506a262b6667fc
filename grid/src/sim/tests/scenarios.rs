//! Scenario tests: joins, leaves, churn and partial slots over time, on the real
//! assigner. Each prints its [`SimReport`] (`--nocapture`) and checks what must hold.

use super::*;

/// 1 Mbit/s in 4 substreams of 250 ms chunks (the load test's), 20–80 ms links, 2 s lag; figures from
/// `measure_from` on.
fn cfg(seed: u64, measure_from: u64) -> SimConfig {
    SimConfig {
        latency: Latency::Uniform {
            min: ms(20),
            max: ms(80),
        },
        measure_from: ms(measure_from),
        seed,
        ..SimConfig::new(1000, 4, ms(250))
    }
}

/// Viewers' uplinks against their budgets.
const UPLINK: f64 = 2.0;

fn show(name: &str, r: &SimReport) {
    eprintln!("{name}: {r:#?}");
}

/// The load test's scarce profile: 0, 0.8, 1.6, 0.8 × r (0.8·r on average).
fn scarce() -> UploadProfile {
    UploadProfile::new(&[0.0, 0.8, 1.6, 0.8], UPLINK)
}

fn flash_crowd(seed: u64, n: u64, profile: &UploadProfile) -> (Sim, SimReport) {
    let mut sim = Sim::new(cfg(seed, 20_000)).unwrap();
    sim.flash_crowd(n, Duration::ZERO, ms(10_000), profile);
    sim.run_until(ms(60_000));
    let r = sim.report();
    (sim, r)
}

#[test]
fn a_flash_crowd_is_served_by_its_peers() {
    let (_, r) = flash_crowd(7, 200, &UploadProfile::new(&[1.5], UPLINK));
    show("flash crowd", &r);
    assert_eq!(r.peers_alive, 200);
    assert!(r.continuity >= 0.999, "continuity {}", r.continuity);
    assert!(r.peer_share >= 0.95, "peer share {}", r.peer_share);
    // Ample upload: the server sends about one copy of the stream (4 roots) plus
    // frame overhead and the odd repair.
    assert!(
        r.server_egress_kbps <= 1.25 * r.fluid_bound_kbps,
        "server {} kbit/s against the fluid bound {}",
        r.server_egress_kbps,
        r.fluid_bound_kbps
    );
}

#[test]
fn the_same_seed_gives_the_same_report() {
    let a = flash_crowd(11, 60, &scarce()).1;
    let b = flash_crowd(11, 60, &scarce()).1;
    assert_eq!(a, b);
    let c = flash_crowd(12, 60, &scarce()).1;
    assert_ne!(a, c, "another seed, other join times and latencies");
}

#[test]
fn scarce_upload_stays_continuous_near_the_fluid_bound() {
    let (sim, r) = flash_crowd(3, 200, &scarce());
    show("scarce upload", &r);
    eprintln!(
        "scarce upload: depth at the end {}",
        sim.assigner().stats().max_depth
    );
    // Measured here: 0.980 over the run, 0.985 after the first 20 s (about the same on
    // uplinks 4× the budgets): the trees grow deep during the flash crowd (24; 6 at
    // the end), a fifth of the partly covered slots' pushes are repaired, mostly from
    // the server, and parents keep being re-searched. Not the 0.99 of ample upload;
    // the bounds below catch a regression from there.
    assert!(r.continuity >= 0.97, "continuity {}", r.continuity);
    assert!(
        r.continuity_measured >= 0.98,
        "continuity after the start-up {}",
        r.continuity_measured
    );
    // Partial slots: 0.8·r buys 4 slots for 3.2 slots of budget; the relays skip the
    // pushes beyond it, say so, and the children repair.
    assert!(r.parent_skips > 0, "no partly covered slot skipped a push");
    assert!(
        r.server_egress_kbps <= 1.3 * r.fluid_bound_kbps,
        "server {} kbit/s against the fluid bound {}",
        r.server_egress_kbps,
        r.fluid_bound_kbps
    );
}

#[test]
fn steady_churn_keeps_the_stream_continuous() {
    let mut sim = Sim::new(cfg(5, 20_000)).unwrap();
    let profile = UploadProfile::new(&[1.5, 1.0, 2.0], UPLINK);
    let mut pool = sim.flash_crowd(150, Duration::ZERO, ms(5_000), &profile);
    // One viewer in 150 leaves and one joins every 500 ms (a fifth of them crash).
    let left = sim.churn(&mut pool, ms(15_000), ms(55_000), ms(500), 0.2, &profile);
    sim.run_until(ms(60_000));
    let r = sim.report();
    show("churn", &r);
    assert_eq!(left.len(), 80);
    assert_eq!(r.peers_alive, 150);
    assert!(r.continuity >= 0.99, "continuity {}", r.continuity);
    assert!(r.peer_share >= 0.95, "peer share {}", r.peer_share);
    // Churn costs repairs and booster slots: within 2.5 copies of the stream.
    assert!(
        r.server_egress_kbps <= 2.5 * r.fluid_bound_kbps,
        "server {} kbit/s against the fluid bound {}",
        r.server_egress_kbps,
        r.fluid_bound_kbps
    );
}

/// The peer with the most children in one substream, fed by another peer.
fn busiest_interior(sim: &Sim) -> (PeerId, Vec<PeerId>) {
    sim.alive()
        .into_iter()
        .filter(|&id| sim.parents(id).iter().all(|p| *p != Some(Parent::Server)))
        .map(|id| {
            let kids: Vec<PeerId> = (0..4).flat_map(|s| sim.children(id, s)).collect();
            (id, kids)
        })
        .max_by_key(|(id, kids)| (kids.len(), std::cmp::Reverse(*id)))
        .unwrap()
}

fn no_one_starves(sim: &Sim, kids: &[PeerId], from: u64) {
    for &k in kids {
        let st = sim.stats(k).unwrap();
        assert_eq!(
            st.skipped,
            0,
            "child {k} starved after its parent went away at {from} ms: {st:?}, \
             re-searches {:?}",
            sim.researches(k)
        );
    }
}

#[test]
fn no_child_starves_when_its_parent_leaves() {
    let mut sim = Sim::new(cfg(9, 20_000)).unwrap();
    sim.flash_crowd(
        100,
        Duration::ZERO,
        ms(5_000),
        &UploadProfile::new(&[1.5], UPLINK),
    );
    sim.run_until(ms(20_000));
    let (parent, kids) = busiest_interior(&sim);
    assert!(kids.len() >= 3, "{parent} has {kids:?}");
    sim.leave_at(ms(20_000), parent);
    sim.run_until(ms(40_000));
    no_one_starves(&sim, &kids, 20_000);
    for &k in &kids {
        assert!(!sim.parents(k).contains(&Some(Parent::Peer(parent))));
    }
    show("parent leaves", &sim.report());
}

#[test]
fn no_child_starves_when_its_parent_goes_silent() {
    // Several seeds: the siblings of a silent parent's children are their neighbours
    // too, predicted to hold what none of them got (seeds 14 and 16 starved a child
    // before the server lead stopped trusting predictions).
    for seed in [13, 14, 15, 16, 17] {
        let mut sim = Sim::new(cfg(seed, 20_000)).unwrap();
        sim.flash_crowd(
            100,
            Duration::ZERO,
            ms(5_000),
            &UploadProfile::new(&[1.5], UPLINK),
        );
        sim.run_until(ms(20_000));
        let (parent, kids) = busiest_interior(&sim);
        sim.silence_at(ms(20_000), parent);
        sim.run_until(ms(50_000));
        no_one_starves(&sim, &kids, 20_000);
        // The control plane never heard of it: its children re-searched it away.
        for &k in &kids {
            assert!(
                sim.researches(k).iter().any(|r| r.2.contains(&parent)),
                "seed {seed}: child {k} did not re-search its silent parent"
            );
            assert!(!sim.parents(k).contains(&Some(Parent::Peer(parent))));
        }
        show("parent silent", &sim.report());
    }
}

#[test]
fn partly_covered_slots_skip_pushes_that_the_children_repair() {
    // 0.8·r buys 4 slots (3.2 slots of budget): each relay skips about a fifth of its
    // pushes, announces every skip, and its children repair them from the mesh.
    let mut sim = Sim::new(cfg(17, 10_000)).unwrap();
    sim.flash_crowd(
        40,
        Duration::ZERO,
        ms(2_000),
        &UploadProfile::new(&[0.8], UPLINK),
    );
    sim.run_until(ms(40_000));
    let r = sim.report();
    show("partial slots", &r);
    assert_eq!(sim.assigner().slots_for(800), 4);
    assert!(r.parent_skips >= 100, "{} skips announced", r.parent_skips);
    assert!(r.from_neighbours > 0);
    // Measured: 0.991 (most skipped pushes are repaired from the server: the
    // neighbours' budgets go to their own pushes).
    assert!(
        r.continuity_measured >= 0.985,
        "continuity {}",
        r.continuity_measured
    );
}
