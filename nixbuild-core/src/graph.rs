//! The order of a graph build: which derivations of a build graph may start, and what a
//! finished one means for the rest, as Nix's own worker decides it.
//!
//! A [`BuildGraph`] holds only the derivations that need building (one node each; inputs
//! already valid are not nodes) and, for each, the nodes that must be built before it. A
//! node becomes ready when all of its inputs are built; [`BuildGraph::next_ready`] hands
//! ready nodes out in the order they became ready, and [`BuildGraph::finish`] records how a
//! started node ended. A failed node fails every node that depends on it, directly or not,
//! with "dependency failed", and never starts them. With keep-going, every other node still
//! runs when its inputs are built; without, nothing new starts after the first failure, and
//! the nodes still running are handed back to be stopped.
//!
//! The graph is pure bookkeeping: the caller starts and stops builds.

use std::collections::VecDeque;

/// Why a graph cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    /// An input index is not a node of the graph.
    #[error("node {node} names input {input}, but the graph has {len} nodes")]
    NoSuchNode {
        /// The node naming it.
        node: usize,
        /// The bad index.
        input: usize,
        /// How many nodes there are.
        len: usize,
    },
    /// The inputs form a cycle (a node needs itself, through its inputs).
    #[error("the build graph has a cycle through node {0}")]
    Cycle(usize),
}

/// Where a node stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Some input is not built yet.
    Waiting,
    /// Every input is built; not started yet.
    Ready,
    /// Handed out by [`BuildGraph::next_ready`], not finished yet.
    Running,
    /// Finished and succeeded.
    Built,
    /// Finished and failed.
    Failed,
    /// Not started: an input (the node given) failed.
    DependencyFailed(usize),
    /// Not started, or stopped while running: another node failed without keep-going.
    Cancelled,
}

impl NodeState {
    /// Whether the node is settled for good.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            NodeState::Waiting | NodeState::Ready | NodeState::Running
        )
    }
}

#[derive(Debug, Clone)]
struct Node {
    state: NodeState,
    /// Inputs not built yet.
    waiting_for: usize,
    /// The nodes that have this one as an input.
    dependents: Vec<usize>,
}

/// The state of one graph build.
#[derive(Debug, Clone)]
pub struct BuildGraph {
    nodes: Vec<Node>,
    ready: VecDeque<usize>,
    keep_going: bool,
    /// Nodes not yet final.
    unsettled: usize,
    running: usize,
}

impl BuildGraph {
    /// A graph of `inputs.len()` nodes, node `i` needing the nodes `inputs[i]` built first
    /// (repeats are ignored). Nodes without inputs are ready at once, in index order.
    pub fn new(inputs: &[Vec<usize>], keep_going: bool) -> Result<BuildGraph, GraphError> {
        let len = inputs.len();
        let mut nodes: Vec<Node> = (0..len)
            .map(|_| Node {
                state: NodeState::Waiting,
                waiting_for: 0,
                dependents: Vec::new(),
            })
            .collect();
        for (node, list) in inputs.iter().enumerate() {
            let mut list = list.clone();
            list.sort_unstable();
            list.dedup();
            for input in list {
                if input >= len {
                    return Err(GraphError::NoSuchNode { node, input, len });
                }
                nodes[node].waiting_for += 1;
                nodes[input].dependents.push(node);
            }
        }
        // Kahn's algorithm on a copy of the counts finds a cycle up front.
        let mut left: Vec<usize> = nodes.iter().map(|n| n.waiting_for).collect();
        let mut queue: Vec<usize> = (0..len).filter(|&i| left[i] == 0).collect();
        let mut seen = 0;
        while let Some(i) = queue.pop() {
            seen += 1;
            for &d in &nodes[i].dependents {
                left[d] -= 1;
                if left[d] == 0 {
                    queue.push(d);
                }
            }
        }
        if seen < len {
            let stuck = (0..len).find(|&i| left[i] > 0).unwrap_or(0);
            return Err(GraphError::Cycle(stuck));
        }
        let mut ready = VecDeque::new();
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.waiting_for == 0 {
                n.state = NodeState::Ready;
                ready.push_back(i);
            }
        }
        Ok(BuildGraph {
            nodes,
            ready,
            keep_going,
            unsettled: len,
            running: 0,
        })
    }

    /// How many nodes the graph has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Where `node` stands.
    pub fn state(&self, node: usize) -> NodeState {
        self.nodes[node].state
    }

    /// How many nodes are running.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Whether every node is settled: nothing runs, and nothing more can start.
    pub fn is_done(&self) -> bool {
        self.unsettled == 0
    }

    /// The next ready node, now running; `None` when none is ready.
    pub fn next_ready(&mut self) -> Option<usize> {
        let node = self.ready.pop_front()?;
        self.nodes[node].state = NodeState::Running;
        self.running += 1;
        Some(node)
    }

    /// Records that the running `node` ended, `built` or failed. Returns the nodes that were
    /// running and are now cancelled (a failure without keep-going), for the caller to stop.
    /// A node that is not running is left as it is (a late report of a cancelled node).
    pub fn finish(&mut self, node: usize, built: bool) -> Vec<usize> {
        if self.nodes[node].state != NodeState::Running {
            return Vec::new();
        }
        self.running -= 1;
        if built {
            self.settle(node, NodeState::Built);
            for d in self.nodes[node].dependents.clone() {
                let n = &mut self.nodes[d];
                n.waiting_for -= 1;
                if n.waiting_for == 0 && n.state == NodeState::Waiting {
                    n.state = NodeState::Ready;
                    self.ready.push_back(d);
                }
            }
            return Vec::new();
        }
        self.settle(node, NodeState::Failed);
        // Every node that depends on it, directly or not, fails with it.
        let mut stack = self.nodes[node].dependents.clone();
        while let Some(d) = stack.pop() {
            if self.nodes[d].state == NodeState::Waiting {
                self.settle(d, NodeState::DependencyFailed(node));
                stack.extend(self.nodes[d].dependents.iter().copied());
            }
        }
        if self.keep_going {
            return Vec::new();
        }
        self.ready.clear();
        let mut stopped = Vec::new();
        for i in 0..self.nodes.len() {
            match self.nodes[i].state {
                NodeState::Running => {
                    self.running -= 1;
                    stopped.push(i);
                    self.settle(i, NodeState::Cancelled);
                }
                NodeState::Waiting | NodeState::Ready => self.settle(i, NodeState::Cancelled),
                _ => {}
            }
        }
        stopped
    }

    fn settle(&mut self, node: usize, state: NodeState) {
        self.nodes[node].state = state;
        self.unsettled -= 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_chain_runs_in_order() {
        // 2 needs 1 needs 0.
        let mut g = BuildGraph::new(&[vec![], vec![0], vec![1]], true).unwrap();
        assert_eq!(g.next_ready(), Some(0));
        assert_eq!(g.next_ready(), None);
        assert!(g.finish(0, true).is_empty());
        assert_eq!(g.next_ready(), Some(1));
        g.finish(1, true);
        assert_eq!(g.next_ready(), Some(2));
        assert!(!g.is_done());
        g.finish(2, true);
        assert!(g.is_done());
        assert_eq!(g.state(2), NodeState::Built);
    }

    #[test]
    fn a_failure_fails_its_dependents_and_the_other_branch_goes_on() {
        // 3 needs 1 and 2; 1 and 2 need 0; 4 is on its own.
        let inputs = [vec![], vec![0], vec![0], vec![1, 2, 2], vec![]];
        let mut g = BuildGraph::new(&inputs, true).unwrap();
        assert_eq!((g.next_ready(), g.next_ready()), (Some(0), Some(4)));
        g.finish(0, true);
        let (a, b) = (g.next_ready().unwrap(), g.next_ready().unwrap());
        assert_eq!((a, b), (1, 2));
        g.finish(1, false);
        assert_eq!(g.state(3), NodeState::DependencyFailed(1));
        assert_eq!(g.state(2), NodeState::Running);
        g.finish(2, true);
        g.finish(4, true);
        assert_eq!(g.next_ready(), None);
        assert!(g.is_done());
    }

    #[test]
    fn without_keep_going_the_first_failure_stops_the_rest() {
        let inputs = [vec![], vec![], vec![0], vec![]];
        let mut g = BuildGraph::new(&inputs, false).unwrap();
        assert_eq!(g.next_ready(), Some(0));
        assert_eq!(g.next_ready(), Some(1));
        assert_eq!(g.finish(1, false), vec![0]);
        assert_eq!(g.state(0), NodeState::Cancelled);
        assert_eq!(g.state(2), NodeState::Cancelled);
        assert_eq!(g.state(3), NodeState::Cancelled);
        assert_eq!(g.next_ready(), None);
        assert!(g.is_done());
        // A late report of the stopped node changes nothing.
        assert!(g.finish(0, true).is_empty());
        assert_eq!(g.state(0), NodeState::Cancelled);
    }

    #[test]
    fn bad_graphs_are_refused() {
        assert_eq!(
            BuildGraph::new(&[vec![1]], true).unwrap_err(),
            GraphError::NoSuchNode {
                node: 0,
                input: 1,
                len: 1
            }
        );
        assert!(matches!(
            BuildGraph::new(&[vec![], vec![2], vec![1]], true),
            Err(GraphError::Cycle(1 | 2))
        ));
        assert!(BuildGraph::new(&[vec![0]], true).is_err());
        assert!(BuildGraph::new(&[], true).unwrap().is_done());
    }

    /// A random acyclic graph (inputs only of lower index), which nodes fail, and the
    /// choices of which running node finishes next.
    fn case() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<bool>, Vec<usize>, usize, bool)> {
        (1usize..40).prop_flat_map(|n| {
            let inputs = (0..n)
                .map(|i| proptest::collection::vec(0..i.max(1), 0..4.min(i + 1)))
                .collect::<Vec<_>>();
            (
                inputs.prop_map(|mut v| {
                    v[0].clear();
                    v
                }),
                proptest::collection::vec(proptest::bool::weighted(0.15), n),
                proptest::collection::vec(any::<usize>(), 4 * n),
                1usize..6,
                any::<bool>(),
            )
        })
    }

    proptest! {
        /// Whatever the graph, failures and order of completion: a node starts only after
        /// each of its inputs was built, at most once, and at most `parallel` at a time;
        /// at the end every node is settled; a dependency-failed node has a failed input
        /// among its ancestors; with keep-going every node without a failed ancestor ran;
        /// without, nothing started after the first failure.
        #[test]
        fn graph_order_holds((inputs, fails, picks, parallel, keep_going) in case()) {
            let mut g = BuildGraph::new(&inputs, keep_going).unwrap();
            let n = inputs.len();
            let mut started = vec![false; n];
            let mut built = vec![false; n];
            let mut running: Vec<usize> = Vec::new();
            let mut failed_once = false;
            let mut picks = picks.into_iter();
            loop {
                while running.len() < parallel {
                    let Some(node) = g.next_ready() else { break };
                    prop_assert!(!started[node], "node {} started twice", node);
                    prop_assert!(!failed_once || keep_going, "a start after a failure");
                    for &i in &inputs[node] {
                        prop_assert!(built[i], "node {} started before input {}", node, i);
                    }
                    started[node] = true;
                    running.push(node);
                }
                prop_assert_eq!(g.running(), running.len());
                if running.is_empty() {
                    break;
                }
                let k = picks.next().unwrap_or(0) % running.len();
                let node = running.swap_remove(k);
                let ok = !fails[node];
                built[node] = ok;
                failed_once |= !ok;
                for stopped in g.finish(node, ok) {
                    running.retain(|&r| r != stopped);
                }
            }
            prop_assert!(g.is_done());
            // The ancestors of each node that failed.
            let mut doomed = vec![false; n];
            for i in 0..n {
                doomed[i] = inputs[i].iter().any(|&j| doomed[j] || (started[j] && fails[j]));
            }
            for i in 0..n {
                let state = g.state(i);
                prop_assert!(state.is_final());
                match state {
                    NodeState::Built => prop_assert!(started[i] && !fails[i]),
                    NodeState::Failed => prop_assert!(started[i] && fails[i]),
                    NodeState::DependencyFailed(j) => {
                        prop_assert!(!started[i] && doomed[i]);
                        prop_assert_eq!(g.state(j), NodeState::Failed);
                    }
                    NodeState::Cancelled => prop_assert!(!keep_going),
                    _ => unreachable!(),
                }
                if keep_going && !doomed[i] {
                    prop_assert!(started[i], "node {} never ran", i);
                }
            }
        }
    }
}
