//! In-place ordering: in which phase each write may go so that no chunk still needed is
//! overwritten before it was read.
//!
//! Every chunk to write is a *node*: its destination is its place in the image, and a node
//! copied from elsewhere in the target also has a *source* range there. Node `k`
//! **destroys** node `j` when `k`'s destination overlaps `j`'s source; `j` must then be
//! read before `k` writes. A node may destroy itself (a chunk shifted by less than its
//! length).
//!
//! The schedule is a list of phases separated by barriers (flush the target, then record a
//! checkpoint). Within a phase, writes go in any order, in parallel. A node may run in a
//! phase when each node it destroys is either done in an earlier phase (so durably copied)
//! or *stashed*: read into the scratch buffer at the start of a phase, before any of the
//! phase's writes. Every phase is built greedily:
//!
//! 1. every node nothing blocks runs (a self-destroying one is stashed first);
//! 2. then, sweeping the blocked nodes by destination, each next one joins the phase if
//!    the nodes still blocking it (and itself, if it destroys itself) fit in the scratch
//!    left: they are stashed, which may unblock further nodes for free. Chains of moves (a
//!    shifted region) and cycles (swapped or rotated regions) thus go in scratch-sized
//!    batches, with sequential writes, rather than one phase per link;
//! 3. when nothing at all fits, the sources of the nodes blocking the next one are dropped:
//!    those chunks are fetched from the store instead.
//!
//! Scratch in use never exceeds the bound (a stashed node that cannot run yet keeps its
//! bytes across phases, and counts until it runs), and every step runs, stashes or drops a
//! node, so the schedule always completes. Stashed bytes live only in memory: they are the
//! only local data a crash can lose, and the proof in `docs/SYNC.md` shows that a rerun
//! fetches at most those (plus what the crashed run had fetched) from the store.

use std::collections::VecDeque;

/// A chunk to write, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Node {
    /// Destination offset in the target.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Offset of its source range in the target, when copied from the target.
    pub source: Option<u64>,
}

/// One phase of a schedule, as node numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Step {
    /// Nodes whose source is read into scratch at the start of the phase.
    pub stash: Vec<usize>,
    /// Nodes written in the phase, ascending.
    pub run: Vec<usize>,
}

/// The phases, plus the nodes whose target source was dropped (they are fetched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub steps: Vec<Step>,
    /// Per node: its source was dropped to break a cycle or because it does not fit.
    pub dropped: Vec<bool>,
    /// Per node: it was stashed (its write takes the bytes from scratch).
    pub stashed: Vec<bool>,
    /// Most scratch bytes held at once.
    pub scratch_peak: u64,
}

/// Compressed adjacency lists.
struct Adjacency {
    start: Vec<usize>,
    items: Vec<usize>,
}

impl Adjacency {
    fn of(&self, node: usize) -> &[usize] {
        &self.items[self.start[node]..self.start[node + 1]]
    }
}

/// Builds the conflict graph: for each node with a target source, the other nodes whose
/// destination overlaps it (its destroyers), and whether it destroys itself.
fn conflicts(nodes: &[Node]) -> (Adjacency, Adjacency, Vec<bool>) {
    let mut start = Vec::with_capacity(nodes.len() + 1);
    let mut items = Vec::new();
    let mut self_loop = vec![false; nodes.len()];
    for (j, node) in nodes.iter().enumerate() {
        start.push(items.len());
        let Some(src) = node.source else { continue };
        let src_end = src + u64::from(node.len);
        // Destinations are sorted and disjoint: the first that ends after `src`.
        let first = nodes.partition_point(|n| n.offset + u64::from(n.len) <= src);
        for (k, dest) in nodes.iter().enumerate().skip(first) {
            if dest.offset >= src_end {
                break;
            }
            if k == j {
                self_loop[j] = true;
            } else {
                items.push(k);
            }
        }
    }
    start.push(items.len());
    let succ = Adjacency { start, items };
    // Predecessors: who each node destroys.
    let mut count = vec![0usize; nodes.len()];
    for &k in &succ.items {
        count[k] += 1;
    }
    let mut pstart = Vec::with_capacity(nodes.len() + 1);
    let mut acc = 0;
    for c in &count {
        pstart.push(acc);
        acc += c;
    }
    pstart.push(acc);
    let mut fill = pstart.clone();
    let mut pitems = vec![0usize; acc];
    for j in 0..nodes.len() {
        for &k in succ.of(j) {
            pitems[fill[k]] = j;
            fill[k] += 1;
        }
    }
    let pred = Adjacency {
        start: pstart,
        items: pitems,
    };
    (succ, pred, self_loop)
}

struct Scheduler<'a> {
    nodes: &'a [Node],
    succ: Adjacency,
    pred: Adjacency,
    self_loop: Vec<bool>,
    scratch: u64,
    /// Live scratch bytes: stashed nodes not yet done.
    live: u64,
    peak: u64,
    /// Unreleased nodes each node destroys (other than itself).
    blockers: Vec<u32>,
    /// The node's source no longer needs protecting: it is stashed, dropped or done.
    released: Vec<bool>,
    done: Vec<bool>,
    stashed: Vec<bool>,
    dropped: Vec<bool>,
    in_phase: Vec<bool>,
    /// Runnable next phase.
    ready: Vec<usize>,
    /// Cursor for cycle breaking: nodes before it are released or destroy nothing.
    cursor: usize,
}

impl Scheduler<'_> {
    fn len(&self, n: usize) -> u64 {
        u64::from(self.nodes[n].len)
    }

    /// Marks `j`'s source as no longer needing protection; successors whose last blocker
    /// it was are pushed to `queue`.
    fn release(&mut self, j: usize, queue: &mut VecDeque<usize>) {
        if self.released[j] {
            return;
        }
        self.released[j] = true;
        for i in self.succ.start[j]..self.succ.start[j + 1] {
            let k = self.succ.items[i];
            self.blockers[k] -= 1;
            if self.blockers[k] == 0 && !self.done[k] {
                queue.push_back(k);
            }
        }
    }

    fn stash(&mut self, j: usize, step: &mut Step, queue: &mut VecDeque<usize>) {
        debug_assert!(!self.released[j] && self.nodes[j].source.is_some());
        self.stashed[j] = true;
        self.live += self.len(j);
        self.peak = self.peak.max(self.live);
        step.stash.push(j);
        self.release(j, queue);
    }

    fn drop_source(&mut self, j: usize, queue: &mut VecDeque<usize>) {
        self.dropped[j] = true;
        self.release(j, queue);
    }

    /// Admits runnable nodes from `queue` into the phase.
    fn fill(&mut self, step: &mut Step, queue: &mut VecDeque<usize>, deferred: &mut Vec<usize>) {
        while let Some(k) = queue.pop_front() {
            if self.done[k] || self.in_phase[k] {
                continue;
            }
            if self.self_loop[k] && !self.released[k] {
                if self.live + self.len(k) <= self.scratch {
                    self.stash(k, step, queue);
                } else if self.len(k) > self.scratch {
                    self.drop_source(k, queue);
                } else {
                    deferred.push(k);
                    continue;
                }
            }
            self.in_phase[k] = true;
            step.run.push(k);
        }
    }

    /// Unreleased nodes that keep `k` from running (and `k` itself if it destroys
    /// itself), and the scratch stashing them takes.
    fn blocking(&self, k: usize) -> (Vec<usize>, u64) {
        let mut list: Vec<usize> = self
            .pred
            .of(k)
            .iter()
            .copied()
            .filter(|&p| !self.released[p])
            .collect();
        if self.self_loop[k] && !self.released[k] {
            list.push(k);
        }
        let cost = list.iter().map(|&p| self.len(p)).sum();
        (list, cost)
    }

    /// The next blocked node from the sweep cursor (wrapping), or `None` after a full turn.
    fn next_blocked(&mut self, turned: &mut usize) -> Option<usize> {
        let n = self.nodes.len();
        while *turned < n {
            let k = self.cursor;
            self.cursor = (self.cursor + 1) % n;
            *turned += 1;
            if !self.done[k] && !self.in_phase[k] && self.blockers[k] > 0 {
                return Some(k);
            }
        }
        None
    }
}

/// Orders `nodes` (sorted by destination, disjoint) into phases using at most `scratch`
/// bytes of scratch at any time.
pub(crate) fn schedule(nodes: &[Node], scratch: u64) -> Schedule {
    debug_assert!(nodes
        .windows(2)
        .all(|w| w[0].offset + u64::from(w[0].len) <= w[1].offset));
    let n = nodes.len();
    let (succ, pred, self_loop) = conflicts(nodes);
    let mut blockers = vec![0u32; n];
    for &k in &succ.items {
        blockers[k] += 1;
    }
    let ready = (0..n).filter(|&k| blockers[k] == 0).collect();
    let mut s = Scheduler {
        nodes,
        succ,
        pred,
        self_loop,
        scratch,
        live: 0,
        peak: 0,
        blockers,
        released: nodes.iter().map(|n| n.source.is_none()).collect(),
        done: vec![false; n],
        stashed: vec![false; n],
        dropped: vec![false; n],
        in_phase: vec![false; n],
        ready,
        cursor: 0,
    };
    let mut steps = Vec::new();
    let mut remaining = n;
    while remaining > 0 {
        let mut step = Step::default();
        let mut queue: VecDeque<usize> = std::mem::take(&mut s.ready).into();
        let mut deferred = Vec::new();
        let mut turned = 0;
        loop {
            s.fill(&mut step, &mut queue, &mut deferred);
            let Some(k) = s.next_blocked(&mut turned) else {
                if step.run.is_empty() {
                    // Only nodes waiting for scratch held by earlier stashes remain.
                    let k = deferred
                        .pop()
                        .expect("a pending node is blocked, deferred or runnable");
                    s.drop_source(k, &mut queue);
                    queue.push_back(k);
                    continue;
                }
                break;
            };
            let (blocking, cost) = s.blocking(k);
            if s.live + cost <= s.scratch {
                for p in blocking {
                    s.stash(p, &mut step, &mut queue);
                }
            } else if step.run.is_empty() {
                // Nothing fits: fetch what blocks `k` (or what waits for scratch).
                if let Some(d) = deferred.pop() {
                    s.drop_source(d, &mut queue);
                    queue.push_back(d);
                } else {
                    for p in blocking {
                        if p != k {
                            s.drop_source(p, &mut queue);
                        }
                    }
                }
                s.cursor = k;
                turned = 0;
            } else {
                // Scratch is full: the rest waits for the next phase, from here.
                s.cursor = k;
                break;
            }
        }
        // Deferred nodes stay runnable; they wait only for scratch.
        s.ready = deferred;
        let mut next = VecDeque::new();
        for &k in &step.run {
            s.done[k] = true;
            s.in_phase[k] = false;
            if s.stashed[k] {
                s.live -= s.len(k);
            }
        }
        for &k in &step.run {
            s.release(k, &mut next);
        }
        s.ready.extend(next);
        remaining -= step.run.len();
        step.run.sort_unstable();
        steps.push(step);
    }
    Schedule {
        steps,
        dropped: s.dropped,
        stashed: s.stashed,
        scratch_peak: s.peak,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(offset: u64, len: u32, source: Option<u64>) -> Node {
        Node {
            offset,
            len,
            source,
        }
    }

    /// Replays a schedule on an abstract target and checks that no source is read after
    /// being overwritten and that scratch stays within `scratch`.
    fn check(nodes: &[Node], scratch: u64, s: &Schedule) {
        let mut written = vec![false; nodes.len()];
        let mut in_scratch = vec![false; nodes.len()];
        let overlaps =
            |a: u64, al: u32, b: u64, bl: u32| a < b + u64::from(bl) && b < a + u64::from(al);
        let mut live = 0;
        for step in &s.steps {
            for &j in &step.stash {
                let src = nodes[j].source.unwrap();
                for (k, n) in nodes.iter().enumerate() {
                    assert!(
                        !(written[k] && overlaps(src, nodes[j].len, n.offset, n.len)),
                        "stash of {j} reads what {k} overwrote"
                    );
                }
                in_scratch[j] = true;
                live += u64::from(nodes[j].len);
            }
            assert!(live <= scratch, "scratch {live} > {scratch}");
            for &k in &step.run {
                if let (Some(src), false, false) = (nodes[k].source, s.dropped[k], s.stashed[k]) {
                    // Read during the phase: nothing written earlier or in this phase overlaps.
                    for &w in &step.run {
                        assert!(
                            !overlaps(src, nodes[k].len, nodes[w].offset, nodes[w].len),
                            "{k} read while {w} writes"
                        );
                    }
                    for (w, n) in nodes.iter().enumerate() {
                        assert!(!(written[w] && overlaps(src, nodes[k].len, n.offset, n.len)));
                    }
                }
                if s.stashed[k] {
                    assert!(in_scratch[k]);
                    in_scratch[k] = false;
                    live -= u64::from(nodes[k].len);
                }
            }
            for &k in &step.run {
                assert!(!written[k]);
                written[k] = true;
            }
        }
        assert!(written.iter().all(|w| *w));
    }

    #[test]
    fn swap_uses_scratch_or_fetches() {
        let nodes = [node(0, 10, Some(10)), node(10, 10, Some(0))];
        let s = schedule(&nodes, 100);
        check(&nodes, 100, &s);
        assert_eq!(s.steps.len(), 1);
        assert!(!s.dropped.iter().any(|d| *d));
        let s = schedule(&nodes, 5);
        check(&nodes, 5, &s);
        assert!(
            s.dropped.iter().any(|d| *d),
            "no scratch: one side is fetched"
        );
    }

    #[test]
    fn shift_chains_go_in_scratch_sized_batches() {
        // 100 chunks of 10 bytes shifted forward by 3: each destroys itself and the next.
        let nodes: Vec<Node> = (0..100)
            .map(|i| node(i * 10 + 3, 10, Some(i * 10)))
            .collect();
        let s = schedule(&nodes, 100);
        check(&nodes, 100, &s);
        assert!(!s.dropped.iter().any(|d| *d));
        assert!(s.steps.len() <= 11, "{} phases", s.steps.len());
        // Shift back.
        let nodes: Vec<Node> = (0..100)
            .map(|i| node(i * 10, 10, Some(i * 10 + 4)))
            .collect();
        let s = schedule(&nodes, 50);
        check(&nodes, 50, &s);
        assert!(s.steps.len() <= 21, "{} phases", s.steps.len());
    }

    #[test]
    fn rotation_is_one_long_cycle() {
        let n = 50u64;
        let nodes: Vec<Node> = (0..n)
            .map(|i| node(i * 8, 8, Some(((i + 1) % n) * 8)))
            .collect();
        for scratch in [0, 8, 16, 64, 1000] {
            let s = schedule(&nodes, scratch);
            check(&nodes, scratch, &s);
            let fetched = s.dropped.iter().filter(|d| **d).count();
            if scratch >= 8 {
                assert_eq!(fetched, 0, "scratch {scratch}");
            } else {
                assert_eq!(fetched, 1);
            }
        }
    }

    #[test]
    fn independent_writes_are_one_phase() {
        let nodes: Vec<Node> = (0..20).map(|i| node(i * 10, 10, None)).collect();
        let s = schedule(&nodes, 0);
        assert_eq!(s.steps.len(), 1);
        assert_eq!(s.steps[0].run, (0..20).collect::<Vec<_>>());
    }
}
