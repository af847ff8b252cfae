//! Graph builds: the derivations of a [`GraphPlan`] built in dependency order, each as a
//! build job of its own ([`BuildService::submit`]: its own cores, memory, features and fair
//! share, and shared with an identical build in flight), independent branches at once, at
//! most `[builds] graph_jobs` queued or running at a time. [`nixbuild_core::graph`] decides
//! what may start and what a failure fails; a [`GraphRun`] carries it out.
//!
//! Each derivation's job is made and submitted, and its waiter followed, in a task of its
//! own that reports to the run through one channel, so that [`GraphRun::next`] only waits
//! on that channel and can be given up at any time (the drivers race it with the client's
//! input). Dropping the run aborts those tasks, which drops their waiters: a build that no
//! other client waits for is killed, as for a single build whose client went away.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use nixbuild_core::graph::{BuildGraph, NodeState};
use nixbuild_core::hash::Hash;
use nixbuild_core::serve::{BuildOptions, BuildStatus};
use nixbuild_core::store_path::StorePath;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use super::drv_walk::{self, GraphPlan, Resolved};
use super::{BuildService, Outcome, WaitEvent, LOG_TARGET};

/// Events from the nodes' tasks queued before the run reads them.
const EVENT_DEPTH: usize = 256;

/// What a node's task reports.
enum NodeEvent {
    /// Its job was submitted.
    Started,
    /// A log chunk.
    Log(Bytes),
    /// Its outcome.
    Done(Arc<Outcome>),
}

/// What happened in a graph build, for the client.
#[derive(Debug)]
pub enum GraphEvent {
    /// The build of node `.0` was submitted (it is queued or running).
    Started(usize),
    /// Complete lines of node `.0`'s log (the last line of a finished build may lack its
    /// newline).
    Log(usize, Bytes),
    /// Node `.0` ended, with this outcome (possibly without having started: an input that
    /// vanished).
    Finished(usize, Arc<Outcome>),
}

/// What a request of a graph build came to.
#[derive(Debug, Clone)]
pub struct RequestResult {
    /// The outcome, its outputs the ones asked for.
    pub outcome: Outcome,
    /// The derivation's masked `hashDerivationModulo`, for outputs of a derivation.
    pub drv_hash: Option<Hash>,
}

/// One graph build in progress; see the module's documentation.
pub struct GraphRun {
    service: BuildService,
    account: String,
    options: BuildOptions,
    plan: Arc<GraphPlan>,
    graph: BuildGraph,
    max_jobs: usize,
    outcomes: Vec<Option<Arc<Outcome>>>,
    /// The first node that failed, in time.
    first_failure: Option<usize>,
    tx: mpsc::Sender<(usize, NodeEvent)>,
    rx: mpsc::Receiver<(usize, NodeEvent)>,
    tasks: HashMap<usize, AbortHandle>,
    /// The unfinished last line of each node's log.
    partial: HashMap<usize, Vec<u8>>,
    pending: VecDeque<GraphEvent>,
}

impl Drop for GraphRun {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

impl BuildService {
    /// Works out the graph build of `requests` for `account` (see [`drv_walk`]). With
    /// binary caches configured, a derivation whose missing outputs a cache has is not
    /// built: with `fetch`, those outputs (and missing sources) are fetched and granted to
    /// the account, and the plan is made again from what is then valid (anything a cache
    /// failed to deliver is built or reported after all); without, the plan says what
    /// would be fetched (QueryMissing).
    pub async fn plan_graph(
        &self,
        account: &str,
        requests: Vec<nixbuild_core::worker::DerivedPath>,
        fetch: bool,
    ) -> Result<GraphPlan, drv_walk::DrvError> {
        let store = self.inner.store.clone();
        let substituter = self.inner.substituter.clone();
        let account = account.to_owned();
        let plan = move || {
            let Some(substituter) = substituter else {
                return drv_walk::plan_with(&store, &account, &requests, &|_| BTreeSet::new());
            };
            let first = drv_walk::plan_with(&store, &account, &requests, &|paths| {
                substituter.substitutable(paths)
            })?;
            if !fetch || first.substitute.is_empty() {
                return Ok(first);
            }
            let notes = substituter.substitute_collecting(&account, &first.substitute);
            let mut second =
                drv_walk::plan_with(&store, &account, &requests, &|_| BTreeSet::new())?;
            second.notes = notes;
            Ok(second)
        };
        Ok(tokio::task::spawn_blocking(plan).await??)
    }

    /// Starts building `plan` for `account`, going on after a failure when `keep_going`
    /// (by default as `[builds] keep_going` says).
    pub fn run_graph(
        &self,
        plan: GraphPlan,
        account: &str,
        options: BuildOptions,
        keep_going: Option<bool>,
    ) -> GraphRun {
        let config = self.inner.builds_config();
        let keep_going = keep_going.unwrap_or(config.keep_going);
        // The plan's inputs are acyclic and in range by construction.
        let graph = BuildGraph::new(&plan.inputs, keep_going)
            .unwrap_or_else(|e| unreachable!("a planned graph is a graph: {e}"));
        let (tx, rx) = mpsc::channel(EVENT_DEPTH);
        let max_jobs = usize::try_from(config.graph_jobs)
            .unwrap_or(usize::MAX)
            .max(1);
        tracing::info!(
            target: LOG_TARGET,
            account,
            derivations = plan.len(),
            keep_going,
            "graph build"
        );
        GraphRun {
            service: self.clone(),
            account: account.to_owned(),
            options,
            outcomes: vec![None; plan.len()],
            plan: Arc::new(plan),
            graph,
            max_jobs,
            first_failure: None,
            tx,
            rx,
            tasks: HashMap::new(),
            partial: HashMap::new(),
            pending: VecDeque::new(),
        }
    }
}

impl GraphRun {
    /// How many derivations the graph builds.
    pub fn derivations(&self) -> usize {
        self.graph.len()
    }

    /// The `.drv` of `node`.
    pub fn drv_path(&self, node: usize) -> &StorePath {
        &self.plan.nodes[node].drv_path
    }

    /// What happened next; `None` once every node is settled. Cancel-safe.
    pub async fn next(&mut self) -> Option<GraphEvent> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Some(event);
            }
            self.start_ready();
            if self.graph.is_done() {
                return None;
            }
            // The run holds a sender, so the channel stays open.
            let (node, event) = self.rx.recv().await?;
            if self.graph.state(node) != NodeState::Running {
                continue; // a late report of a stopped node
            }
            match event {
                NodeEvent::Started => return Some(GraphEvent::Started(node)),
                NodeEvent::Log(chunk) => self.log(node, &chunk),
                NodeEvent::Done(outcome) => self.finished(node, outcome),
            }
        }
    }

    /// Submits ready nodes while fewer than `max_jobs` run.
    fn start_ready(&mut self) {
        while self.graph.running() < self.max_jobs {
            let Some(node) = self.graph.next_ready() else {
                return;
            };
            let service = self.service.clone();
            let plan = self.plan.clone();
            let account = self.account.clone();
            let options = self.options;
            let tx = self.tx.clone();
            let task = tokio::spawn(async move {
                let store = service.inner.store.clone();
                let made = tokio::task::spawn_blocking(move || {
                    drv_walk::node_job(&store, &account, &plan.nodes[node], options)
                })
                .await
                .map_err(drv_walk::DrvError::from)
                .and_then(|r| r);
                let job = match made {
                    Ok(job) => job,
                    Err(e) => {
                        let outcome =
                            Outcome::without_build(BuildStatus::MiscFailure, e.to_string());
                        let _ = tx.send((node, NodeEvent::Done(Arc::new(outcome)))).await;
                        return;
                    }
                };
                let mut waiter = service.submit(job).await;
                if tx.send((node, NodeEvent::Started)).await.is_err() {
                    return;
                }
                loop {
                    let (event, done) = match waiter.next().await {
                        WaitEvent::Log(chunk) => (NodeEvent::Log(chunk), false),
                        WaitEvent::Done(outcome) => (NodeEvent::Done(outcome), true),
                    };
                    if tx.send((node, event)).await.is_err() || done {
                        return;
                    }
                }
            });
            self.tasks.insert(node, task.abort_handle());
        }
    }

    /// Queues the complete lines of `chunk`, keeping an unfinished last line.
    fn log(&mut self, node: usize, chunk: &Bytes) {
        let partial = self.partial.entry(node).or_default();
        let Some(last) = chunk.iter().rposition(|&c| c == b'\n') else {
            partial.extend_from_slice(chunk);
            return;
        };
        let lines = if partial.is_empty() {
            chunk.slice(..=last)
        } else {
            let mut joined = std::mem::take(partial);
            joined.extend_from_slice(&chunk[..=last]);
            Bytes::from(joined)
        };
        partial.extend_from_slice(&chunk[last + 1..]);
        self.pending.push_back(GraphEvent::Log(node, lines));
    }

    fn finished(&mut self, node: usize, outcome: Arc<Outcome>) {
        self.tasks.remove(&node);
        if let Some(rest) = self.partial.remove(&node).filter(|p| !p.is_empty()) {
            self.pending
                .push_back(GraphEvent::Log(node, Bytes::from(rest)));
        }
        let built = outcome.status.is_success();
        if !built && self.first_failure.is_none() {
            self.first_failure = Some(node);
        }
        self.outcomes[node] = Some(outcome.clone());
        for stopped in self.graph.finish(node, built) {
            if let Some(task) = self.tasks.remove(&stopped) {
                task.abort();
            }
            self.partial.remove(&stopped);
            tracing::info!(target: LOG_TARGET, account = %self.account, drv = %self.drv_path(stopped), "stopped: another derivation of the graph failed, without keep-going");
        }
        if !built {
            let failed = self.drv_path(node).clone();
            for dependent in 0..self.graph.len() {
                if self.graph.state(dependent) == NodeState::DependencyFailed(node) {
                    tracing::info!(target: LOG_TARGET, account = %self.account, drv = %self.drv_path(dependent), failed = %failed, "dependency failed");
                }
            }
        }
        self.pending.push_back(GraphEvent::Finished(node, outcome));
    }

    /// The outcome of `node` once the graph is done: its build's, or why it did not run.
    fn node_outcome(&self, node: usize) -> Outcome {
        if let Some(o) = &self.outcomes[node] {
            return (**o).clone();
        }
        let drv = self.drv_path(node);
        let message = match self.graph.state(node) {
            NodeState::DependencyFailed(failed) => {
                return Outcome::without_build(
                    BuildStatus::DependencyFailed,
                    format!(
                        "dependency '{}' of derivation '{drv}' failed to build",
                        self.drv_path(failed)
                    ),
                )
            }
            NodeState::Cancelled => match self.first_failure {
                Some(f) => format!(
                    "'{drv}' was not built: '{}' failed first, and this graph build does \
                     not keep going",
                    self.drv_path(f)
                ),
                None => format!("'{drv}' was not built"),
            },
            state => format!("'{drv}' was not built ({state:?})"),
        };
        Outcome::without_build(BuildStatus::MiscFailure, message)
    }

    /// One result per request, in the order asked: valid paths, and the outputs asked for
    /// of derivations built or found valid; failures with their messages.
    pub fn results(&self) -> Vec<RequestResult> {
        self.plan
            .requests
            .iter()
            .map(|r| match r {
                Resolved::Valid => RequestResult {
                    outcome: Outcome::without_build(BuildStatus::AlreadyValid, String::new()),
                    drv_hash: None,
                },
                Resolved::Unknown { message, .. } => RequestResult {
                    outcome: Outcome::without_build(BuildStatus::MiscFailure, message.clone()),
                    drv_hash: None,
                },
                Resolved::Outputs {
                    node,
                    outputs,
                    drv_hash,
                    ..
                } => {
                    let mut outcome = match node {
                        Some(n) => self.node_outcome(*n),
                        None => Outcome::without_build(BuildStatus::AlreadyValid, String::new()),
                    };
                    if outcome.status.is_success() {
                        outcome.outputs = outputs.clone();
                    } else {
                        outcome.outputs = BTreeMap::new();
                    }
                    RequestResult {
                        outcome,
                        drv_hash: Some(*drv_hash),
                    }
                }
            })
            .collect()
    }

    /// The first failure of the graph build, for an answer that carries one message: the
    /// first derivation that failed (its message holds its log's tail), or else the first
    /// request that failed.
    pub fn failure(&self) -> Option<Outcome> {
        if let Some(node) = self.first_failure {
            return Some(self.node_outcome(node));
        }
        self.results()
            .into_iter()
            .map(|r| r.outcome)
            .find(|o| !o.status.is_success())
    }
}
