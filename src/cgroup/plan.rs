//! The cgroup v2 plan, pure: from the recorded contents of the daemon's own cgroup files, the
//! ordered steps that give it a subtree with the controllers builds need, or why it cannot
//! have one and must ask for delegation. [`super::setup`] reads the files and carries the steps
//! out; nothing here touches the file system.
//!
//! cgroup v2's rules the plan obeys:
//! - **No internal processes**: a cgroup other than the root that holds processes cannot
//!   enable a domain controller (memory) in its `cgroup.subtree_control` (EBUSY). So the
//!   daemon first moves itself into a leaf child, and gives up (needs delegation) when other
//!   processes share its cgroup, as in an SSH login's session scope or `ssh.service`.
//! - **Domain before threaded**: enabling the threaded controllers (cpuset, pids) in a cgroup
//!   that still holds processes, then memory, fails with EOPNOTSUPP; the move comes first, and
//!   memory is enabled before the others.
//! - **Top-down**: a controller is enabled in the own cgroup, then in `<root_name>` under it,
//!   and never where the parent does not offer it (`cgroup.controllers`).

use std::fmt;
use std::path::{Path, PathBuf};

use super::Controller;

/// The controllers builds are confined with on v2, in the order they are enabled: the domain
/// controller first.
pub(super) const V2_CONTROLLERS: [Controller; 3] =
    [Controller::Memory, Controller::Cpuset, Controller::Pids];

/// What the plan is made from: the own cgroup's files as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct OwnCgroup<'a> {
    /// Its directory.
    pub(super) dir: &'a Path,
    /// `cgroup.controllers`: what the parent offers it.
    pub(super) controllers: &'a str,
    /// `cgroup.subtree_control`: what it already hands to its children.
    pub(super) subtree_control: &'a str,
    /// `cgroup.type`: `domain`, or a threaded type; `None` in the hierarchy's root, which has
    /// no such file and where processes and enabled controllers may coexist.
    pub(super) cgroup_type: Option<&'a str>,
    /// `cgroup.procs`: the processes in it.
    pub(super) procs: &'a str,
    /// This process.
    pub(super) pid: u32,
}

/// One step of the plan, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// Create the leaf and move this process (all its threads) into it.
    MoveToLeaf(PathBuf),
    /// Create this directory (the builds' parent, `<own>/<root_name>`).
    CreateDir(PathBuf),
    /// Write `+<controller>` to this directory's `cgroup.subtree_control`.
    Enable(PathBuf, Controller),
}

/// Why a controller cannot be had in the own cgroup.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Missing {
    /// The parent does not offer it.
    #[error(
        "not delegated to this process's cgroup {}: its cgroup.controllers lacks it",
        .0.display()
    )]
    NotOffered(PathBuf),
    /// Other processes share the own cgroup, so it may not hand domain controllers down.
    #[error(
        "this process's cgroup {} also holds {others} other process(es), and cgroup v2 lets \
         only a cgroup without processes hand controllers to its children",
        own.display()
    )]
    Shared {
        /// The own cgroup.
        own: PathBuf,
        /// How many other processes it holds.
        others: usize,
    },
    /// The own cgroup is in a threaded subtree, where the domain controller memory cannot be
    /// enabled and a process cannot join a new child.
    #[error(
        "this process's cgroup {} is of type {kind:?}: in a threaded subtree memory cannot be \
         enabled (EOPNOTSUPP) and processes cannot join new children",
        own.display()
    )]
    Threaded {
        /// The own cgroup.
        own: PathBuf,
        /// Its `cgroup.type`.
        kind: String,
    },
}

/// The plan: steps to carry out in order, and the controllers that cannot be had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Plan {
    /// The steps.
    pub(super) steps: Vec<Step>,
    /// Wanted controllers the own cgroup cannot give, each with why.
    pub(super) missing: Vec<(Controller, Missing)>,
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split_whitespace()
}

/// The wanted controllers (a subset of [`V2_CONTROLLERS`], in any order) `own` can give its
/// children, in the order to enable them, and those it cannot, each with why.
pub(super) fn usable_v2(
    own: &OwnCgroup<'_>,
    wanted: &[Controller],
) -> (Vec<Controller>, Vec<(Controller, Missing)>) {
    let offered: Vec<&str> = words(own.controllers).collect();
    let enabled: Vec<&str> = words(own.subtree_control).collect();
    let me = own.pid.to_string();
    let others = words(own.procs).filter(|p| *p != me).count();
    let is_root = own.cgroup_type.is_none();
    let threaded = own.cgroup_type.map(str::trim).filter(|t| *t != "domain");
    let mut usable = Vec::new();
    let mut missing = Vec::new();
    for controller in V2_CONTROLLERS.into_iter().filter(|c| wanted.contains(c)) {
        let why = if !offered.contains(&controller.name()) {
            Some(Missing::NotOffered(own.dir.to_owned()))
        } else if let Some(kind) = threaded {
            Some(Missing::Threaded {
                own: own.dir.to_owned(),
                kind: kind.to_owned(),
            })
        } else if !is_root && others > 0 && !enabled.contains(&controller.name()) {
            Some(Missing::Shared {
                own: own.dir.to_owned(),
                others,
            })
        } else {
            None
        };
        match why {
            Some(why) => missing.push((controller, why)),
            None => usable.push(controller),
        }
    }
    (usable, missing)
}

/// The plan for `wanted` (see [`usable_v2`]) under `own`, with the builds' parent
/// `<own>/<root_name>` and the daemon's leaf `<own>/<root_name>.daemon`.
pub(super) fn plan_v2(own: &OwnCgroup<'_>, root_name: &str, wanted: &[Controller]) -> Plan {
    let (usable, missing) = usable_v2(own, wanted);
    let enabled: Vec<&str> = words(own.subtree_control).collect();
    let to_enable: Vec<Controller> = usable
        .iter()
        .copied()
        .filter(|c| !enabled.contains(&c.name()))
        .collect();
    let me = own.pid.to_string();
    let mut steps = Vec::new();
    if own.cgroup_type.is_some() && !to_enable.is_empty() && words(own.procs).any(|p| p == me) {
        steps.push(Step::MoveToLeaf(
            own.dir.join(format!("{root_name}.daemon")),
        ));
    }
    steps.extend(
        to_enable
            .iter()
            .map(|&c| Step::Enable(own.dir.to_owned(), c)),
    );
    let base = own.dir.join(root_name);
    steps.push(Step::CreateDir(base.clone()));
    steps.extend(usable.iter().map(|&c| Step::Enable(base.clone(), c)));
    Plan { steps, missing }
}

/// What to do about missing controllers, given the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delegation {
    /// Every controller can be had (or none is on v2).
    NotNeeded,
    /// Ask systemd for a delegated scope and move there.
    AskSystemd,
    /// Already moved into a delegated scope, and still missing controllers.
    ScopeNotEnough,
    /// No systemd to ask (or not root).
    NoSystemd,
}

impl Delegation {
    /// The decision: `systemd` is whether systemd manages this host (`/run/systemd/system`)
    /// and this process may ask it (root), `in_scope` whether this process already runs in
    /// the scope it asked for.
    pub(super) fn decide(needs: bool, systemd: bool, in_scope: bool) -> Delegation {
        match (needs, systemd, in_scope) {
            (false, _, _) => Delegation::NotNeeded,
            (true, _, true) => Delegation::ScopeNotEnough,
            (true, true, false) => Delegation::AskSystemd,
            (true, false, false) => Delegation::NoSystemd,
        }
    }
}

impl fmt::Display for Delegation {
    /// What was tried, for the reason a controller is unavailable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Delegation::NotNeeded => "",
            Delegation::AskSystemd => {
                "; a delegated systemd scope could not be obtained \
                 (StartTransientUnit with Delegate=yes over D-Bus, see the warning above)"
            }
            Delegation::ScopeNotEnough => {
                "; this is already the systemd scope with Delegate=yes obtained over D-Bus"
            }
            Delegation::NoSystemd => {
                "; systemd is not running here (or this process is not root), so no delegated \
                 scope could be asked for: start the daemon in a cgroup of its own whose \
                 parent offers cpuset, memory and pids"
            }
        })
    }
}

/// Why a write to `cgroup.subtree_control` or `cgroup.procs` failed, in cgroup v2's terms,
/// from its errno.
pub(super) fn explain_errno(errno: i32) -> Option<&'static str> {
    match rustix::io::Errno::from_raw_os_error(errno) {
        rustix::io::Errno::BUSY => Some(
            "the cgroup holds processes, and cgroup v2 lets only a cgroup without processes \
             hand controllers to its children",
        ),
        rustix::io::Errno::NOTSUP => Some(
            "the cgroup is threaded or a thread-mode root, where a domain controller (memory) \
             cannot be enabled",
        ),
        rustix::io::Errno::NOENT => Some("the parent does not offer this controller"),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use Controller::{Cpuset, Memory, Pids};

    /// Recorded on a fresh Debian 12 (systemd 252, unified hierarchy) from a command run as
    /// root over SSH: `/proc/self/cgroup` is `0::/system.slice/ssh.service`, and sshd with its
    /// children share that cgroup, to which system.slice offers only memory and pids.
    const SSH_SERVICE: &str = "/sys/fs/cgroup/system.slice/ssh.service";
    const SSH_CONTROLLERS: &str = "memory pids\n";
    const SSH_PROCS: &str = "338\n359\n371\n374\n";

    /// Recorded in the same machine under `systemd-run --scope --collect -p Delegate=yes`:
    /// `0::/system.slice/run-r9246e405781143b2a741fe4da87c8cba.scope`, every controller
    /// offered, and only the scope's process in it.
    const SCOPE: &str = "/sys/fs/cgroup/system.slice/run-r9246e405781143b2a741fe4da87c8cba.scope";
    const SCOPE_CONTROLLERS: &str = "cpuset cpu io memory pids\n";

    const ALL: [Controller; 3] = [Cpuset, Memory, Pids];

    fn own<'a>(dir: &'a str, controllers: &'a str, procs: &'a str, pid: u32) -> OwnCgroup<'a> {
        OwnCgroup {
            dir: Path::new(dir),
            controllers,
            subtree_control: "\n",
            cgroup_type: Some("domain\n"),
            procs,
            pid,
        }
    }

    fn enable(dir: &str, controllers: &[Controller]) -> Vec<Step> {
        controllers
            .iter()
            .map(|&c| Step::Enable(PathBuf::from(dir), c))
            .collect()
    }

    /// The steps as one list: the move (if any), the own cgroup's controllers, the builds'
    /// parent and its controllers.
    fn steps(
        leaf: Option<&str>,
        own: (&str, &[Controller]),
        base: (&str, &[Controller]),
    ) -> Vec<Step> {
        let mut steps: Vec<Step> = leaf
            .map(|l| Step::MoveToLeaf(l.into()))
            .into_iter()
            .collect();
        steps.extend(enable(own.0, own.1));
        steps.push(Step::CreateDir(base.0.into()));
        steps.extend(enable(base.0, base.1));
        steps
    }

    #[test]
    fn a_delegated_scope_moves_the_daemon_to_a_leaf_then_enables_top_down() {
        let plan = plan_v2(&own(SCOPE, SCOPE_CONTROLLERS, "381\n", 381), "nb", &ALL);
        let base = format!("{SCOPE}/nb");
        // Memory (a domain controller) first: enabling cpuset and pids in a cgroup that still
        // held the daemon, then memory, failed with EOPNOTSUPP in the VM.
        let order = [Memory, Cpuset, Pids];
        assert_eq!(
            plan,
            Plan {
                steps: steps(
                    Some(&format!("{SCOPE}/nb.daemon")),
                    (SCOPE, &order),
                    (&base, &order)
                ),
                missing: vec![],
            }
        );
        // A delegated service (`systemd-run --unit=x -p Delegate=yes`) is the same.
        let unit = "/sys/fs/cgroup/system.slice/nbtest.service";
        let plan = plan_v2(&own(unit, SCOPE_CONTROLLERS, "412\n", 412), "nb", &[Pids]);
        let base = format!("{unit}/nb");
        assert_eq!(
            plan.steps,
            steps(
                Some(&format!("{unit}/nb.daemon")),
                (unit, &[Pids]),
                (&base, &[Pids])
            )
        );
    }

    #[test]
    fn the_ssh_service_of_a_fresh_debian_needs_delegation() {
        let plan = plan_v2(
            &own(SSH_SERVICE, SSH_CONTROLLERS, SSH_PROCS, 371),
            "nb",
            &ALL,
        );
        // Nothing is touched but the builds' parent (where v2 freezing works regardless).
        assert_eq!(
            plan.steps,
            steps(
                None,
                (SSH_SERVICE, &[]),
                (&format!("{SSH_SERVICE}/nb"), &[])
            )
        );
        let shared = Missing::Shared {
            own: SSH_SERVICE.into(),
            others: 3,
        };
        assert_eq!(
            plan.missing,
            vec![
                (Memory, shared.clone()),
                (Cpuset, Missing::NotOffered(SSH_SERVICE.into())),
                (Pids, shared),
            ]
        );
        assert_eq!(
            Delegation::decide(true, true, false),
            Delegation::AskSystemd
        );
        let message = format!("{}{}", plan.missing[0].1, Delegation::NoSystemd);
        assert!(
            message.starts_with(
                "this process's cgroup /sys/fs/cgroup/system.slice/ssh.service also holds 3 \
                 other process(es)"
            ) && message.contains("systemd is not running here"),
            "{message}"
        );
    }

    /// Recorded on a fresh Debian 12 with pam_systemd (what a standard install has), from a
    /// command run as root over SSH: `0::/user.slice/user-0.slice/session-3.scope`, holding
    /// sshd's session process, the shell and the command; user-0.slice offers cpu, memory
    /// and pids, no cpuset. The daemon asked systemd for `nixbuild-370.scope` and went on
    /// there as in `a_delegated_scope_moves_the_daemon_to_a_leaf_then_enables_top_down`.
    #[test]
    fn an_ssh_login_s_session_scope_needs_delegation() {
        let session = "/sys/fs/cgroup/user.slice/user-0.slice/session-3.scope";
        let plan = plan_v2(
            &own(session, "cpu memory pids\n", "356\n363\n369\n", 369),
            "nb",
            &ALL,
        );
        assert_eq!(
            plan.steps,
            steps(None, (session, &[]), (&format!("{session}/nb"), &[]))
        );
        let shared = Missing::Shared {
            own: session.into(),
            others: 2,
        };
        assert_eq!(
            plan.missing,
            vec![
                (Memory, shared.clone()),
                (Cpuset, Missing::NotOffered(session.into())),
                (Pids, shared),
            ]
        );
    }

    #[test]
    fn a_cgroup_that_holds_other_processes_is_never_written() {
        // What gave EBUSY: another process beside the daemon in a cgroup that offers all.
        let plan = plan_v2(
            &own(SCOPE, SCOPE_CONTROLLERS, "381\n384\n", 384),
            "nb",
            &ALL,
        );
        assert!(!plan
            .steps
            .iter()
            .any(|s| matches!(s, Step::Enable(..) | Step::MoveToLeaf(_))));
        assert_eq!(plan.missing.len(), 3);
        assert!(explain_errno(rustix::io::Errno::BUSY.raw_os_error())
            .unwrap()
            .contains("holds processes"));
    }

    #[test]
    fn a_threaded_cgroup_cannot_have_memory() {
        // What a daemon that enabled cpuset and pids before moving itself could leave.
        let mut threaded = own(SCOPE, SCOPE_CONTROLLERS, "381\n", 381);
        threaded.cgroup_type = Some("domain threaded\n");
        let plan = plan_v2(&threaded, "nb", &ALL);
        assert_eq!(
            plan.missing[0],
            (
                Memory,
                Missing::Threaded {
                    own: SCOPE.into(),
                    kind: "domain threaded".into()
                }
            )
        );
        assert_eq!(plan.missing.len(), 3);
        assert!(plan.missing[0].1.to_string().contains("EOPNOTSUPP"));
        assert!(explain_errno(rustix::io::Errno::NOTSUP.raw_os_error())
            .unwrap()
            .contains("threaded"));
        assert_eq!(explain_errno(rustix::io::Errno::PERM.raw_os_error()), None);
    }

    #[test]
    fn a_second_detection_finds_the_own_cgroup_set_up() {
        // The daemon is in its leaf already, and the own cgroup hands everything down.
        let mut done = own(SCOPE, SCOPE_CONTROLLERS, "", 381);
        done.subtree_control = "cpuset memory pids\n";
        let base = format!("{SCOPE}/nb");
        let order = [Memory, Cpuset, Pids];
        assert_eq!(
            plan_v2(&done, "nb", &ALL),
            Plan {
                steps: steps(None, (SCOPE, &[]), (&base, &order)),
                missing: vec![],
            }
        );
    }

    #[test]
    fn the_root_cgroup_holds_processes_and_hands_controllers_down() {
        let root = OwnCgroup {
            dir: Path::new("/sys/fs/cgroup"),
            controllers: SCOPE_CONTROLLERS,
            subtree_control: "memory pids\n",
            cgroup_type: None,
            procs: "1\n2\n381\n",
            pid: 381,
        };
        let plan = plan_v2(&root, "nb", &ALL);
        assert_eq!(
            plan.steps,
            steps(
                None,
                ("/sys/fs/cgroup", &[Cpuset]),
                ("/sys/fs/cgroup/nb", &[Memory, Cpuset, Pids])
            )
        );
        assert!(plan.missing.is_empty());
    }

    #[test]
    fn delegation_is_asked_once_and_only_of_systemd() {
        use Delegation::*;
        for (needs, systemd, in_scope, expected) in [
            (false, true, false, NotNeeded),
            (false, false, true, NotNeeded),
            (true, true, false, AskSystemd),
            (true, true, true, ScopeNotEnough),
            (true, false, true, ScopeNotEnough),
            (true, false, false, NoSystemd),
        ] {
            assert_eq!(
                Delegation::decide(needs, systemd, in_scope),
                expected,
                "{needs} {systemd} {in_scope}"
            );
        }
        assert_eq!(NotNeeded.to_string(), "");
        assert!(ScopeNotEnough
            .to_string()
            .contains("already the systemd scope"));
        assert!(AskSystemd.to_string().contains("could not be obtained"));
    }
}
