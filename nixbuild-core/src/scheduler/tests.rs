//! Tests of every policy, and property tests against a brute-force oracle that restates the
//! rules (Nix's feature semantics, the default requests) without the scheduler's own
//! bookkeeping.
#![allow(clippy::unwrap_used)] // a panic is how a test reports failure

use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

const GIB: u64 = 1 << 30;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}

fn machine(cores: u32, memory: u64) -> Machine {
    Machine {
        systems: s(&["x86_64-linux", "i686-linux"]),
        supported_features: s(&["big-parallel", "benchmark"]),
        mandatory_features: vec![],
        cores,
        memory,
        max_jobs: cores,
        speed: Machine::NORMAL_SPEED,
    }
}

fn build(account: &str) -> BuildSpec {
    BuildSpec {
        account: account.to_owned(),
        system: "x86_64-linux".to_owned(),
        required_features: vec![],
        cores: None,
        memory: None,
        priority: 0,
    }
}

fn with_cores(account: &str, cores: u32) -> BuildSpec {
    BuildSpec {
        cores: Some(cores),
        ..build(account)
    }
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn sched(machines: Vec<Machine>) -> Scheduler {
    Scheduler::new(SchedulerConfig::default(), machines).unwrap()
}

fn ids(starts: &[Start]) -> Vec<BuildId> {
    starts.iter().map(|s| s.id).collect()
}

#[test]
fn cores_are_never_shared_and_freed_cores_are_reused() {
    let mut sc = sched(vec![machine(2, 4 * GIB)]);
    let a = sc.submit(build("a"), secs(0)).unwrap();
    let b = sc.submit(build("a"), secs(0)).unwrap();
    let c = sc.submit(build("a"), secs(0)).unwrap();
    let starts = sc.decide(secs(0));
    assert_eq!(ids(&starts), vec![a, b]);
    assert_eq!(starts[0].cores, vec![0]);
    assert_eq!(starts[1].cores, vec![1]);
    // Memory by default: the machine's, in proportion to the cores.
    assert_eq!(starts[0].memory, 2 * GIB);
    assert_eq!(sc.build_state(c), Some(BuildState::Waiting));
    assert!(sc.decide(secs(1)).is_empty());
    sc.complete(a, secs(2)).unwrap();
    let starts = sc.decide(secs(2));
    assert_eq!(ids(&starts), vec![c]);
    assert_eq!(starts[0].cores, vec![0]);
    assert_eq!(sc.build_state(c), Some(BuildState::Running(MachineId(0))));
    assert_eq!(sc.build_state(a), None);
    assert_eq!((sc.waiting_count(), sc.running_count()), (0, 2));
}

#[test]
fn explicit_requests_and_the_memory_limit() {
    let mut sc = sched(vec![machine(8, 10 * GIB)]);
    let big = sc
        .submit(
            BuildSpec {
                memory: Some(8 * GIB),
                ..with_cores("a", 3)
            },
            secs(0),
        )
        .unwrap();
    let second = sc
        .submit(
            BuildSpec {
                memory: Some(4 * GIB),
                ..with_cores("a", 1)
            },
            secs(0),
        )
        .unwrap();
    let starts = sc.decide(secs(0));
    assert_eq!(ids(&starts), vec![big]);
    assert_eq!(starts[0].cores, vec![0, 1, 2]);
    assert_eq!(starts[0].memory, 8 * GIB);
    let status = sc.waiting_status(second).unwrap();
    assert_eq!(status.reason, WaitReason::Memory(4 * GIB));
    assert_eq!(
        status.to_string(),
        "waiting for 4 GiB memory (position 1 of 1; 1 build running)"
    );
    sc.complete(big, secs(5)).unwrap();
    assert_eq!(ids(&sc.decide(secs(5))), vec![second]);
}

#[test]
fn default_memory_and_cores_from_the_configuration() {
    let config = SchedulerConfig {
        default_cores: 2,
        default_memory: Some(3 * GIB),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(3, 4 * GIB), machine(1, GIB)]).unwrap();
    let a = sc.submit(build("a"), secs(0)).unwrap();
    let b = sc.submit(build("a"), secs(0)).unwrap();
    let starts = sc.decide(secs(0));
    // The first takes 2 cores and 3 GiB on machine 0; the second does not fit there (one
    // core and 1 GiB left) and takes machine 1 whole, its defaults cut to what it has.
    assert_eq!(starts.len(), 2);
    assert_eq!(
        (starts[0].id, starts[0].machine, starts[0].memory),
        (a, MachineId(0), 3 * GIB)
    );
    assert_eq!(starts[0].cores, vec![0, 1]);
    assert_eq!(
        (starts[1].id, starts[1].machine, starts[1].memory),
        (b, MachineId(1), GIB)
    );
    assert_eq!(starts[1].cores, vec![0]);
}

#[test]
fn big_parallel_takes_its_share_of_the_machine() {
    let mut sc = sched(vec![machine(4, 8 * GIB)]);
    let bp = BuildSpec {
        required_features: s(&["big-parallel"]),
        ..build("a")
    };
    let first = sc.submit(bp.clone(), secs(0)).unwrap();
    let explicit = sc
        .submit(
            BuildSpec {
                cores: Some(1),
                ..bp.clone()
            },
            secs(0),
        )
        .unwrap();
    let starts = sc.decide(secs(0));
    assert_eq!(ids(&starts), vec![first]);
    assert_eq!(starts[0].cores, vec![0, 1, 2, 3]);
    assert_eq!(starts[0].memory, 8 * GIB);
    assert_eq!(
        sc.waiting_status(explicit).unwrap().reason,
        WaitReason::Cores(1)
    );

    let config = SchedulerConfig {
        big_parallel_percent: 50,
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(5, 10 * GIB)]).unwrap();
    sc.submit(bp.clone(), secs(0)).unwrap();
    sc.submit(bp, secs(0)).unwrap();
    let starts = sc.decide(secs(0));
    // Half of 5, rounded up: 3; the second build waits for 3 cores.
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].cores, vec![0, 1, 2]);
    assert_eq!(starts[0].memory, 6 * GIB);
}

#[test]
fn job_limit() {
    let mut m = machine(4, 4 * GIB);
    m.max_jobs = 1;
    let mut sc = sched(vec![m]);
    sc.submit(build("a"), secs(0)).unwrap();
    let second = sc.submit(build("a"), secs(0)).unwrap();
    assert_eq!(sc.decide(secs(0)).len(), 1);
    assert_eq!(
        sc.waiting_status(second).unwrap().to_string(),
        "waiting for a job slot (position 1 of 1; 1 build running)"
    );
}

#[test]
fn refusals_say_why() {
    let mut kvm = machine(8, 16 * GIB);
    kvm.supported_features.push("kvm".into());
    let mut bench = machine(16, 4 * GIB);
    bench.mandatory_features = s(&["benchmark"]);
    bench.supported_features.clear();
    let mut sc = sched(vec![kvm, bench]);
    let refuse = |sc: &mut Scheduler, spec: BuildSpec| sc.submit(spec, secs(0)).unwrap_err();

    let r = refuse(
        &mut sc,
        BuildSpec {
            system: "aarch64-linux".into(),
            ..build("a")
        },
    );
    assert_eq!(
        r.to_string(),
        "no machine of this server builds for system 'aarch64-linux' (systems offered: \
         i686-linux, x86_64-linux)"
    );
    let r = refuse(
        &mut sc,
        BuildSpec {
            required_features: s(&["cuda", "kvm"]),
            ..build("a")
        },
    );
    assert_eq!(
        r.to_string(),
        "no machine for 'x86_64-linux' supports the required feature(s) cuda (features \
         offered: benchmark, big-parallel, kvm)"
    );
    let r = refuse(
        &mut sc,
        BuildSpec {
            required_features: s(&["kvm", "benchmark"]),
            cores: Some(12),
            ..build("a")
        },
    );
    // kvm is on machine 0 and benchmark is also there (supported): only cores rule it out.
    assert!(
        matches!(
            r,
            Refusal::Cores {
                asked: 12,
                largest: 8,
                ..
            }
        ),
        "{r}"
    );
    let r = refuse(&mut sc, with_cores("a", 17));
    assert_eq!(
        r.to_string(),
        "the build asks for 17 cores but the largest machine for 'x86_64-linux' it could use \
         has 8"
    );
    let r = refuse(
        &mut sc,
        BuildSpec {
            memory: Some(32 * GIB),
            ..build("a")
        },
    );
    assert_eq!(
        r.to_string(),
        "the build asks for 32 GiB memory but the largest machine for 'x86_64-linux' it could \
         use has 16 GiB"
    );
    // 12 cores are on the benchmark machine, 8 GiB on the other.
    let r = refuse(
        &mut sc,
        BuildSpec {
            required_features: s(&["benchmark"]),
            memory: Some(8 * GIB),
            ..with_cores("a", 12)
        },
    );
    assert_eq!(
        r.to_string(),
        "no machine for 'x86_64-linux' has both the 12 cores and the 8 GiB memory the build \
         asks for"
    );
    assert_eq!(refuse(&mut sc, with_cores("a", 0)), Refusal::ZeroCores);
    assert_eq!(
        refuse(
            &mut sc,
            BuildSpec {
                memory: Some(0),
                ..build("a")
            }
        ),
        Refusal::ZeroMemory
    );
    // The benchmark machine's mandatory feature keeps plain builds away, but they run on the
    // other; with only the benchmark machine they are refused.
    let mut only_bench = machine(2, GIB);
    only_bench.mandatory_features = s(&["benchmark"]);
    let mut sc2 = sched(vec![only_bench]);
    let r = refuse(&mut sc2, build("a"));
    assert_eq!(
        r.to_string(),
        "every machine for 'x86_64-linux' with the required features also requires \
         feature(s) benchmark, which the derivation does not require"
    );
    let mut kvm_only = machine(2, GIB);
    kvm_only.supported_features = s(&["kvm"]);
    let mut other = machine(2, GIB);
    other.supported_features = s(&["cuda"]);
    let mut sc3 = sched(vec![kvm_only, other]);
    let r = refuse(
        &mut sc3,
        BuildSpec {
            required_features: s(&["cuda", "kvm"]),
            ..build("a")
        },
    );
    assert_eq!(
        r.to_string(),
        "no single machine for 'x86_64-linux' supports all of the required features cuda, kvm"
    );
    let mut off = machine(2, GIB);
    off.max_jobs = 0;
    let r = refuse(&mut sched(vec![off]), build("a"));
    assert!(matches!(r, Refusal::NoCapacity { .. }), "{r}");
    // Nothing refused was queued.
    assert_eq!(sc.waiting_count(), 0);
}

#[test]
fn fifo_within_an_account_with_priority() {
    let mut sc = sched(vec![machine(1, GIB)]);
    let first = sc.submit(build("a"), secs(0)).unwrap();
    let second = sc.submit(build("a"), secs(1)).unwrap();
    let urgent = sc
        .submit(
            BuildSpec {
                priority: 5,
                ..build("a")
            },
            secs(2),
        )
        .unwrap();
    let third = sc.submit(build("a"), secs(3)).unwrap();
    let mut order = Vec::new();
    for t in 4..8 {
        let starts = sc.decide(secs(t));
        assert_eq!(starts.len(), 1);
        order.push(starts[0].id);
        sc.complete(starts[0].id, secs(t)).unwrap();
    }
    assert_eq!(order, vec![urgent, first, second, third]);
}

#[test]
fn no_head_of_line_blocking() {
    let mut sc = sched(vec![machine(4, 8 * GIB)]);
    let running = sc.submit(with_cores("a", 2), secs(0)).unwrap();
    assert_eq!(ids(&sc.decide(secs(0))), vec![running]);
    let big = sc.submit(with_cores("a", 4), secs(1)).unwrap();
    let small = sc.submit(with_cores("a", 1), secs(2)).unwrap();
    let other = sc.submit(with_cores("b", 1), secs(3)).unwrap();
    let starts = sc.decide(secs(3));
    assert_eq!(ids(&starts), vec![other, small]);
    let status = sc.waiting_status(big).unwrap();
    assert_eq!(
        status.to_string(),
        "waiting for 4 cores (position 1 of 1; 3 builds running)"
    );
}

#[test]
fn a_later_account_goes_before_the_first_accounts_queue_drains() {
    let mut sc = sched(vec![machine(2, 4 * GIB)]);
    let a: Vec<BuildId> = (0..20)
        .map(|_| sc.submit(build("a"), secs(0)).unwrap())
        .collect();
    let mut running: Vec<BuildId> = ids(&sc.decide(secs(0)));
    assert_eq!(running, a[..2]);
    let b1 = sc.submit(build("b"), secs(1)).unwrap();
    let b2 = sc.submit(build("b"), secs(1)).unwrap();
    // b's builds wait at the front: a has run, b has not.
    assert_eq!(sc.waiting_status(b1).unwrap().position, 1);
    assert_eq!(sc.waiting_status(b2).unwrap().position, 2);
    let mut order: Vec<BuildId> = Vec::new();
    for t in 2..6 {
        sc.complete(running.remove(0), secs(t)).unwrap();
        let started = ids(&sc.decide(secs(t)));
        order.extend(&started);
        running.extend(started);
    }
    assert_eq!(order, vec![b1, b2, a[2], a[3]]);
}

#[test]
fn weights_share_the_cores() {
    let config = SchedulerConfig {
        weights: BTreeMap::from([("heavy".to_owned(), 3)]),
        half_life: secs(60),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(4, 4 * GIB)]).unwrap();
    let mut heavy = BTreeSet::new();
    for _ in 0..400 {
        heavy.insert(sc.submit(build("heavy"), secs(0)).unwrap());
        sc.submit(build("light"), secs(0)).unwrap();
    }
    let mut running: VecDeque<BuildId> = ids(&sc.decide(secs(0))).into();
    let (mut heavy_starts, mut total) = (0, 0);
    for t in 1..400 {
        sc.complete(running.pop_front().unwrap(), secs(t)).unwrap();
        for start in sc.decide(secs(t)) {
            running.push_back(start.id);
            if t > 100 {
                total += 1;
                heavy_starts += usize::from(heavy.contains(&start.id));
            }
        }
    }
    let share = heavy_starts as f64 / total as f64;
    assert!((0.7..=0.8).contains(&share), "heavy share {share}");
}

#[test]
fn usage_decays_with_the_half_life() {
    let config = SchedulerConfig {
        half_life: secs(100),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(2, GIB)]).unwrap();
    let id = sc.submit(with_cores("a", 2), secs(0)).unwrap();
    sc.decide(secs(0));
    sc.complete(id, secs(10)).unwrap();
    let after_run = sc.account_usage("a");
    // 2 cores for 10 s, minus a little decay during the run.
    assert!((19.0..20.0).contains(&after_run), "{after_run}");
    sc.decide(secs(110));
    let later = sc.account_usage("a");
    assert!((later - after_run / 2.0).abs() < 1e-9, "{later}");
    assert_eq!(sc.account_usage("nobody"), 0.0);
}

#[test]
fn history_counts_a_rested_account_goes_first() {
    let config = SchedulerConfig {
        half_life: secs(100),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(1, GIB)]).unwrap();
    let a = sc.submit(build("a"), secs(0)).unwrap();
    sc.decide(secs(0));
    sc.complete(a, secs(50)).unwrap();
    // b ran less, longer ago... but still more recently than a's usage has decayed.
    let b = sc.submit(build("b"), secs(50)).unwrap();
    sc.decide(secs(50));
    sc.complete(b, secs(60)).unwrap();
    let a2 = sc.submit(build("a"), secs(60)).unwrap();
    let b2 = sc.submit(build("b"), secs(61)).unwrap();
    assert_eq!(ids(&sc.decide(secs(61))), vec![b2]);
    assert_eq!(sc.build_state(a2), Some(BuildState::Waiting));
}

#[test]
fn anti_starvation_reserves_a_machine_for_a_bypassed_large_build() {
    let config = SchedulerConfig {
        starvation_after: secs(100),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(2, 4 * GIB)]).unwrap();
    let first = sc.submit(build("a"), secs(0)).unwrap();
    assert_eq!(ids(&sc.decide(secs(0))), vec![first]);
    let big = sc.submit(with_cores("b", 2), secs(1)).unwrap();
    // A stream of small builds that always keeps one core busy: without the rule the big
    // build would never find both cores free.
    let mut running = vec![first];
    let mut t = 2;
    let mut reserved_at = None;
    while sc.build_state(big) == Some(BuildState::Waiting) {
        sc.submit(build("a"), secs(t)).unwrap();
        let mut started = sc.decide(secs(t));
        if reserved_at.is_none() && sc.reservations().next().is_some() {
            reserved_at = Some(t);
            assert_eq!(
                sc.reservations().collect::<Vec<_>>(),
                vec![(big, MachineId(0))]
            );
        }
        if let Some(s) = started.iter().find(|s| s.id == big) {
            assert!(s.reserved);
            assert_eq!(s.cores, vec![0, 1]);
            break;
        }
        running.extend(started.drain(..).map(|s| s.id));
        sc.complete(running.remove(0), secs(t)).unwrap();
        t += 1;
        assert!(t < 1000, "the big build never started");
    }
    // First bypassed at t=2 (the first small build that took the freed core); reserved once
    // 100 s had passed, and started when the last small build ended.
    let reserved_at = reserved_at.unwrap();
    assert!((102..=103).contains(&reserved_at), "{reserved_at}");
    assert!(t <= reserved_at + 2, "{t}");
    assert_eq!(sc.reservations().count(), 0);
}

#[test]
fn a_reservation_holds_back_other_builds_and_is_released_on_cancel() {
    let config = SchedulerConfig {
        starvation_after: secs(0),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(2, 4 * GIB)]).unwrap();
    let first = sc.submit(build("a"), secs(0)).unwrap();
    sc.decide(secs(0));
    let big = sc.submit(with_cores("a", 2), secs(1)).unwrap();
    let small = sc.submit(build("a"), secs(2)).unwrap();
    // The small build bypasses the big one; at the next decision the big one is reserved.
    assert_eq!(ids(&sc.decide(secs(2))), vec![small]);
    let small2 = sc.submit(build("a"), secs(3)).unwrap();
    sc.complete(first, secs(3)).unwrap();
    assert!(sc.decide(secs(3)).is_empty());
    assert_eq!(
        sc.reservations().collect::<Vec<_>>(),
        vec![(big, MachineId(0))]
    );
    assert_eq!(
        sc.waiting_status(small2).unwrap().reason,
        WaitReason::Reserved
    );
    sc.cancel(big, secs(4)).unwrap();
    assert_eq!(sc.reservations().count(), 0);
    assert_eq!(ids(&sc.decide(secs(4))), vec![small2]);
}

#[test]
fn passing_a_build_whose_account_is_behind_in_fair_share_is_no_bypass() {
    let config = SchedulerConfig {
        starvation_after: secs(0),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(2, 4 * GIB)]).unwrap();
    // a uses the whole machine for 500 s.
    let a0 = sc.submit(build("a"), secs(0)).unwrap();
    let a1 = sc.submit(build("a"), secs(0)).unwrap();
    assert_eq!(sc.decide(secs(0)).len(), 2);
    sc.complete(a0, secs(500)).unwrap();
    sc.complete(a1, secs(500)).unwrap();
    let b0 = sc.submit(build("b"), secs(500)).unwrap();
    assert_eq!(ids(&sc.decide(secs(500))), vec![b0]);
    let x = sc.submit(with_cores("a", 2), secs(501)).unwrap();
    let y = sc.submit(build("b"), secs(502)).unwrap();
    // b stands before a: y goes first because it is b's turn, not because x is too large.
    assert_eq!(ids(&sc.decide(secs(502))), vec![y]);
    sc.complete(b0, secs(503)).unwrap();
    assert!(sc.decide(secs(503)).is_empty());
    assert_eq!(sc.reservations().count(), 0);
    assert_eq!(sc.waiting_status(x).unwrap().reason, WaitReason::Cores(2));
}

#[test]
fn capacity_changes() {
    let mut sc = sched(vec![machine(4, 8 * GIB)]);
    let running = sc.submit(with_cores("a", 3), secs(0)).unwrap();
    sc.decide(secs(0));
    let three = sc.submit(with_cores("a", 3), secs(1)).unwrap();
    let one = sc.submit(with_cores("a", 1), secs(1)).unwrap();
    // Shrinking to 2 cores refuses the waiting 3-core build, keeps the running one, and
    // starts nothing while the machine is over its new capacity.
    let refused = sc
        .set_capacity(MachineId(0), machine(2, 8 * GIB), secs(2))
        .unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].0, three);
    assert!(matches!(
        refused[0].1,
        Refusal::Cores {
            asked: 3,
            largest: 2,
            ..
        }
    ));
    assert_eq!(sc.build_state(three), None);
    assert!(sc.decide(secs(2)).is_empty());
    assert_eq!(
        sc.build_state(running),
        Some(BuildState::Running(MachineId(0)))
    );
    // A new machine takes the waiting build.
    let m = sc.add_machine(machine(1, GIB), secs(3)).unwrap();
    let starts = sc.decide(secs(3));
    assert_eq!(ids(&starts), vec![one]);
    assert_eq!(starts[0].machine, m);
    sc.complete(running, secs(4)).unwrap();
    let again = sc.submit(with_cores("a", 2), secs(4)).unwrap();
    let starts = sc.decide(secs(4));
    assert_eq!(ids(&starts), vec![again]);
    assert_eq!(starts[0].cores, vec![0, 1]);
    assert_eq!(
        sc.set_capacity(MachineId(9), machine(1, GIB), secs(5)),
        Err(SchedError::UnknownMachine(MachineId(9)))
    );
}

#[test]
fn an_unavailable_machine_starts_nothing_and_refuses_nothing() {
    let mut benchmark = machine(2, 4 * GIB);
    benchmark.mandatory_features = s(&["benchmark"]);
    let mut plain = machine(1, GIB);
    plain.supported_features.clear();
    let mut sc = sched(vec![plain, benchmark]);
    let first = sc.submit(build("a"), secs(0)).unwrap();
    assert_eq!(sc.decide(secs(0))[0].machine, MachineId(0));
    sc.set_available(MachineId(1), false, secs(1)).unwrap();
    // Only machine 1 runs benchmarks: down, it keeps them waiting, not refused.
    let bench = sc
        .submit(
            BuildSpec {
                required_features: s(&["benchmark"]),
                ..build("a")
            },
            secs(1),
        )
        .unwrap();
    let plain = sc.submit(build("b"), secs(1)).unwrap();
    assert!(sc.decide(secs(1)).is_empty());
    assert_eq!(sc.build_state(bench), Some(BuildState::Waiting));
    assert_eq!(
        sc.waiting_status(bench).map(|w| w.reason),
        Some(WaitReason::MachineDown)
    );
    // Machine 0 frees up: the plain build goes there, not to the unavailable machine.
    sc.complete(first, secs(2)).unwrap();
    let starts = sc.decide(secs(2));
    assert_eq!(ids(&starts), vec![plain]);
    assert_eq!(starts[0].machine, MachineId(0));
    // Back, it runs what waited for it.
    sc.set_available(MachineId(1), true, secs(3)).unwrap();
    let starts = sc.decide(secs(3));
    assert_eq!(ids(&starts), vec![bench]);
    assert_eq!(starts[0].machine, MachineId(1));
    assert_eq!(
        sc.set_available(MachineId(7), false, secs(4)),
        Err(SchedError::UnknownMachine(MachineId(7)))
    );
}

#[test]
fn a_build_starts_on_the_fastest_machine_where_it_fits() {
    let fast = Machine {
        speed: 2500,
        ..machine(1, GIB)
    };
    let mut sc = sched(vec![machine(2, 2 * GIB), fast]);
    let a = sc.submit(build("a"), secs(0)).unwrap();
    let b = sc.submit(build("a"), secs(0)).unwrap();
    let c = sc.submit(build("a"), secs(0)).unwrap();
    let starts = sc.decide(secs(0));
    // The fast machine first; once it is full, the other.
    assert_eq!(ids(&starts), vec![a, b, c]);
    assert_eq!(
        starts.iter().map(|s| s.machine).collect::<Vec<_>>(),
        vec![MachineId(1), MachineId(0), MachineId(0)]
    );
    // Freed, it is chosen again.
    sc.complete(a, secs(1)).unwrap();
    let d = sc.submit(build("a"), secs(1)).unwrap();
    sc.complete(b, secs(1)).unwrap();
    let starts = sc.decide(secs(1));
    assert_eq!(ids(&starts), vec![d]);
    assert_eq!(starts[0].machine, MachineId(1));
}

#[test]
fn api_misuse_is_an_error() {
    let mut sc = sched(vec![machine(1, GIB)]);
    let a = sc.submit(build("a"), secs(0)).unwrap();
    let b = sc.submit(build("a"), secs(0)).unwrap();
    assert_eq!(sc.complete(a, secs(0)), Err(SchedError::Waiting(a)));
    sc.decide(secs(0));
    assert_eq!(sc.cancel(a, secs(0)), Err(SchedError::Running(a)));
    sc.cancel(b, secs(0)).unwrap();
    assert_eq!(sc.cancel(b, secs(0)), Err(SchedError::UnknownBuild(b)));
    sc.complete(a, secs(0)).unwrap();
    assert_eq!(sc.complete(a, secs(0)), Err(SchedError::UnknownBuild(a)));
    assert_eq!(sc.waiting_status(a), None);
    for bad in [
        SchedulerConfig {
            half_life: Duration::ZERO,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            default_cores: 0,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            big_parallel_percent: 101,
            ..SchedulerConfig::default()
        },
        SchedulerConfig {
            weights: BTreeMap::from([("x".to_owned(), 0)]),
            ..SchedulerConfig::default()
        },
    ] {
        assert!(matches!(
            Scheduler::new(bad, vec![]),
            Err(SchedError::Config { .. })
        ));
    }
}

#[test]
fn time_never_goes_backwards() {
    let config = SchedulerConfig {
        half_life: secs(10),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(config, vec![machine(1, GIB)]).unwrap();
    let a = sc.submit(build("a"), secs(100)).unwrap();
    sc.decide(secs(100));
    // An earlier time counts as 100 s: no negative run time.
    sc.complete(a, secs(50)).unwrap();
    assert_eq!(sc.account_usage("a"), 0.0);
    // Far in the future (thousands of half-lives) the clock rebases and keeps working.
    let b = sc.submit(build("a"), secs(1_000_000)).unwrap();
    sc.decide(secs(1_000_000));
    sc.complete(b, secs(1_000_010)).unwrap();
    let u = sc.account_usage("a");
    assert!(
        (u - 10.0 / std::f64::consts::LN_2 * 0.5).abs() < 1e-6,
        "{u}"
    );
}

// ---- Property tests against a brute-force oracle ----

const SYSTEMS: [&str; 3] = ["x86_64-linux", "aarch64-linux", "i686-linux"];
const FEATURES: [&str; 3] = ["big-parallel", "kvm", "benchmark"];

fn pick(names: &[&str], mask: u8) -> Vec<String> {
    names
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| (*n).to_owned())
        .collect()
}

fn machine_strategy() -> impl Strategy<Value = Machine> {
    // Mostly usable machines; now and then one with nothing of something.
    let rarely_zero = |range: std::ops::Range<u32>| prop_oneof![19 => range, 1 => Just(0u32)];
    (
        prop::sample::select(vec![1u8, 1, 3, 2]),
        0u8..8,
        0u8..8,
        rarely_zero(1..7),
        rarely_zero(1..9),
        rarely_zero(1..5),
    )
        .prop_map(
            |(systems, supported, mandatory, cores, halves, jobs)| Machine {
                // x86_64 and/or i686 only: aarch64 builds are always refused.
                systems: pick(&[SYSTEMS[0], SYSTEMS[2]], systems),
                supported_features: pick(&FEATURES, supported | 1),
                // Mandatory features are rare, or most builds would be refused.
                mandatory_features: if mandatory == 7 {
                    pick(&FEATURES, 4)
                } else {
                    vec![]
                },
                cores,
                memory: u64::from(halves) * GIB / 2,
                max_jobs: jobs,
                speed: Machine::NORMAL_SPEED,
            },
        )
}

fn spec_strategy() -> impl Strategy<Value = BuildSpec> {
    (
        0u8..3,
        prop::sample::select(vec![0usize, 0, 0, 0, 0, 2, 2, 1]),
        0u8..8,
        prop::option::of(1u32..5),
        prop::option::of(1u64..7),
        -1i32..2,
    )
        .prop_map(
            |(account, system, features, cores, gib, priority)| BuildSpec {
                account: ["a", "b", "c"][account as usize].to_owned(),
                system: SYSTEMS[system].to_owned(),
                // Mostly no features.
                required_features: if features < 5 {
                    vec![]
                } else {
                    pick(&FEATURES, features - 4)
                },
                cores,
                memory: gib.map(|g| g * GIB / 2),
                priority,
            },
        )
}

#[derive(Debug, Clone)]
enum Op {
    Submit(BuildSpec),
    /// Completes the n-th running build (modulo their number).
    Complete(usize),
    /// Cancels the n-th waiting build.
    Cancel(usize),
    /// Lets time pass (seconds).
    Wait(u64),
    /// Replaces machine n's capacity.
    Capacity(usize, Machine),
    /// Starts what can start.
    Decide,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => spec_strategy().prop_map(Op::Submit),
        4 => any::<usize>().prop_map(Op::Complete),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (1u64..200).prop_map(Op::Wait),
        1 => (any::<usize>(), machine_strategy()).prop_map(|(i, m)| Op::Capacity(i, m)),
        6 => Just(Op::Decide),
    ]
}

/// The oracle's restatement of what a build takes on a machine, or `None` if it can never
/// run there.
fn oracle_need(spec: &BuildSpec, m: &Machine, cfg: &SchedulerConfig) -> Option<(u32, u64)> {
    if m.cores == 0 || m.memory == 0 || m.max_jobs == 0 {
        return None;
    }
    let req = &spec.required_features;
    let system_ok = spec.system == "builtin" || m.systems.contains(&spec.system);
    let offered = |f: &String| m.supported_features.contains(f) || m.mandatory_features.contains(f);
    let features_ok = req.iter().all(offered);
    let mandatory_ok = m.mandatory_features.iter().all(|f| req.contains(f));
    if !(system_ok && features_ok && mandatory_ok) {
        return None;
    }
    let cores = match spec.cores {
        Some(n) if n <= m.cores => n,
        Some(_) => return None,
        None if req.iter().any(|f| f == "big-parallel") => {
            ((m.cores * cfg.big_parallel_percent).div_ceil(100)).clamp(1, m.cores)
        }
        None => cfg.default_cores.min(m.cores),
    };
    let memory = match spec.memory {
        Some(b) if b <= m.memory => b,
        Some(_) => return None,
        None => match cfg.default_memory {
            Some(b) => b.min(m.memory),
            None => ((u128::from(m.memory) * u128::from(cores)) / u128::from(m.cores)) as u64,
        }
        .max(1),
    };
    Some((cores, memory))
}

/// The oracle's view: machines and what runs on them, from the scheduler's outputs only.
struct Oracle {
    cfg: SchedulerConfig,
    machines: Vec<Machine>,
    specs: HashMap<BuildId, BuildSpec>,
    waiting: BTreeSet<BuildId>,
    /// Running builds: machine, cores, memory.
    running: BTreeMap<BuildId, (usize, Vec<u32>, u64)>,
}

impl Oracle {
    fn free(&self, m: usize) -> (u32, u64, u32) {
        let spec = &self.machines[m];
        let on_m = self.running.values().filter(|r| r.0 == m);
        let used_cores = on_m
            .clone()
            .flat_map(|r| &r.1)
            .filter(|&&c| c < spec.cores)
            .count() as u32;
        let used_memory: u64 = on_m.clone().map(|r| r.2).sum();
        let jobs = on_m.count() as u32;
        (
            spec.cores - used_cores,
            spec.memory.saturating_sub(used_memory),
            spec.max_jobs.saturating_sub(jobs),
        )
    }

    fn fits(&self, id: BuildId, m: usize) -> bool {
        let (cores, memory, jobs) = self.free(m);
        oracle_need(&self.specs[&id], &self.machines[m], &self.cfg)
            .is_some_and(|(c, b)| c <= cores && b <= memory && jobs > 0)
    }

    fn runnable_somewhere(&self, spec: &BuildSpec) -> bool {
        self.machines
            .iter()
            .any(|m| oracle_need(spec, m, &self.cfg).is_some())
    }

    /// Checks one start against the state before it, then records it. `reserved` holds the
    /// machines reserved when it started.
    fn start(&mut self, start: &Start, reserved: &BTreeSet<usize>) {
        let m = start.machine.0 as usize;
        assert!(self.waiting.remove(&start.id), "{start:?} was not waiting");
        let spec = &self.specs[&start.id];
        let (cores, memory) = oracle_need(spec, &self.machines[m], &self.cfg)
            .unwrap_or_else(|| panic!("{start:?} cannot run on {:?}", self.machines[m]));
        assert_eq!(start.cores.len() as u32, cores, "{start:?}");
        assert_eq!(start.memory, memory, "{start:?}");
        let (free_cores, free_memory, free_jobs) = self.free(m);
        assert!(free_jobs > 0 && free_memory >= memory && free_cores >= cores);
        let mut seen = BTreeSet::new();
        for &c in &start.cores {
            assert!(c < self.machines[m].cores, "{start:?}");
            assert!(seen.insert(c), "{start:?} repeats a core");
            assert!(
                !self.running.values().any(|r| r.0 == m && r.1.contains(&c)),
                "{start:?}: core {c} is taken"
            );
        }
        // FIFO with priority within the account: an earlier build of the same account that
        // fits on a machine nobody reserved should have gone first.
        if !start.reserved {
            let order = |id: &BuildId| (Reverse(self.specs[id].priority), *id);
            for &other in &self.waiting {
                let o = &self.specs[&other];
                if o.account == spec.account && order(&other) < order(&start.id) {
                    for m in 0..self.machines.len() {
                        assert!(
                            reserved.contains(&m) || !self.fits(other, m),
                            "{other} of the same account, before {}, fits on machine {m}",
                            start.id
                        );
                    }
                }
            }
        }
        self.running
            .insert(start.id, (m, start.cores.clone(), start.memory));
    }

    /// After a full `decide`: no waiting build fits on a machine unless the machine is
    /// reserved for another build (work conservation but for the anti-starvation rule).
    fn check_conserving(&self, sc: &Scheduler) {
        let reserved: BTreeMap<usize, BuildId> =
            sc.reservations().map(|(b, m)| (m.0 as usize, b)).collect();
        for &id in &self.waiting {
            for m in 0..self.machines.len() {
                let held_for_other = reserved.get(&m).is_some_and(|&b| b != id);
                assert!(
                    held_for_other || !self.fits(id, m),
                    "{id} {:?} fits on machine {m} {:?} but waits",
                    self.specs[&id],
                    self.machines[m]
                );
            }
        }
        assert_eq!(sc.waiting_count(), self.waiting.len());
        assert_eq!(sc.running_count(), self.running.len());
    }
}

fn run_ops(machines: Vec<Machine>, ops: Vec<Op>, cfg: SchedulerConfig) {
    let mut sc = Scheduler::new(cfg.clone(), machines.clone()).unwrap();
    let mut o = Oracle {
        cfg,
        machines,
        specs: HashMap::new(),
        waiting: BTreeSet::new(),
        running: BTreeMap::new(),
    };
    let mut t = 0u64;
    let mut accepted = 0usize;
    let mut started = 0usize;
    let mut cancelled = 0usize;
    let mut refused_later = 0usize;
    let decide = |sc: &mut Scheduler, o: &mut Oracle, t: u64, started: &mut usize| {
        let reserved = |sc: &Scheduler| -> BTreeSet<usize> {
            sc.reservations().map(|(_, m)| m.0 as usize).collect()
        };
        loop {
            // Reservations made during the decision hold at the start, and only the started
            // build's own ends with it: the machines reserved then are those before and after.
            let mut then = reserved(sc);
            let Some(start) = sc.decide_one(secs(t)) else {
                break;
            };
            then.extend(reserved(sc));
            o.start(&start, &then);
            *started += 1;
        }
        o.check_conserving(sc);
    };
    for op in ops {
        match op {
            Op::Submit(spec) => match sc.submit(spec.clone(), secs(t)) {
                Ok(id) => {
                    assert!(o.runnable_somewhere(&spec), "{spec:?} accepted");
                    o.specs.insert(id, spec);
                    o.waiting.insert(id);
                    accepted += 1;
                }
                Err(refusal) => {
                    assert!(!o.runnable_somewhere(&spec), "{spec:?}: {refusal}");
                    assert!(!refusal.to_string().is_empty());
                }
            },
            Op::Complete(n) => {
                if let Some(&id) = o.running.keys().nth(n % o.running.len().max(1)) {
                    sc.complete(id, secs(t)).unwrap();
                    o.running.remove(&id);
                }
            }
            Op::Cancel(n) => {
                if let Some(&id) = o.waiting.iter().nth(n % o.waiting.len().max(1)) {
                    sc.cancel(id, secs(t)).unwrap();
                    o.waiting.remove(&id);
                    cancelled += 1;
                }
            }
            Op::Wait(d) => t += d,
            Op::Capacity(n, m) => {
                let i = n % o.machines.len();
                let refused = sc.set_capacity(MachineId(i as u32), m.clone(), secs(t));
                o.machines[i] = m;
                for (id, _) in refused.unwrap() {
                    assert!(o.waiting.remove(&id));
                    assert!(!o.runnable_somewhere(&o.specs[&id]));
                    refused_later += 1;
                }
                for &id in &o.waiting {
                    assert!(o.runnable_somewhere(&o.specs[&id]), "{id} kept");
                }
            }
            Op::Decide => decide(&mut sc, &mut o, t, &mut started),
        }
        for &id in &o.waiting {
            let status = sc.waiting_status(id).unwrap();
            assert!(status.position >= 1 && status.position <= status.waiting);
            assert_eq!(status.waiting, o.waiting.len());
        }
    }
    // Drain: everything still waiting starts as running builds complete.
    let mut rounds = 0;
    loop {
        decide(&mut sc, &mut o, t, &mut started);
        if o.running.is_empty() && o.waiting.is_empty() {
            break;
        }
        rounds += 1;
        assert!(rounds < 10_000, "stuck: {:?} wait", o.waiting);
        assert!(
            !o.running.is_empty(),
            "{:?} wait with nothing running",
            o.waiting
        );
        t += 7;
        let id = *o.running.keys().next().unwrap();
        sc.complete(id, secs(t)).unwrap();
        o.running.remove(&id);
    }
    assert_eq!(accepted, started + cancelled + refused_later);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn never_over_commits_conserves_work_and_starts_everything(
        machines in prop::collection::vec(machine_strategy(), 1..5),
        ops in prop::collection::vec(op_strategy(), 20..150),
        starvation in 0u64..400,
        percent in 1u32..=100,
        default_cores in 1u32..4,
    ) {
        let cfg = SchedulerConfig {
            starvation_after: secs(starvation),
            big_parallel_percent: percent,
            default_cores,
            half_life: secs(300),
            ..SchedulerConfig::default()
        };
        run_ops(machines, ops, cfg);
    }
}

/// Two accounts that always have builds queued, on one machine: the core-seconds each gets
/// in each window of a long run, as shares of the total.
fn shares(
    cores: u32,
    weights: (u32, u32),
    builds: &[(u32, u64)],
    offset: usize,
    windows: usize,
) -> Vec<f64> {
    let cfg = SchedulerConfig {
        half_life: secs(120),
        starvation_after: secs(60),
        weights: BTreeMap::from([("a".to_owned(), weights.0), ("b".to_owned(), weights.1)]),
        ..SchedulerConfig::default()
    };
    let mut sc = Scheduler::new(cfg, vec![machine(cores, 64 * GIB)]).unwrap();
    // Each account cycles through the same list of (cores, seconds), from its own offset.
    let mut next = [0usize, offset];
    let mut submit = |sc: &mut Scheduler, account: usize, t: u64| {
        let (c, d) = builds[next[account] % builds.len()];
        next[account] += 1;
        let id = sc
            .submit(with_cores(["a", "b"][account], c.min(cores)), secs(t))
            .unwrap();
        (id, d)
    };
    let mut durations: HashMap<BuildId, (usize, u64)> = HashMap::new();
    for account in 0..2 {
        for _ in 0..cores * 2 {
            let (id, d) = submit(&mut sc, account, 0);
            durations.insert(id, (account, d));
        }
    }
    // (end time, build, account, cores)
    let mut running: BTreeSet<(u64, BuildId, usize, u32)> = BTreeSet::new();
    let window = 4000;
    let warmup = 2000;
    let mut used = vec![[0u64; 2]; windows];
    let mut t = 0;
    loop {
        for start in sc.decide(secs(t)) {
            let (account, d) = durations[&start.id];
            running.insert((t + d, start.id, account, start.cores.len() as u32));
            // Keep the queue full.
            let (id, d) = submit(&mut sc, account, t);
            durations.insert(id, (account, d));
        }
        let &(end, _, _, _) = running.first().unwrap();
        // Core-seconds between t and end, per window.
        for &(_, _, account, c) in &running {
            for s in t..end {
                if s >= warmup && ((s - warmup) / window) < windows as u64 {
                    used[((s - warmup) / window) as usize][account] += u64::from(c);
                }
            }
        }
        t = end;
        if t >= warmup + window * windows as u64 {
            break;
        }
        while let Some(&(end, id2, _, _)) = running.first() {
            if end != t {
                break;
            }
            running.pop_first();
            sc.complete(id2, secs(t)).unwrap();
        }
    }
    used.iter()
        .map(|w| w[0] as f64 / (w[0] + w[1]) as f64)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn equal_accounts_get_between_40_and_60_percent(
        cores in 1u32..9,
        builds in prop::collection::vec((1u32..4, 1u64..40), 1..12),
        offset in 0usize..12,
    ) {
        for share in shares(cores, (1, 1), &builds, offset, 4) {
            prop_assert!((0.4..=0.6).contains(&share), "share of a: {share}");
        }
    }

    #[test]
    fn shares_converge_to_the_weights(
        cores in 2u32..9,
        builds in prop::collection::vec((1u32..3, 1u64..30), 1..8),
    ) {
        for share in shares(cores, (1, 3), &builds, 0, 3) {
            prop_assert!((0.15..=0.35).contains(&share), "share of a: {share}");
        }
    }
}
