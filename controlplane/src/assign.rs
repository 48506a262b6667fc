//! Sans-IO decisions of the control plane: which data-plane node ingests which live
//! broadcast, and which nodes are overdue. Pure functions over plain data, so they
//! are tested deterministically; the service layer feeds them from the store and
//! carries out their output.

use std::collections::{BTreeMap, HashMap};

/// A live broadcast and the node currently assigned to it (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBroadcast {
    /// Broadcast id.
    pub id: String,
    /// Currently assigned node, possibly dead or unknown.
    pub node_id: Option<String>,
    /// Viewers on it right now (as last reported).
    pub viewers: u32,
}

/// An alive data-plane node that can take ingests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CandidateNode {
    /// Node id.
    pub id: String,
    /// Viewers connected to it right now (as last reported).
    pub viewers: u32,
}

/// One change the caller must carry out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Broadcast to (re)assign.
    pub broadcast_id: String,
    /// Node it was assigned to before (dead or unknown), if any.
    pub from: Option<String>,
    /// Node it goes to; `None` = no alive node, leave it unassigned for now.
    pub to: Option<String>,
}

/// Decides where every live broadcast without an alive node goes.
///
/// Broadcasts already on an alive node stay there (no migration of healthy ingests).
/// Each orphan (no node, or a node not among `alive`) goes to the least-loaded alive
/// node, where load is (number of assigned live broadcasts, then viewers, then node id
/// for determinism), counting the assignments made by this very call. Orphans are
/// placed in the order given. An orphan whose node is already `None` and for which no
/// alive node exists produces no change; an orphan on a dead node with no alive node
/// left produces an unassignment (`to: None`).
pub fn plan_assignments(live: &[LiveBroadcast], alive: &[CandidateNode]) -> Vec<Assignment> {
    // (broadcasts, viewers) per alive node; BTreeMap iteration gives the id tie-break.
    let mut load: BTreeMap<&str, (u32, u64)> = alive
        .iter()
        .map(|n| (n.id.as_str(), (0u32, u64::from(n.viewers))))
        .collect();
    for b in live {
        if let Some(entry) = b.node_id.as_deref().and_then(|id| load.get_mut(id)) {
            entry.0 = entry.0.saturating_add(1);
        }
    }

    let mut changes = Vec::new();
    for b in live {
        let on_alive = b.node_id.as_deref().is_some_and(|id| load.contains_key(id));
        if on_alive {
            continue;
        }
        let best = load
            .iter()
            .min_by_key(|(id, (count, viewers))| (*count, *viewers, *id))
            .map(|(id, _)| *id);
        match best {
            Some(id) => {
                if let Some(entry) = load.get_mut(id) {
                    entry.0 = entry.0.saturating_add(1);
                    entry.1 = entry.1.saturating_add(u64::from(b.viewers));
                }
                changes.push(Assignment {
                    broadcast_id: b.id.clone(),
                    from: b.node_id.clone(),
                    to: Some(id.to_string()),
                });
            }
            None if b.node_id.is_some() => changes.push(Assignment {
                broadcast_id: b.id.clone(),
                from: b.node_id.clone(),
                to: None,
            }),
            None => {}
        }
    }
    changes
}

/// What the liveness check knows about one alive node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLiveness {
    /// Node id.
    pub id: String,
    /// Last health report (or registration), unix ms.
    pub last_seen_ms: i64,
    /// Since when the node has had no open command stream (unix ms), `None` while it
    /// has one. A node that reports health but never (re)opens its command stream
    /// cannot receive commands, so it is declared dead too and re-registers.
    pub detached_since_ms: Option<i64>,
}

/// Ids of the nodes that must be declared dead at `now_ms`: silent (no report) for
/// more than `timeout_ms`, or without a command stream for more than `timeout_ms`.
pub fn expired_nodes(nodes: &[NodeLiveness], now_ms: i64, timeout_ms: i64) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| {
            let silent = now_ms.saturating_sub(n.last_seen_ms) > timeout_ms;
            let detached = n
                .detached_since_ms
                .is_some_and(|since| now_ms.saturating_sub(since) > timeout_ms);
            silent || detached
        })
        .map(|n| n.id.clone())
        .collect()
}

/// The ingests a node reports that it should not be running: broadcasts that are not
/// live on that node (stopped, deleted, or reassigned elsewhere). The caller sends a
/// stop command for each, which also repairs stop commands lost while the node's
/// command stream was down.
pub fn stray_ingests<'a>(
    node_id: &str,
    reported: impl IntoIterator<Item = &'a str>,
    live_assignment: &HashMap<String, Option<String>>,
) -> Vec<String> {
    reported
        .into_iter()
        .filter(|b| match live_assignment.get(*b) {
            Some(Some(assigned)) => assigned != node_id,
            Some(None) | None => true,
        })
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn live(id: &str, node: Option<&str>) -> LiveBroadcast {
        LiveBroadcast {
            id: id.into(),
            node_id: node.map(Into::into),
            viewers: 0,
        }
    }

    fn node(id: &str, viewers: u32) -> CandidateNode {
        CandidateNode {
            id: id.into(),
            viewers,
        }
    }

    fn to(changes: &[Assignment]) -> Vec<(&str, Option<&str>)> {
        changes
            .iter()
            .map(|a| (a.broadcast_id.as_str(), a.to.as_deref()))
            .collect()
    }

    #[test]
    fn no_nodes_leaves_unassigned_broadcasts_alone() {
        assert!(plan_assignments(&[live("b1", None)], &[]).is_empty());
    }

    #[test]
    fn no_nodes_unassigns_broadcasts_of_dead_nodes() {
        let changes = plan_assignments(&[live("b1", Some("dead"))], &[]);
        assert_eq!(
            changes,
            vec![Assignment {
                broadcast_id: "b1".into(),
                from: Some("dead".into()),
                to: None
            }]
        );
    }

    #[test]
    fn broadcasts_on_alive_nodes_stay() {
        let changes = plan_assignments(
            &[live("b1", Some("n1")), live("b2", Some("n2"))],
            &[node("n1", 0), node("n2", 0), node("n3", 0)],
        );
        assert!(changes.is_empty());
    }

    #[test]
    fn picks_node_with_fewest_broadcasts_first() {
        let changes = plan_assignments(
            &[live("b1", Some("n1")), live("b2", None)],
            // n1 has fewer viewers but already one broadcast.
            &[node("n1", 0), node("n2", 500)],
        );
        assert_eq!(to(&changes), vec![("b2", Some("n2"))]);
    }

    #[test]
    fn ties_on_broadcasts_broken_by_viewers_then_id() {
        let changes = plan_assignments(&[live("b1", None)], &[node("n1", 10), node("n2", 5)]);
        assert_eq!(to(&changes), vec![("b1", Some("n2"))]);
        let changes = plan_assignments(&[live("b1", None)], &[node("n2", 5), node("n1", 5)]);
        assert_eq!(to(&changes), vec![("b1", Some("n1"))]);
    }

    #[test]
    fn spreads_several_orphans_over_nodes() {
        let changes = plan_assignments(
            &[
                live("b1", None),
                live("b2", None),
                live("b3", None),
                live("b4", None),
            ],
            &[node("n1", 0), node("n2", 0)],
        );
        assert_eq!(
            to(&changes),
            vec![
                ("b1", Some("n1")),
                ("b2", Some("n2")),
                ("b3", Some("n1")),
                ("b4", Some("n2")),
            ]
        );
    }

    #[test]
    fn orphans_of_a_dead_node_move_to_alive_nodes() {
        let changes = plan_assignments(
            &[live("b1", Some("dead")), live("b2", Some("n1"))],
            &[node("n1", 0), node("n2", 0)],
        );
        assert_eq!(
            changes,
            vec![Assignment {
                broadcast_id: "b1".into(),
                from: Some("dead".into()),
                to: Some("n2".into())
            }]
        );
    }

    #[test]
    fn assigned_viewers_count_towards_load() {
        let mut big = live("big", None);
        big.viewers = 1000;
        let changes = plan_assignments(
            &[big, live("b2", Some("n3")), live("small", None)],
            &[node("n1", 0), node("n2", 0), node("n3", 0)],
        );
        // big -> n1 (n3 has a broadcast); small -> n2 (n1 now has one broadcast too).
        assert_eq!(
            to(&changes),
            vec![("big", Some("n1")), ("small", Some("n2"))]
        );
    }

    #[test]
    fn expired_by_silence_or_detachment() {
        let nodes = vec![
            NodeLiveness {
                id: "fresh".into(),
                last_seen_ms: 9_000,
                detached_since_ms: None,
            },
            NodeLiveness {
                id: "silent".into(),
                last_seen_ms: 4_999,
                detached_since_ms: None,
            },
            NodeLiveness {
                id: "boundary".into(),
                last_seen_ms: 5_000,
                detached_since_ms: Some(5_000),
            },
            NodeLiveness {
                id: "detached".into(),
                last_seen_ms: 9_900,
                detached_since_ms: Some(1_000),
            },
        ];
        assert_eq!(
            expired_nodes(&nodes, 10_000, 5_000),
            vec!["silent".to_string(), "detached".to_string()]
        );
    }

    #[test]
    fn stray_ingests_are_those_not_live_on_this_node() {
        let mut map = HashMap::new();
        map.insert("mine".to_string(), Some("n1".to_string()));
        map.insert("theirs".to_string(), Some("n2".to_string()));
        map.insert("orphan".to_string(), None);
        let stray = stray_ingests("n1", ["mine", "theirs", "orphan", "stopped"], &map);
        assert_eq!(stray, vec!["theirs", "orphan", "stopped"]);
    }
}
