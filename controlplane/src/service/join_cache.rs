//! The join path's read cache: the broadcast and node rows a `Join` needs, served from
//! memory so that a join makes no database read.
//!
//! Exactness within this process: every write of those rows made by this process (state
//! changes, node assignment, ingest reports, node death) calls [`JoinCache::forget_broadcast`],
//! [`JoinCache::forget_node`] or [`JoinCache::ingest_reported`] after the database write.
//! A read-through fill that raced such a write is discarded: every forget bumps a
//! generation, and a fill is stored only if no forget happened since its read began.
//! Writes by another replica (sharing a Postgres database) are seen after at most the
//! TTL ([`crate::service::ServiceConfig::join_cache_ttl`]).
//!
//! Bounded: at most [`MAX_ENTRIES`] rows of each kind; beyond, the oldest fills are
//! dropped first (a miss only costs one database read).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use starling_proto::v1::BroadcastState;

use crate::store::{BroadcastRecord, NodeRecord, Store, StoreError};

/// Most broadcasts and most nodes held (each).
pub const MAX_ENTRIES: usize = 16_384;

/// What a join needs of a broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BroadcastView {
    pub(super) id: String,
    pub(super) public: bool,
    pub(super) state: BroadcastState,
    pub(super) node_id: Option<String>,
    pub(super) substreams: u32,
    pub(super) chunk_duration_ms: u32,
    pub(super) content_type: String,
    /// The current run (`broadcasts.run_epoch`).
    pub(super) run_epoch: u64,
}

impl From<BroadcastRecord> for BroadcastView {
    fn from(b: BroadcastRecord) -> Self {
        BroadcastView {
            id: b.id,
            public: b.public,
            state: b.state,
            node_id: b.node_id,
            substreams: b.substreams,
            chunk_duration_ms: b.chunk_duration_ms,
            content_type: b.content_type,
            run_epoch: b.run_epoch,
        }
    }
}

/// What a join needs of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct NodeView {
    pub(super) id: String,
    pub(super) alive: bool,
    pub(super) capacity_viewers: u32,
    pub(super) wire_addr: String,
    pub(super) http_addr: String,
}

impl From<NodeRecord> for NodeView {
    fn from(n: NodeRecord) -> Self {
        NodeView {
            id: n.id,
            alive: n.alive,
            capacity_viewers: n.capacity_viewers,
            wire_addr: n.wire_addr,
            http_addr: n.http_addr,
        }
    }
}

#[derive(Debug)]
struct Table<V> {
    map: HashMap<String, (Arc<V>, Duration)>,
    order: VecDeque<String>,
}

impl<V> Default for Table<V> {
    fn default() -> Self {
        Table {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<V> Table<V> {
    fn get(&self, id: &str, now: Duration, ttl: Duration) -> Option<Arc<V>> {
        self.map
            .get(id)
            .filter(|(_, at)| now.saturating_sub(*at) < ttl)
            .map(|(v, _)| v.clone())
    }

    fn put(&mut self, id: String, v: Arc<V>, now: Duration) {
        if self.map.insert(id.clone(), (v, now)).is_none() {
            self.order.push_back(id);
        }
        while self.map.len() > MAX_ENTRIES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.map.remove(&old);
        }
        // `order` may hold ids forgotten since: keep it bounded too.
        if self.order.len() > MAX_ENTRIES.saturating_mul(2) {
            let map = &self.map;
            self.order.retain(|id| map.contains_key(id));
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    broadcasts: Table<BroadcastView>,
    nodes: Table<NodeView>,
    /// Bumped by every forget: a fill whose read began before it is not stored.
    generation: u64,
}

/// Broadcast and node rows for `Join`, read through from the store.
#[derive(Debug)]
pub(super) struct JoinCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl JoinCache {
    pub(super) fn new(ttl: Duration) -> JoinCache {
        JoinCache {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The broadcast `id` (`None`: no such broadcast), from memory when known and
    /// younger than the TTL, else from the store. `now` is the caller's monotonic time.
    pub(super) async fn broadcast(
        &self,
        store: &Store,
        id: &str,
        now: Duration,
    ) -> Result<Option<Arc<BroadcastView>>, StoreError> {
        let generation = {
            let inner = self.inner.lock();
            if let Some(v) = inner.broadcasts.get(id, now, self.ttl) {
                return Ok(Some(v));
            }
            inner.generation
        };
        let Some(record) = store.get_broadcast(id).await? else {
            return Ok(None);
        };
        let v = Arc::new(BroadcastView::from(record));
        let mut inner = self.inner.lock();
        if inner.generation == generation {
            inner.broadcasts.put(id.to_string(), v.clone(), now);
        }
        Ok(Some(v))
    }

    /// The node `id` (alive or dead; `None`: unknown), like [`Self::broadcast`].
    pub(super) async fn node(
        &self,
        store: &Store,
        id: &str,
        now: Duration,
    ) -> Result<Option<Arc<NodeView>>, StoreError> {
        let generation = {
            let inner = self.inner.lock();
            if let Some(v) = inner.nodes.get(id, now, self.ttl) {
                return Ok(Some(v));
            }
            inner.generation
        };
        let Some(record) = store.get_node(id).await? else {
            return Ok(None);
        };
        let v = Arc::new(NodeView::from(record));
        let mut inner = self.inner.lock();
        if inner.generation == generation {
            inner.nodes.put(id.to_string(), v.clone(), now);
        }
        Ok(Some(v))
    }

    /// The broadcast's row was written (state, node): the next join reads it again.
    pub(super) fn forget_broadcast(&self, id: &str) {
        let mut inner = self.inner.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.broadcasts.map.remove(id);
    }

    /// The node's row was written (declared dead): the next join reads it again.
    pub(super) fn forget_node(&self, id: &str) {
        let mut inner = self.inner.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.nodes.map.remove(id);
    }

    /// An ingest report was applied to the broadcast's row: its content type (the only
    /// reported field a join hands out) is updated in place, no read needed.
    pub(super) fn ingest_reported(&self, broadcast_id: &str, content_type: &str) {
        let mut inner = self.inner.lock();
        inner.generation = inner.generation.wrapping_add(1);
        if let Some((v, _)) = inner.broadcasts.map.get_mut(broadcast_id)
            && v.content_type != content_type
        {
            let mut updated = BroadcastView::clone(v);
            updated.content_type = content_type.to_string();
            *v = Arc::new(updated);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn view(id: &str) -> Arc<NodeView> {
        Arc::new(NodeView {
            id: id.into(),
            alive: true,
            capacity_viewers: 0,
            wire_addr: String::new(),
            http_addr: String::new(),
        })
    }

    #[test]
    fn table_honours_ttl_and_bound() {
        let mut t: Table<NodeView> = Table::default();
        let s = Duration::from_secs;
        t.put("a".into(), view("a"), s(10));
        assert!(t.get("a", s(11), s(2)).is_some());
        assert!(t.get("a", s(12), s(2)).is_none(), "expired at the TTL");
        for i in 0..MAX_ENTRIES + 10 {
            t.put(format!("n{i}"), view("x"), s(10));
        }
        assert_eq!(t.map.len(), MAX_ENTRIES);
        assert!(t.get("a", s(10), s(2)).is_none(), "oldest dropped first");
        assert!(t.order.len() <= MAX_ENTRIES * 2);
    }
}
