//! The build scheduler: which waiting build starts next, on which machine, with which cores
//! and how much memory.
//!
//! A deterministic state machine with no I/O and no clock: every event carries the time as a
//! [`Duration`] since an origin of the caller's choosing (times that go backwards count as
//! the latest time seen). The server feeds it events — [`Scheduler::submit`],
//! [`Scheduler::complete`], [`Scheduler::cancel`], [`Scheduler::set_capacity`] — and after
//! each one asks [`Scheduler::decide`] which builds to start.
//!
//! # Policies
//!
//! - **No over-commit.** A build gets its own cores (a set of core indices of one machine,
//!   for a cpuset) and its own memory; a machine never runs more cores, memory or builds than
//!   it has. A capacity change never stops running builds, but nothing starts on a machine
//!   until its running builds fit the new capacity.
//! - **Requests.** A build asks for explicit cores and memory, or takes the defaults:
//!   [`SchedulerConfig::default_cores`] (at most the machine's cores), or for a build that
//!   requires `big-parallel`, [`SchedulerConfig::big_parallel_percent`] of the machine's
//!   cores (default all of them); and [`SchedulerConfig::default_memory`] (at most the
//!   machine's), or when unset the machine's memory in proportion to the cores granted.
//! - **Refusal.** A build that no machine could ever run — system or features not offered in
//!   Nix's meaning ([`Machine`]), more cores or memory than any suitable machine has — is
//!   refused at once by [`Scheduler::submit`] with a [`Refusal`] saying why.
//! - **Fair share.** Accounts share by weight ([`SchedulerConfig::weights`], default 1). An
//!   account's usage counts core-seconds and halves every [`SchedulerConfig::half_life`]
//!   (default one hour). The next build comes from the account whose usage, plus a charge
//!   for each running build of its cores times the expected build duration (a moving average
//!   of completed builds), divided by its weight, is lowest (details in `fairshare.rs`).
//!   Ties go to the higher priority, then to the earlier build.
//! - **FIFO within an account, with priority.** An account's builds go by priority (higher
//!   first), then by arrival.
//! - **No head-of-line blocking.** A build that does not fit now is passed over for the next
//!   one that does, in the same account or another (backfilling), with one exception:
//!
//! # The anti-starvation rule
//!
//! A waiting build is *bypassed* when a build that comes after it in the scheduling order
//! (a later or lower-priority build of its account, or a build of an account that stands
//! behind its own in fair share) starts on a machine that could run it while it does not fit
//! there. Only a larger build (more cores or memory) can be bypassed: had it asked for no
//! more, it would have fitted too. Once the first build of an account's queue for one kind of
//! build (same system, features and request) has been bypassed for
//! [`SchedulerConfig::starvation_after`] (default 5 minutes) since the first time, and fits on
//! no machine, it gets a *reservation*: of the machines it could run on that are not reserved
//! already, the one closest to fitting it (smallest missing share of cores plus memory, then
//! lowest index) starts nothing else until the build starts, there or elsewhere, or is
//! cancelled. The next build of that queue starts its own count. Reservations go out longest
//! bypassed first, one per machine and one per kind of build at a time (builds of a kind are
//! interchangeable: one drained machine serves them in turn, and starving builds cannot
//! drain every machine at once). Bypasses by other accounts' builds are attributed, with the
//! accounts' standings then, at most once a second of scheduler time (or every
//! `starvation_after`, if shorter). This is the only case in which a machine with room for a
//! waiting build leaves it waiting.
//!
//! # Waiting builds
//!
//! [`Scheduler::waiting_status`] says what a waiting build waits for and its estimated
//! position, for lines such as `nixbuild: waiting for 4 cores (position 3 of 7; 2 builds
//! running)`.

mod fairshare;
mod machine;
mod refusal;
mod request;
mod status;
#[cfg(test)]
mod tests;

pub use machine::Machine;
pub use refusal::Refusal;
pub use status::{ByteCount, WaitReason, WaitStatus};

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

use fairshare::{Clock, DurationEstimate, Usage};
use request::{Need, ShapeKey};

/// Misuse of the scheduler's API, or an invalid configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchedError {
    /// A configuration value is out of range.
    #[error("invalid scheduler configuration: {field}: {reason}")]
    Config {
        /// The field, as named in [`SchedulerConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// No waiting or running build has this id.
    #[error("no waiting or running build {0}")]
    UnknownBuild(BuildId),
    /// The build runs, so it cannot be cancelled: kill it, then [`Scheduler::complete`] it.
    #[error("build {0} is running, not waiting")]
    Running(BuildId),
    /// The build waits, so it cannot complete: [`Scheduler::cancel`] it.
    #[error("build {0} is waiting, not running")]
    Waiting(BuildId),
    /// No machine has this id.
    #[error("no machine {0}")]
    UnknownMachine(MachineId),
    /// More machines than machine ids.
    #[error("too many machines")]
    TooManyMachines,
}

/// The scheduler's policy settings (the `[scheduler]` section of the server's configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How fast past usage is forgotten: an account's usage halves in this time. Default one
    /// hour. Must not be zero.
    pub half_life: Duration,
    /// Cores a build gets unless it asks for a number (at most the machine's). Default 1.
    pub default_cores: u32,
    /// Memory in bytes a build gets unless it asks (at most the machine's). Default `None`:
    /// the machine's memory in proportion to the cores granted.
    pub default_memory: Option<u64>,
    /// Share of a machine's cores, in percent rounded up, that a build requiring
    /// `big-parallel` gets unless it asks for a number. Default 100 (all of them); 1..=100.
    pub big_parallel_percent: u32,
    /// How long a build may be bypassed by later, smaller builds before a machine is kept
    /// free for it (the anti-starvation rule). Default 5 minutes.
    pub starvation_after: Duration,
    /// Fair-share weights by account name; an account not listed weighs 1. At least 1.
    pub weights: BTreeMap<String, u32>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            half_life: Duration::from_secs(3600),
            default_cores: 1,
            default_memory: None,
            big_parallel_percent: 100,
            starvation_after: Duration::from_secs(300),
            weights: BTreeMap::new(),
        }
    }
}

impl SchedulerConfig {
    /// Checks every value's range.
    pub fn check(&self) -> Result<(), SchedError> {
        let invalid = |field, reason: &str| {
            Err(SchedError::Config {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.half_life.is_zero() {
            return invalid("half_life", "must be longer than zero");
        }
        if self.default_cores == 0 {
            return invalid("default_cores", "must be at least 1");
        }
        if self.default_memory == Some(0) {
            return invalid("default_memory", "must be at least 1 byte");
        }
        if !(1..=100).contains(&self.big_parallel_percent) {
            return invalid("big_parallel_percent", "must be in 1..=100");
        }
        if let Some((account, _)) = self.weights.iter().find(|(_, w)| **w == 0) {
            return Err(SchedError::Config {
                field: "weights",
                reason: format!("the weight of {account:?} must be at least 1"),
            });
        }
        Ok(())
    }
}

/// A build as it arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildSpec {
    /// The account it is built for.
    pub account: String,
    /// The derivation's system.
    pub system: String,
    /// The derivation's `requiredSystemFeatures`.
    pub required_features: Vec<String>,
    /// Cores asked for; `None`: the configured default.
    pub cores: Option<u32>,
    /// Memory asked for, in bytes; `None`: the configured default.
    pub memory: Option<u64>,
    /// Higher goes first among the account's builds. Default 0.
    pub priority: i32,
}

/// A build's id, unique for the scheduler's lifetime; ids grow with arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildId(u64);

impl BuildId {
    /// The id as a number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for BuildId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A machine's id: its index in the list given to [`Scheduler::new`], then in the order of
/// [`Scheduler::add_machine`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MachineId(pub u32);

impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "machine {}", self.0)
    }
}

/// A decision: start this build now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// The build.
    pub id: BuildId,
    /// The machine it runs on.
    pub machine: MachineId,
    /// Its cores: indices in `0..cores` of the machine, ascending, held by no other build.
    pub cores: Vec<u32>,
    /// Its memory in bytes.
    pub memory: u64,
    /// Whether it starts on a machine that was kept free for it (anti-starvation rule).
    pub reserved: bool,
}

/// Where a build is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildState {
    /// In the queue.
    Waiting,
    /// Running on this machine.
    Running(MachineId),
}

/// The scheduler. See the module documentation for its policies.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    clock: Clock,
    /// The latest time seen, in seconds.
    now: f64,
    /// `clock.growth(now)`.
    growth: f64,
    /// Expected build duration, for fair-share charges.
    estimate: DurationEstimate,
    specs: Vec<Machine>,
    /// Whether the machines' speeds differ (the choice among machines then looks at them).
    speeds_differ: bool,
    slots: Vec<Slot>,
    /// Machines whose free resources grew since the last decision that started nothing.
    dirty: Vec<u32>,
    /// Shapes that arrived fitting on a machine, with that machine and the shape's
    /// generation. Invariant: a waiting build fits on an unreserved machine only if the
    /// machine is dirty or its shape is here, so a decision looks at these only.
    fresh: Vec<(usize, u32, u32)>,
    accounts: Vec<Account>,
    /// Fair-share state by account.
    fair: Vec<Fair>,
    /// Standing per weight by account, computed when needed.
    standings: Standings,
    /// The time `order` was last sorted at.
    order_time: f64,
    /// Accounts with waiting builds, nearly sorted by standing: sorted again (insertion sort,
    /// cheap when little moved) before a decision walks it. May hold inactive accounts,
    /// dropped when sorting.
    order: Vec<u32>,
    order_sorted: bool,
    account_ids: HashMap<String, u32>,
    /// Accounts with waiting builds.
    active: Vec<u32>,
    builds: HashMap<u64, Build>,
    shapes: Vec<Option<Shape>>,
    /// Generation of each shape slot, bumped when the slot is freed.
    shape_gen: Vec<u32>,
    shape_ids: HashMap<ShapeKey, usize>,
    free_shapes: Vec<usize>,
    /// Shapes with bypasses by other accounts' builds not yet attributed to queues.
    pending_bypass: Vec<usize>,
    /// Queues whose first build has been bypassed (members with `bypassed_since`).
    bypassed: usize,
    /// Reserved machine by build.
    reservations: BTreeMap<u64, u32>,
    /// When bypasses were last attributed and reservations handed out.
    last_sweep: f64,
    next_id: u64,
    waiting: usize,
    /// Number of the current decision, to visit each shape once.
    stamp: u64,
    /// Scratch list of the current decision: shapes that fit, with a machine.
    fitting: Vec<(usize, u32)>,
}

/// Order of an account's builds: higher priority first, then earlier arrival.
type Order = (Reverse<i32>, u64);

#[derive(Debug)]
struct Build {
    account: u32,
    priority: i32,
    /// Its shape while it waits.
    shape: usize,
    /// Its resources once it runs.
    run: Option<Alloc>,
}

#[derive(Debug)]
struct Alloc {
    machine: u32,
    cores: Vec<u32>,
    memory: u64,
    /// Start time, in seconds.
    started: f64,
    /// Its fair-share charge, in core-seconds.
    charge: f64,
}

#[derive(Debug)]
struct Account {
    /// Waiting builds by shape.
    queues: Vec<Queue>,
    /// All waiting builds.
    waiting: BTreeSet<Order>,
    /// Index in `Scheduler::active` while it has waiting builds.
    active_at: Option<usize>,
}

/// An account's fair-share state, kept apart from its queues so that comparing accounts
/// reads one small array.
#[derive(Debug, Clone, Default)]
struct Fair {
    usage: Usage,
    weight: f64,
}

impl Fair {
    fn standing(&self, clock: &Clock, growth: f64) -> f64 {
        self.usage.standing(clock, growth) / self.weight
    }
}

/// Standings per weight by account, each computed at most once per time and change of the
/// account's running builds.
#[derive(Debug, Default)]
struct Standings {
    values: Vec<f64>,
    /// The time each value is for; NaN when the account's running builds changed since.
    at: Vec<f64>,
}

impl Standings {
    fn get(&mut self, a: u32, fair: &[Fair], clock: &Clock, growth: f64, now: f64) -> f64 {
        let a = a as usize;
        if self.at[a] != now {
            self.at[a] = now;
            self.values[a] = fair[a].standing(clock, growth);
        }
        self.values[a]
    }

    fn forget(&mut self, a: u32) {
        self.at[a as usize] = f64::NAN;
    }
}

impl Account {
    fn queue_mut(&mut self, shape: usize) -> Option<&mut Queue> {
        self.queues.iter_mut().find(|q| q.shape == shape)
    }
}

/// An account's waiting builds of one shape.
#[derive(Debug)]
struct Queue {
    shape: usize,
    builds: BTreeSet<Order>,
    /// Index of the account in the shape's `members`.
    member_at: usize,
}

/// An account with waiting builds of a shape (a queue), and the first of them.
#[derive(Debug, Clone, Copy)]
struct Member {
    account: u32,
    head: Order,
    /// When the queue's first build was first bypassed.
    bypassed_since: Option<f64>,
}

/// Waiting builds with the same [`ShapeKey`].
#[derive(Debug)]
struct Shape {
    key: ShapeKey,
    /// Machines that could ever run it and what it takes on each, by machine index.
    needs: Vec<Need>,
    /// Its waiting builds.
    waiting: BTreeSet<u64>,
    /// The accounts with waiting builds of this shape.
    members: Vec<Member>,
    /// Members with `bypassed_since`.
    bypassed: usize,
    /// Bypasses by builds of other accounts since the last sweep: the first time, and the
    /// highest standing per weight among the accounts of the builds that went first.
    pending_bypass: Option<(f64, f64)>,
    /// The last decision that found it fitting, and on which machine.
    seen: u64,
    /// The last decision whose build started on a machine that could run this shape but
    /// has no room for it (see `record_bypasses`).
    unfit: u64,
    fit_machine: u32,
}

impl Shape {
    fn need_on(&self, machine: u32) -> Option<Need> {
        self.needs
            .binary_search_by_key(&machine, |n| n.machine)
            .ok()
            .map(|i| self.needs[i])
    }
}

/// A shape that could run on a machine, as the machine lists it.
#[derive(Debug, Clone, Copy)]
struct SlotShape {
    shape: usize,
    /// The shape slot's generation when listed: entries of freed shapes are skipped, and
    /// dropped in bulk.
    generation: u32,
    need: Need,
}

/// A machine's running state.
#[derive(Debug)]
struct Slot {
    cores: u32,
    memory: u64,
    max_jobs: u32,
    /// Cores in use, one bit per index.
    used: Vec<u64>,
    /// Unused indices below `cores`.
    free_cores: u32,
    used_memory: u64,
    jobs: u32,
    reserved_for: Option<u64>,
    /// Whether builds may start here ([`Scheduler::set_available`]).
    available: bool,
    /// Whether it is in `Scheduler::dirty`.
    dirty: bool,
    /// Shapes that could run here.
    shapes: Vec<SlotShape>,
    /// Entries of `shapes` whose shape has been freed.
    stale: usize,
}

impl Slot {
    fn new(spec: &Machine) -> Slot {
        let mut slot = Slot {
            cores: 0,
            memory: 0,
            max_jobs: 0,
            used: Vec::new(),
            free_cores: 0,
            used_memory: 0,
            jobs: 0,
            reserved_for: None,
            available: true,
            dirty: false,
            shapes: Vec::new(),
            stale: 0,
        };
        slot.set_capacity(spec);
        slot
    }

    fn set_capacity(&mut self, spec: &Machine) {
        self.cores = spec.cores;
        self.memory = spec.memory;
        self.max_jobs = spec.max_jobs;
        let words = spec.cores.div_ceil(64) as usize;
        if self.used.len() < words {
            self.used.resize(words, 0);
        }
        self.free_cores = (0..spec.cores).filter(|&i| !self.is_used(i)).count() as u32;
    }

    fn is_used(&self, core: u32) -> bool {
        self.used
            .get((core / 64) as usize)
            .is_some_and(|w| w & (1 << (core % 64)) != 0)
    }

    fn free_memory(&self) -> u64 {
        self.memory.saturating_sub(self.used_memory)
    }

    fn fits(&self, need: &Need) -> bool {
        self.available
            && self.free_cores >= need.cores
            && self.free_memory() >= need.memory
            && self.jobs < self.max_jobs
    }

    /// Takes the `n` lowest free cores (the caller checked that there are `n`).
    fn take_cores(&mut self, n: u32) -> Vec<u32> {
        let mut taken = Vec::with_capacity(n as usize);
        for (w, word) in self.used.iter_mut().enumerate() {
            while taken.len() < n as usize && *word != u64::MAX {
                let bit = (!*word).trailing_zeros();
                let core = w as u32 * 64 + bit;
                if core >= self.cores {
                    break;
                }
                *word |= 1 << bit;
                taken.push(core);
            }
            if taken.len() == n as usize {
                break;
            }
        }
        self.free_cores -= taken.len() as u32;
        taken
    }

    fn release(&mut self, alloc: &Alloc) {
        for &core in &alloc.cores {
            if let Some(word) = self.used.get_mut((core / 64) as usize) {
                *word &= !(1 << (core % 64));
            }
            if core < self.cores {
                self.free_cores += 1;
            }
        }
        self.used_memory = self.used_memory.saturating_sub(alloc.memory);
        self.jobs = self.jobs.saturating_sub(1);
    }
}

/// Adds machine `m` to the dirty list.
fn mark_dirty(slots: &mut [Slot], dirty: &mut Vec<u32>, m: u32) {
    let slot = &mut slots[m as usize];
    if !slot.dirty {
        slot.dirty = true;
        dirty.push(m);
    }
}

impl Scheduler {
    /// A scheduler for these machines (their indices are their [`MachineId`]s).
    pub fn new(config: SchedulerConfig, machines: Vec<Machine>) -> Result<Scheduler, SchedError> {
        config.check()?;
        if u32::try_from(machines.len()).is_err() {
            return Err(SchedError::TooManyMachines);
        }
        let clock = Clock::new(config.half_life.as_secs_f64());
        let growth = clock.growth(0.0);
        Ok(Scheduler {
            config,
            clock,
            now: 0.0,
            growth,
            estimate: DurationEstimate::new(),
            slots: machines.iter().map(Slot::new).collect(),
            speeds_differ: speeds_differ(&machines),
            specs: machines,
            dirty: Vec::new(),
            fresh: Vec::new(),
            accounts: Vec::new(),
            fair: Vec::new(),
            standings: Standings::default(),
            order_time: f64::NAN,
            order: Vec::new(),
            order_sorted: true,
            account_ids: HashMap::new(),
            active: Vec::new(),
            builds: HashMap::new(),
            shapes: Vec::new(),
            shape_gen: Vec::new(),
            shape_ids: HashMap::new(),
            free_shapes: Vec::new(),
            pending_bypass: Vec::new(),
            bypassed: 0,
            reservations: BTreeMap::new(),
            last_sweep: f64::NEG_INFINITY,
            next_id: 1,
            waiting: 0,
            stamp: 0,
            fitting: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The machines, by [`MachineId`].
    pub fn machines(&self) -> &[Machine] {
        &self.specs
    }

    /// Builds waiting.
    pub fn waiting_count(&self) -> usize {
        self.waiting
    }

    /// Builds running.
    pub fn running_count(&self) -> usize {
        self.builds.len() - self.waiting
    }

    /// Whether a build waits or runs; `None` once it completed, was cancelled or refused.
    pub fn build_state(&self, id: BuildId) -> Option<BuildState> {
        let build = self.builds.get(&id.0)?;
        Some(match &build.run {
            None => BuildState::Waiting,
            Some(run) => BuildState::Running(MachineId(run.machine)),
        })
    }

    /// The machines kept free for starving builds (the anti-starvation rule), by build.
    pub fn reservations(&self) -> impl Iterator<Item = (BuildId, MachineId)> + '_ {
        self.reservations
            .iter()
            .map(|(&b, &m)| (BuildId(b), MachineId(m)))
    }

    /// An account's decayed usage in core-seconds at the latest time seen (0 for an account
    /// never seen).
    pub fn account_usage(&self, account: &str) -> f64 {
        self.account_ids.get(account).map_or(0.0, |&a| {
            self.fair[a as usize].usage.usage(&self.clock, self.growth)
        })
    }

    /// An account's fair-share standing per weight now: lower goes first.
    fn standing(&self, account: u32) -> f64 {
        self.fair[account as usize].standing(&self.clock, self.growth)
    }

    /// Sorts `order` by the standings now.
    fn refresh_order(&mut self) {
        if self.order_time != self.now {
            self.order_time = self.now;
            self.order_sorted = false;
        }
        if self.order_sorted {
            return;
        }
        let accounts = &self.accounts;
        self.order
            .retain(|&a| accounts[a as usize].active_at.is_some());
        for &a in &self.order {
            self.standings
                .get(a, &self.fair, &self.clock, self.growth, self.now);
        }
        // Insertion sort: between decisions few accounts move, and not far.
        let standings = &self.standings.values;
        for i in 1..self.order.len() {
            let a = self.order[i];
            let mut j = i;
            while j > 0 && standings[self.order[j - 1] as usize] > standings[a as usize] {
                self.order[j] = self.order[j - 1];
                j -= 1;
            }
            self.order[j] = a;
        }
        self.order_sorted = true;
    }

    /// Records that an account's running builds changed: its standing moves.
    fn restand(&mut self, account: u32) {
        self.standings.forget(account);
        self.order_sorted = false;
    }

    /// Moves the clock to `now` (never backwards) and returns it in seconds.
    fn advance(&mut self, now: Duration) -> f64 {
        let t = now.as_secs_f64().max(self.now);
        if self.clock.needs_rebase(t) {
            let factor = self.clock.rebase(t);
            for fair in &mut self.fair {
                fair.usage.rebase(factor);
            }
        }
        self.now = t;
        self.growth = self.clock.growth(t);
        t
    }

    /// Queues a build, or refuses it at once when no machine could ever run it.
    pub fn submit(&mut self, spec: BuildSpec, now: Duration) -> Result<BuildId, Refusal> {
        self.advance(now);
        let key = ShapeKey::new(
            &spec.system,
            &spec.required_features,
            spec.cores,
            spec.memory,
        )?;
        let (shape, new_shape) = match self.shape_ids.get(&key) {
            Some(&s) => (s, false),
            None => {
                let needs = key.placements(&self.specs, &self.config)?;
                (self.add_shape(key, needs), true)
            }
        };
        let account = self.account(&spec.account);
        let id = self.next_id;
        self.next_id += 1;
        let order = (Reverse(spec.priority), id);
        let Some(sh) = self.shapes[shape].as_mut() else {
            return Err(Refusal::NoCapacity {
                system: spec.system,
            });
        };
        let acc = &mut self.accounts[account as usize];
        match acc.queue_mut(shape) {
            Some(q) => {
                q.builds.insert(order);
                if q.builds.first() == Some(&order) {
                    sh.members[q.member_at].head = order;
                }
            }
            None => {
                acc.queues.push(Queue {
                    shape,
                    builds: BTreeSet::from([order]),
                    member_at: sh.members.len(),
                });
                sh.members.push(Member {
                    account,
                    head: order,
                    bypassed_since: None,
                });
            }
        }
        acc.waiting.insert(order);
        if acc.active_at.is_none() {
            acc.active_at = Some(self.active.len());
            self.active.push(account);
            if !self.order.contains(&account) {
                self.order.push(account);
            }
            self.standings.forget(account);
            self.order_sorted = false;
        }
        sh.waiting.insert(id);
        if new_shape {
            // Builds of a shape that was already waiting fit on no clean machine; a new one
            // may fit anywhere.
            let slots = &self.slots;
            let fits = sh.needs.iter().find(|n| {
                let slot = &slots[n.machine as usize];
                slot.reserved_for.is_none() && slot.fits(n)
            });
            if let Some(n) = fits {
                self.fresh.push((shape, n.machine, self.shape_gen[shape]));
            }
        }
        self.builds.insert(
            id,
            Build {
                account,
                priority: spec.priority,
                shape,
                run: None,
            },
        );
        self.waiting += 1;
        Ok(BuildId(id))
    }

    fn account(&mut self, name: &str) -> u32 {
        if let Some(&a) = self.account_ids.get(name) {
            return a;
        }
        let a = self.accounts.len() as u32;
        let weight = self.config.weights.get(name).copied().unwrap_or(1);
        self.fair.push(Fair {
            usage: Usage::default(),
            weight: f64::from(weight),
        });
        self.standings.values.push(f64::NAN);
        self.standings.at.push(f64::NAN);
        self.accounts.push(Account {
            queues: Vec::new(),
            waiting: BTreeSet::new(),
            active_at: None,
        });
        self.account_ids.insert(name.to_owned(), a);
        a
    }

    fn add_shape(&mut self, key: ShapeKey, needs: Vec<Need>) -> usize {
        let s = match self.free_shapes.pop() {
            Some(s) => s,
            None => {
                self.shapes.push(None);
                self.shape_gen.push(0);
                self.shapes.len() - 1
            }
        };
        for n in &needs {
            self.slots[n.machine as usize].shapes.push(SlotShape {
                shape: s,
                generation: self.shape_gen[s],
                need: *n,
            });
        }
        self.shape_ids.insert(key.clone(), s);
        self.shapes[s] = Some(Shape {
            key,
            needs,
            waiting: BTreeSet::new(),
            members: Vec::new(),
            bypassed: 0,
            pending_bypass: None,
            seen: 0,
            unfit: 0,
            fit_machine: 0,
        });
        s
    }

    fn remove_shape(&mut self, s: usize) {
        let Some(shape) = self.shapes[s].take() else {
            return;
        };
        self.shape_gen[s] = self.shape_gen[s].wrapping_add(1);
        for n in &shape.needs {
            let slot = &mut self.slots[n.machine as usize];
            slot.stale += 1;
            // Decisions walk these lists: keep at most a quarter stale.
            if slot.stale * 4 > slot.shapes.len() {
                let (shapes, generations) = (&self.shapes, &self.shape_gen);
                slot.shapes
                    .retain(|e| shapes[e.shape].is_some() && generations[e.shape] == e.generation);
                slot.stale = 0;
            }
        }
        self.shape_ids.remove(&shape.key);
        self.free_shapes.push(s);
    }

    /// Takes a waiting build out of the queues (it starts, is cancelled or refused) and
    /// gives up its reservation.
    fn unqueue(&mut self, id: u64) {
        let Some(build) = self.builds.get(&id) else {
            return;
        };
        let (a, s, order) = (build.account, build.shape, (Reverse(build.priority), id));
        let acc = &mut self.accounts[a as usize];
        // The account whose queue of shape `s` must learn its new index in `members`.
        let mut moved_member = None;
        if let Some(i) = acc.queues.iter().position(|q| q.shape == s) {
            let queue = &mut acc.queues[i];
            let was_head = queue.builds.first() == Some(&order);
            queue.builds.remove(&order);
            let member_at = queue.member_at;
            let next = queue.builds.first().copied();
            if let Some(shape) = self.shapes[s].as_mut() {
                // A new first build starts its own count.
                if was_head && shape.members[member_at].bypassed_since.take().is_some() {
                    shape.bypassed -= 1;
                    self.bypassed -= 1;
                }
                match next {
                    Some(head) => shape.members[member_at].head = head,
                    None => {
                        shape.members.swap_remove(member_at);
                        moved_member = shape.members.get(member_at).map(|m| (m.account, member_at));
                    }
                }
            }
            if next.is_none() {
                acc.queues.swap_remove(i);
            }
        }
        acc.waiting.remove(&order);
        if acc.waiting.is_empty() {
            if let Some(at) = acc.active_at.take() {
                self.active.swap_remove(at);
                if let Some(&moved) = self.active.get(at) {
                    self.accounts[moved as usize].active_at = Some(at);
                }
            }
        }
        if let Some((account, member_at)) = moved_member {
            if let Some(q) = self.accounts[account as usize].queue_mut(s) {
                q.member_at = member_at;
            }
        }
        self.waiting -= 1;
        if let Some(shape) = self.shapes[s].as_mut() {
            shape.waiting.remove(&id);
            if shape.waiting.is_empty() {
                self.remove_shape(s);
            }
        }
        if let Some(m) = self.reservations.remove(&id) {
            self.slots[m as usize].reserved_for = None;
            mark_dirty(&mut self.slots, &mut self.dirty, m);
        }
    }

    /// A running build has ended (its processes are gone): its resources are free.
    pub fn complete(&mut self, id: BuildId, now: Duration) -> Result<(), SchedError> {
        let build = self.builds.get(&id.0).ok_or(SchedError::UnknownBuild(id))?;
        if build.run.is_none() {
            return Err(SchedError::Waiting(id));
        }
        let t = self.advance(now);
        let Some(Build {
            account,
            run: Some(alloc),
            ..
        }) = self.builds.remove(&id.0)
        else {
            return Err(SchedError::UnknownBuild(id));
        };
        self.slots[alloc.machine as usize].release(&alloc);
        mark_dirty(&mut self.slots, &mut self.dirty, alloc.machine);
        self.estimate.observe(t - alloc.started);
        self.fair[account as usize].usage.end(
            &self.clock,
            self.growth,
            alloc.cores.len() as u32,
            alloc.charge,
        );
        self.restand(account);
        Ok(())
    }

    /// A waiting build is no longer wanted (its last waiter has gone).
    pub fn cancel(&mut self, id: BuildId, now: Duration) -> Result<(), SchedError> {
        let build = self.builds.get(&id.0).ok_or(SchedError::UnknownBuild(id))?;
        if build.run.is_some() {
            return Err(SchedError::Running(id));
        }
        self.advance(now);
        self.unqueue(id.0);
        self.builds.remove(&id.0);
        Ok(())
    }

    /// Adds a machine; returns its id.
    pub fn add_machine(&mut self, spec: Machine, now: Duration) -> Result<MachineId, SchedError> {
        let id = u32::try_from(self.specs.len()).map_err(|_| SchedError::TooManyMachines)?;
        self.advance(now);
        self.slots.push(Slot::new(&spec));
        self.specs.push(spec);
        self.speeds_differ = speeds_differ(&self.specs);
        // Only grows what can run: nothing waiting is refused.
        self.replan();
        Ok(MachineId(id))
    }

    /// Changes what a machine offers. Running builds keep running; waiting builds that no
    /// machine can run any more are refused and returned with the reason. A machine is taken
    /// out of service with a job limit of 0.
    pub fn set_capacity(
        &mut self,
        machine: MachineId,
        spec: Machine,
        now: Duration,
    ) -> Result<Vec<(BuildId, Refusal)>, SchedError> {
        if self.slots.len() <= machine.0 as usize {
            return Err(SchedError::UnknownMachine(machine));
        }
        self.advance(now);
        self.slots[machine.0 as usize].set_capacity(&spec);
        self.specs[machine.0 as usize] = spec;
        self.speeds_differ = speeds_differ(&self.specs);
        Ok(self.replan())
    }

    /// Whether builds may start on a machine: an unavailable one (a builder that is down)
    /// starts nothing but still counts as able to run what it offers, so nothing waiting
    /// for it is refused; running builds are not touched. Made available again, it is
    /// looked at in the next decision.
    pub fn set_available(
        &mut self,
        machine: MachineId,
        available: bool,
        now: Duration,
    ) -> Result<(), SchedError> {
        let slot = self
            .slots
            .get_mut(machine.0 as usize)
            .ok_or(SchedError::UnknownMachine(machine))?;
        if slot.available == available {
            return Ok(());
        }
        slot.available = available;
        self.advance(now);
        if available {
            mark_dirty(&mut self.slots, &mut self.dirty, machine.0);
        }
        Ok(())
    }

    /// Recomputes every shape's placements after a capacity change; refuses what can no
    /// longer run anywhere.
    fn replan(&mut self) -> Vec<(BuildId, Refusal)> {
        for slot in &mut self.slots {
            slot.shapes.clear();
            slot.stale = 0;
        }
        let mut refused = Vec::new();
        for s in 0..self.shapes.len() {
            let Some(shape) = self.shapes[s].as_mut() else {
                continue;
            };
            match shape.key.placements(&self.specs, &self.config) {
                Ok(needs) => {
                    for n in &needs {
                        self.slots[n.machine as usize].shapes.push(SlotShape {
                            shape: s,
                            generation: self.shape_gen[s],
                            need: *n,
                        });
                    }
                    shape.needs = needs;
                }
                Err(refusal) => {
                    shape.needs.clear();
                    refused.extend(shape.waiting.iter().map(|&id| (id, refusal.clone())));
                }
            }
        }
        for (id, _) in &refused {
            self.unqueue(*id);
            self.builds.remove(id);
        }
        let stale: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(id, m)| {
                let shape = self
                    .builds
                    .get(id)
                    .and_then(|b| self.shapes[b.shape].as_ref());
                shape.is_none_or(|s| s.need_on(**m).is_none())
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            if let Some(m) = self.reservations.remove(&id) {
                self.slots[m as usize].reserved_for = None;
            }
        }
        for m in 0..self.slots.len() as u32 {
            mark_dirty(&mut self.slots, &mut self.dirty, m);
        }
        refused
            .into_iter()
            .map(|(id, r)| (BuildId(id), r))
            .collect()
    }

    /// Every build to start now, in order: [`Scheduler::decide_one`] until it has none.
    pub fn decide(&mut self, now: Duration) -> Vec<Start> {
        let mut starts = Vec::new();
        while let Some(start) = self.decide_one(now) {
            starts.push(start);
        }
        starts
    }

    /// One decision: the next build to start now, or `None` when none can.
    pub fn decide_one(&mut self, now: Duration) -> Option<Start> {
        let t = self.advance(now);
        self.sweep(t);
        if let Some((id, m)) = self.reserved_that_fits() {
            return self.start(id, m, t, true);
        }
        let (standing, id, m) = self.fairest_that_fits()?;
        self.record_bypasses(standing, id, m, t);
        self.start(id, m, t, false)
    }

    /// A reserved build that fits on its machine now, oldest first. Only dirty machines are
    /// looked at: a machine is reserved where its build does not fit, its free resources
    /// grow only when it is marked dirty, and the dirty list is emptied only after this found
    /// nothing.
    fn reserved_that_fits(&self) -> Option<(u64, u32)> {
        self.dirty
            .iter()
            .filter_map(|&m| Some((self.slots[m as usize].reserved_for?, m)))
            .filter(|&(id, m)| {
                self.builds
                    .get(&id)
                    .and_then(|b| self.shapes[b.shape].as_ref())
                    .and_then(|s| s.need_on(m))
                    .is_some_and(|n| self.slots[m as usize].fits(&n))
            })
            .min()
    }

    /// The first build, in fair-share order, that fits on a machine that is not reserved:
    /// its account's standing per weight, its id, the machine. With none, the dirty list is
    /// emptied (nothing fits on those machines any more).
    fn fairest_that_fits(&mut self) -> Option<(f64, u64, u32)> {
        self.stamp += 1;
        self.fitting.clear();
        for &m in &self.dirty {
            let slot = &self.slots[m as usize];
            // At its job limit, nothing fits.
            if slot.reserved_for.is_some() || slot.jobs >= slot.max_jobs {
                continue;
            }
            for e in &slot.shapes {
                if self.shape_gen[e.shape] != e.generation || !slot.fits(&e.need) {
                    continue;
                }
                if let Some(shape) = self.shapes[e.shape].as_mut() {
                    if shape.seen != self.stamp {
                        shape.seen = self.stamp;
                        shape.fit_machine = m;
                        self.fitting.push((e.shape, m));
                    }
                }
            }
        }
        // Fresh shapes: where they fitted, or else anywhere.
        let (slots, shapes, generations) = (&self.slots, &mut self.shapes, &self.shape_gen);
        let (fitting, stamp) = (&mut self.fitting, self.stamp);
        self.fresh.retain_mut(|(s, m, generation)| {
            let Some(shape) = shapes[*s]
                .as_mut()
                .filter(|_| generations[*s] == *generation)
            else {
                return false;
            };
            if shape.seen == stamp {
                return true;
            }
            let usable = |n: &Need| {
                let slot = &slots[n.machine as usize];
                slot.reserved_for.is_none() && slot.fits(n)
            };
            let here = shape.need_on(*m).is_some_and(|n| usable(&n));
            let Some(machine) = (if here {
                Some(*m)
            } else {
                shape.needs.iter().find(|n| usable(n)).map(|n| n.machine)
            }) else {
                return false;
            };
            *m = machine;
            shape.seen = stamp;
            shape.fit_machine = machine;
            fitting.push((*s, machine));
            true
        });
        if self.fitting.is_empty() {
            for m in self.dirty.drain(..) {
                self.slots[m as usize].dirty = false;
            }
            return None;
        }
        if self.speeds_differ {
            self.prefer_fastest();
        }
        // (standing per weight, first build, machine); ties go to the higher priority, then
        // the earlier build.
        let mut best: Option<(f64, Order, u32)> = None;
        let better = |best: &Option<(f64, Order, u32)>, standing: f64, head: Order| {
            best.is_none_or(|(b, order, _)| standing < b || (standing == b && head < order))
        };
        let members: usize = self
            .fitting
            .iter()
            .filter_map(|&(s, _)| self.shapes[s].as_ref())
            .map(|shape| shape.members.len())
            .sum();
        if members <= 2 * self.active.len() {
            // Few accounts have builds that fit: look at each.
            for &(s, m) in &self.fitting {
                let Some(shape) = self.shapes[s].as_ref() else {
                    continue;
                };
                for member in &shape.members {
                    let standing = self.standings.get(
                        member.account,
                        &self.fair,
                        &self.clock,
                        self.growth,
                        self.now,
                    );
                    if better(&best, standing, member.head) {
                        best = Some((standing, member.head, m));
                    }
                }
            }
        } else {
            // Many do: walk the accounts from the lowest standing up; the first with a build
            // that fits, and those standing as low, decide.
            self.refresh_order();
            for &a in &self.order {
                let standing = self.standings.values[a as usize];
                if best.is_some_and(|(b, _, _)| standing > b) {
                    break;
                }
                for queue in &self.accounts[a as usize].queues {
                    let Some(shape) = self.shapes[queue.shape].as_ref() else {
                        continue;
                    };
                    if shape.seen != self.stamp {
                        continue;
                    }
                    let head = shape.members[queue.member_at].head;
                    if better(&best, standing, head) {
                        best = Some((standing, head, shape.fit_machine));
                    }
                }
            }
        }
        best.map(|(standing, (_, id), m)| (standing, id, m))
    }

    /// Moves each shape that fits to the fastest machine where it fits now (the lowest
    /// index among equals). Only when machines' speeds differ: it looks at every machine a
    /// fitting shape could run on.
    fn prefer_fastest(&mut self) {
        let (slots, specs, shapes) = (&self.slots, &self.specs, &mut self.shapes);
        for (s, m) in &mut self.fitting {
            let Some(shape) = shapes[*s].as_mut() else {
                continue;
            };
            let fastest = shape
                .needs
                .iter()
                .filter(|n| {
                    let slot = &slots[n.machine as usize];
                    slot.reserved_for.is_none() && slot.fits(n)
                })
                .max_by_key(|n| (specs[n.machine as usize].speed, Reverse(n.machine)));
            if let Some(n) = fastest {
                *m = n.machine;
                shape.fit_machine = n.machine;
            }
        }
    }

    /// Starts waiting build `id` on machine `m` (where it fits).
    fn start(&mut self, id: u64, m: u32, t: f64, reserved: bool) -> Option<Start> {
        let build = self.builds.get(&id)?;
        let (account, own_shape) = (build.account, build.shape);
        let need = self.shapes[own_shape].as_ref()?.need_on(m)?;
        self.unqueue(id);
        let slot = &mut self.slots[m as usize];
        let cores = slot.take_cores(need.cores);
        slot.used_memory += need.memory;
        slot.jobs += 1;
        let charge = f64::from(need.cores) * self.estimate.seconds();
        self.fair[account as usize]
            .usage
            .start(&self.clock, self.growth, need.cores, charge);
        self.restand(account);
        if let Some(build) = self.builds.get_mut(&id) {
            build.run = Some(Alloc {
                machine: m,
                cores: cores.clone(),
                memory: need.memory,
                started: t,
                charge,
            });
        }
        Some(Start {
            id: BuildId(id),
            machine: MachineId(m),
            cores,
            memory: need.memory,
            reserved,
        })
    }

    /// Build `id`, of an account standing at `standing` per weight, is about to start on
    /// machine `m`: waiting builds before it that could run on `m` but do not fit there now
    /// are bypassed. Its own account's are marked now; other accounts' at the next sweep.
    fn record_bypasses(&mut self, standing: f64, id: u64, m: u32, t: f64) {
        let Some(build) = self.builds.get(&id) else {
            return;
        };
        let (own, order) = (build.account, (Reverse(build.priority), id));
        let slot = &self.slots[m as usize];
        for e in &slot.shapes {
            if self.shape_gen[e.shape] != e.generation || slot.fits(&e.need) {
                continue;
            }
            if let Some(shape) = self.shapes[e.shape].as_mut() {
                shape.unfit = self.stamp;
                match &mut shape.pending_bypass {
                    Some((_, highest)) => *highest = highest.max(standing),
                    None => {
                        shape.pending_bypass = Some((t, standing));
                        self.pending_bypass.push(e.shape);
                    }
                }
            }
        }
        for queue in &self.accounts[own as usize].queues {
            let Some(shape) = self.shapes[queue.shape].as_mut() else {
                continue;
            };
            let member = &mut shape.members[queue.member_at];
            if shape.unfit != self.stamp || member.bypassed_since.is_some() || member.head >= order
            {
                continue;
            }
            member.bypassed_since = Some(t);
            shape.bypassed += 1;
            self.bypassed += 1;
        }
    }

    /// At most once a second of scheduler time (or every `starvation_after` if shorter):
    /// attributes bypasses by other accounts to the queues of accounts that stand before
    /// them now, and hands out reservations that are due.
    fn sweep(&mut self, t: f64) {
        let interval = self.config.starvation_after.as_secs_f64().min(1.0);
        if t - self.last_sweep < interval {
            return;
        }
        self.last_sweep = t;
        for s in std::mem::take(&mut self.pending_bypass) {
            let Some((since, highest)) = self.shapes[s]
                .as_mut()
                .and_then(|sh| sh.pending_bypass.take())
            else {
                continue;
            };
            let Some(shape) = self.shapes[s].as_mut() else {
                continue;
            };
            for member in &mut shape.members {
                if member.bypassed_since.is_some()
                    || self.fair[member.account as usize].standing(&self.clock, self.growth)
                        >= highest
                {
                    continue;
                }
                member.bypassed_since = Some(since);
                shape.bypassed += 1;
                self.bypassed += 1;
            }
        }
        self.reserve_for_starving(t);
    }

    /// Gives reservations to first builds of queues bypassed for `starvation_after` or longer
    /// that fit nowhere now.
    fn reserve_for_starving(&mut self, t: f64) {
        if self.bypassed == 0 {
            return;
        }
        let after = self.config.starvation_after.as_secs_f64();
        // One reservation per shape at a time: its builds are interchangeable, so one machine
        // drained for them serves them in turn, and starving builds cannot drain every machine.
        let mut reserved_shapes = vec![false; self.shapes.len()];
        for id in self.reservations.keys() {
            if let Some(b) = self.builds.get(id) {
                reserved_shapes[b.shape] = true;
            }
        }
        // For each other shape, its longest bypassed first build that is due:
        // (bypassed since, build, shape).
        let mut due: Vec<(f64, u64, usize)> = Vec::new();
        for (s, shape) in self.shapes.iter().enumerate() {
            let Some(shape) = shape.as_ref().filter(|sh| sh.bypassed > 0) else {
                continue;
            };
            if reserved_shapes[s] {
                continue;
            }
            let first = shape
                .members
                .iter()
                .filter_map(|m| Some((m.bypassed_since?, m.head.1)))
                .filter(|&(since, _)| t - since >= after)
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            if let Some((since, head)) = first {
                due.push((since, head, s));
            }
        }
        due.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (_, id, s) in due {
            let Some(shape) = self.shapes[s].as_ref() else {
                continue;
            };
            let fits_now = shape.needs.iter().any(|n| {
                let slot = &self.slots[n.machine as usize];
                slot.reserved_for.is_none() && slot.fits(n)
            });
            if fits_now {
                continue;
            }
            let closest = shape
                .needs
                .iter()
                .filter(|n| {
                    let slot = &self.slots[n.machine as usize];
                    slot.reserved_for.is_none() && slot.available
                })
                .map(|n| (missing_share(&self.slots[n.machine as usize], n), n.machine))
                .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            if let Some((_, m)) = closest {
                self.reservations.insert(id, m);
                self.slots[m as usize].reserved_for = Some(id);
            }
        }
    }

    /// What a waiting build waits for and where it stands; `None` unless it waits.
    pub fn waiting_status(&self, id: BuildId) -> Option<WaitStatus> {
        let build = self.builds.get(&id.0)?;
        if build.run.is_some() {
            return None;
        }
        let shape = self.shapes[build.shape].as_ref()?;
        let reason = self.wait_reason(id.0, shape);
        let running = shape
            .needs
            .iter()
            .map(|n| self.slots[n.machine as usize].jobs as usize)
            .sum();
        // Replays the fair-share order with no build ending: every start adds its charge to
        // its account's standing. The build goes when its account's standing, after the
        // builds of its own that go first, is the lowest.
        let charge = |b: u64| {
            let cores = self
                .builds
                .get(&b)
                .and_then(|b| self.shapes[b.shape].as_ref())
                .and_then(|s| s.needs.first())
                .map_or(1, |n| n.cores);
            f64::from(cores) * self.estimate.seconds()
        };
        let acc = &self.accounts[build.account as usize];
        let order = (Reverse(build.priority), id.0);
        let own_ahead: Vec<u64> = acc.waiting.range(..order).map(|o| o.1).collect();
        let fair = &self.fair[build.account as usize];
        let turn = (fair.usage.standing(&self.clock, self.growth)
            + own_ahead.iter().map(|&b| charge(b)).sum::<f64>())
            / fair.weight;
        let mut ahead = own_ahead.len();
        for &a in self.active.iter().filter(|&&a| a != build.account) {
            let other = &self.accounts[a as usize];
            let weight = self.fair[a as usize].weight;
            let mut standing = self.standing(a);
            for &(_, b) in &other.waiting {
                if standing > turn || (standing == turn && b > id.0) {
                    break;
                }
                ahead += 1;
                standing += charge(b) / weight;
            }
        }
        let machines = shape
            .needs
            .iter()
            .filter(|n| self.slots[n.machine as usize].jobs > 0)
            .count();
        Some(WaitStatus {
            reason,
            position: ahead + 1,
            waiting: self.waiting,
            running,
            machines,
        })
    }

    fn wait_reason(&self, id: u64, shape: &Shape) -> WaitReason {
        let mut fits_reserved = false;
        // The fewest cores it needs on a machine, the least memory on one with the cores.
        let mut cores_needed: Option<u32> = None;
        let mut memory_needed: Option<u64> = None;
        let mut memory_ok = false;
        let mut any_available = false;
        for n in &shape.needs {
            let slot = &self.slots[n.machine as usize];
            if !slot.available || slot.max_jobs == 0 {
                continue;
            }
            any_available = true;
            if slot.fits(n) {
                if slot.reserved_for.is_none_or(|r| r == id) {
                    return WaitReason::Turn;
                }
                fits_reserved = true;
            }
            if slot.free_cores < n.cores {
                cores_needed = Some(cores_needed.map_or(n.cores, |c| c.min(n.cores)));
            } else if slot.free_memory() < n.memory {
                memory_needed = Some(memory_needed.map_or(n.memory, |b| b.min(n.memory)));
            } else {
                memory_ok = true;
            }
        }
        if !any_available {
            WaitReason::MachineDown
        } else if fits_reserved {
            WaitReason::Reserved
        } else if memory_ok {
            WaitReason::JobSlot
        } else if let Some(b) = memory_needed {
            WaitReason::Memory(b)
        } else {
            WaitReason::Cores(cores_needed.unwrap_or(0))
        }
    }
}

/// Whether `machines` are not all equally fast.
fn speeds_differ(machines: &[Machine]) -> bool {
    machines.windows(2).any(|w| w[0].speed != w[1].speed)
}

/// How far a machine is from fitting a need: the missing share of cores plus that of memory
/// (0 when it fits but for the job limit, which one completion clears).
fn missing_share(slot: &Slot, need: &Need) -> f64 {
    let cores = f64::from(need.cores.saturating_sub(slot.free_cores)) / f64::from(need.cores);
    let memory = need.memory.saturating_sub(slot.free_memory()) as f64 / need.memory.max(1) as f64;
    cores + memory
}
