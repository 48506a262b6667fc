//! The scheduler's swarm tests (formerly on a hand-made fan-out-4 topology and a tiny
//! controller), now on the real assigner: 16 viewers joining at once, a 1 Mbit/s
//! stream in 4 substreams of 250 ms chunks; each declares 1 Mbit/s (4 child slots, so
//! the trees have the fan-out the old topology had) on a 2 Mbit/s uplink.

use super::*;

fn cfg(drive: Drive) -> SimConfig {
    SimConfig {
        drive,
        ..SimConfig::new(1000, 4, ms(250))
    }
}

fn swarm(deadline_driven: bool) -> (Sim, Vec<PeerId>) {
    let drive = if deadline_driven {
        Drive::Deadlines
    } else {
        Drive::Periodic(ms(50))
    };
    let mut sim = Sim::new(cfg(drive)).unwrap();
    sim.check_early = deadline_driven;
    let ids = (0..16)
        .map(|_| {
            sim.join_at(
                Duration::ZERO,
                PeerSpec {
                    uplink_kbps: 4000,
                    ..PeerSpec::with_upload(2000)
                },
            )
        })
        .collect();
    (sim, ids)
}

#[test]
fn healthy_swarm_has_full_continuity_from_peers() {
    healthy_swarm(false);
}

#[test]
fn healthy_swarm_ticked_at_deadlines_only_has_full_continuity_and_few_ticks() {
    let ticks = healthy_swarm(true);
    let periodic = healthy_swarm(false);
    eprintln!("ticks: {ticks} at deadlines, {periodic} every 50 ms");
    // Play-out deadlines (4 a second) and the map checks, not 20 a second.
    assert!(
        ticks * 3 < periodic,
        "{ticks} deadline-driven ticks against {periodic} periodic"
    );
}

fn healthy_swarm(deadline_driven: bool) -> u64 {
    let (mut sim, _) = swarm(deadline_driven);
    sim.run_until(ms(60_000));
    let alive = sim.alive();
    assert_eq!(alive.len(), 16);
    assert_continuity(&sim, &alive, 220);
    let peer_chunks: u64 = alive
        .iter()
        .map(|&id| sim.stats(id).unwrap().from_parent)
        .sum();
    let researches: usize = alive.iter().map(|&id| sim.researches(id).len()).sum();
    assert_eq!(researches, 0);
    assert_eq!(sim.server_pulls(), 0);
    // 4 substream roots: the server sends one copy of the stream.
    assert_eq!(sim.server_pushes(), 240);
    eprintln!(
        "healthy: {} chunks pushed by parents, server pushes {}, max depth {}",
        peer_chunks,
        sim.server_pushes(),
        sim.assigner().stats().max_depth
    );
    if deadline_driven {
        assert!(sim.early_checks() > 2_000, "{} checks", sim.early_checks());
    }
    assert_eq!(sim.spins(), 0);
    sim.ticks()
}

/// The lowest-numbered interior peer of substream 0's tree: fed by another peer, with
/// children in substream 0 only (interior-disjoint trees: its home substream).
fn interior(sim: &Sim) -> (PeerId, Vec<PeerId>) {
    sim.alive()
        .into_iter()
        .filter(|&id| matches!(sim.parents(id)[0], Some(Parent::Peer(_))))
        .filter(|&id| (1..4).all(|s| sim.children(id, s).is_empty()))
        .map(|id| (id, sim.children(id, 0)))
        .find(|(_, c)| !c.is_empty())
        .unwrap()
}

#[test]
fn parent_loss_is_repaired_without_missing_a_deadline() {
    parent_loss(false);
}

#[test]
fn parent_loss_is_repaired_without_missing_a_deadline_when_ticked_at_deadlines() {
    parent_loss(true);
}

fn parent_loss(deadline_driven: bool) {
    let (mut sim, _) = swarm(deadline_driven);
    sim.run_until(ms(20_000));
    // An interior peer of substream 0's tree crashes: the control plane hears of it
    // only after its heartbeat timeout (10 s), so its orphans must re-search.
    let (victim, orphans) = interior(&sim);
    sim.crash_at(ms(20_001), victim);
    sim.run_until(ms(60_000));
    let alive = sim.alive();
    assert_eq!(alive.len(), 15);
    assert_continuity(&sim, &alive, 220);
    for &o in &orphans {
        let rs = sim.researches(o);
        assert!(
            rs.iter()
                .any(|(t, s, ex)| *s == 0 && *ex == [victim] && *t < ms(23_000)),
            "orphan {o} did not re-search promptly: {rs:?}"
        );
        assert_ne!(sim.parents(o)[0], Some(Parent::Peer(victim)));
    }
    let repaired: u64 = alive
        .iter()
        .map(|&id| sim.stats(id).unwrap().from_neighbour)
        .sum();
    let researches: usize = alive.iter().map(|&id| sim.researches(id).len()).sum();
    let first: Vec<Duration> = orphans
        .iter()
        .filter_map(|&o| sim.researches(o).first().map(|r| r.0 - ms(20_001)))
        .collect();
    eprintln!(
        "parent loss: orphans {orphans:?} of {victim} re-searched after {first:?}; \
         {researches} re-searches in all; {repaired} chunks repaired from neighbours, {} \
         from the server",
        sim.server_pulls()
    );
}

#[test]
fn slow_parent_is_replaced() {
    slow_parent(false);
}

#[test]
fn slow_parent_is_replaced_when_ticked_at_deadlines() {
    slow_parent(true);
}

fn slow_parent(deadline_driven: bool) {
    let (mut sim, _) = swarm(deadline_driven);
    sim.run_until(ms(20_000));
    let (slow, kids) = interior(&sim);
    sim.slow_down(slow, ms(1500));
    sim.run_until(ms(60_000));
    let alive = sim.alive();
    assert_continuity(&sim, &alive, 220);
    for &c in &kids {
        assert!(
            sim.researches(c)
                .iter()
                .any(|(_, s, ex)| *s == 0 && *ex == [slow]),
            "child {c} kept its slow parent"
        );
        assert_ne!(sim.parents(c)[0], Some(Parent::Peer(slow)));
    }
}
