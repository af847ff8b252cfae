//! Discovery, pure: where each controller lives for this process, from the text of
//! `/proc/self/mountinfo`, `/proc/self/cgroup` and `/proc/cgroups`, and the small formats of
//! cgroup files (CPU lists, keyed files, names). Nothing here touches the file system.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::Version;

/// Why a controller is not found for this process.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LocateError {
    /// `/proc/cgroups` lists it as disabled.
    #[error("disabled in the kernel (/proc/cgroups)")]
    Disabled,
    /// A v1 hierarchy holds this process, but no mount shows its cgroup.
    #[error(
        "its cgroup v1 hierarchy holds this process at {0} but is not mounted where this \
         process can see it"
    )]
    NotVisible(String),
    /// Neither v1 nor v2 has it.
    #[error("mounted neither as a cgroup v1 hierarchy nor in cgroup v2")]
    NotMounted,
}

/// Why a CPU list does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CpuListError {
    /// A number that is not a CPU number.
    #[error("{0:?} is not a CPU number below {MAX_CPUS}")]
    Number(String),
    /// A range whose start is above its end.
    #[error("{0:?} is an empty range")]
    EmptyRange(String),
}

/// Most CPUs a list may name.
const MAX_CPUS: u32 = 1 << 16;

/// One line of `/proc/self/mountinfo` that mounts a cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CgroupMount {
    /// The directory of the hierarchy shown at the mount point.
    root: String,
    /// Where it is mounted.
    mount_point: PathBuf,
    /// `None` for cgroup2, else the v1 controllers (and `name=` options).
    v1_options: Option<Vec<String>>,
}

/// The cgroup mounts in the text of `/proc/self/mountinfo`.
pub(super) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fields: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or("");
            let v1_options = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(options.split(',').map(str::to_owned).collect()),
                _ => return None,
            };
            Some(CgroupMount {
                root: unescape(fields.get(3)?),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                v1_options,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match escape {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The lines of `/proc/self/cgroup`: hierarchy id, controllers, path.
pub(super) fn parse_self_cgroup(text: &str) -> Vec<(u32, Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let id = parts.next()?.parse().ok()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some((id, controllers, path.to_owned()))
        })
        .collect()
}

/// Whether `/proc/cgroups` lists the controller as disabled (`None` when it is not listed,
/// or the file is absent as on kernels that dropped it).
fn disabled_in(proc_cgroups: &str, controller: &str) -> Option<bool> {
    proc_cgroups.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next()? == controller).then_some(())?;
        Some(fields.nth(2)? == "0")
    })
}

/// The directory of our own cgroup inside a mount: the mount point plus our path relative to
/// the mount's root; `None` when our cgroup is outside what the mount shows.
fn own_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let rel = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// Where a controller lives for this process: its version and our cgroup's directory there,
/// or why it is not found. For v2 the caller still checks `cgroup.controllers`.
pub(super) fn locate(
    controller: &str,
    mounts: &[CgroupMount],
    self_cgroup: &[(u32, Vec<String>, String)],
    proc_cgroups: &str,
) -> Result<(Version, PathBuf), LocateError> {
    if disabled_in(proc_cgroups, controller) == Some(true) {
        return Err(LocateError::Disabled);
    }
    let v1_mounts = mounts.iter().filter(|m| {
        m.v1_options
            .as_ref()
            .is_some_and(|o| o.iter().any(|x| x == controller))
    });
    let v1_path = self_cgroup
        .iter()
        .find(|(_, c, _)| c.iter().any(|x| x == controller))
        .map(|(_, _, p)| p.as_str());
    if let Some(path) = v1_path {
        if let Some(dir) = v1_mounts.clone().find_map(|m| own_dir(m, path)) {
            return Ok((Version::V1, dir));
        }
        return Err(LocateError::NotVisible(path.to_owned()));
    }
    let v2_path = self_cgroup
        .iter()
        .find(|(id, c, _)| *id == 0 && c.is_empty())
        .map(|(_, _, p)| p.as_str());
    let v2 = mounts
        .iter()
        .filter(|m| m.v1_options.is_none())
        .find_map(|m| own_dir(m, v2_path?));
    match v2 {
        Some(dir) => Ok((Version::V2, dir)),
        None => Err(LocateError::NotMounted),
    }
}

/// Parses a CPU list such as `0-3,8,10-11` (at most 65,536 CPUs).
pub fn parse_cpu_list(text: &str) -> Result<Vec<u32>, CpuListError> {
    let mut cpus = BTreeSet::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let number = |s: &str| {
            s.parse::<u32>()
                .ok()
                .filter(|&n| n < MAX_CPUS)
                .ok_or_else(|| CpuListError::Number(s.to_owned()))
        };
        let (low, high) = match part.split_once('-') {
            Some((l, h)) => (number(l)?, number(h)?),
            None => (number(part)?, number(part)?),
        };
        if low > high {
            return Err(CpuListError::EmptyRange(part.to_owned()));
        }
        cpus.extend(low..=high);
    }
    Ok(cpus.into_iter().collect())
}

/// Formats CPUs as a list with ranges, like the kernel (`0-3,8`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// Whether `name` may be a cgroup directory name.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The value of `key` in a flat keyed file (`key value` lines).
pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    /// This machine's layout: v1 hierarchies plus a nearly empty unified one.
    const HYBRID_MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const HYBRID_SELF: &str = "\
9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/f589
3:cpuset:/
1:cpu:/
0::/
";
    const PROC_CGROUPS: &str = "\
#subsys_name\thierarchy\tnum_cgroups\tenabled
cpuset\t3\t1\t1
memory\t4\t138\t1
pids\t8\t1\t1
hugetlb\t0\t1\t1
rdma\t0\t1\t0
";

    #[test]
    fn each_controller_is_found_on_its_own_hierarchy() {
        let mounts = parse_mountinfo(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 7);
        let own = parse_self_cgroup(HYBRID_SELF);
        let at = |c| locate(c, &mounts, &own, PROC_CGROUPS);
        assert_eq!(
            at("memory"),
            Ok((
                Version::V1,
                PathBuf::from("/sys/fs/cgroup/memory/process_api/f589")
            ))
        );
        assert_eq!(
            at("cpuset"),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/cpuset/")))
        );
        assert_eq!(
            at("pids"),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/pids/")))
        );
        // Not on a v1 hierarchy: the unified one, where cgroup.controllers decides.
        assert_eq!(
            at("hugetlb"),
            Ok((Version::V2, PathBuf::from("/sys/fs/cgroup/unified/")))
        );
        assert!(at("rdma").unwrap_err().to_string().contains("disabled"));
    }

    #[test]
    fn pure_v2_and_a_namespaced_mount() {
        let mountinfo = "\
25 1 0:22 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup("0::/system.slice/nixbuild.service\n");
        assert_eq!(
            locate("memory", &mounts, &own, ""),
            Ok((
                Version::V2,
                PathBuf::from("/sys/fs/cgroup/system.slice/nixbuild.service")
            ))
        );
        // A container that sees only its own subtree: the mount's root is its cgroup.
        let mountinfo = "\
30 20 0:26 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
";
        let mounts = parse_mountinfo(mountinfo);
        let own = parse_self_cgroup("5:memory:/docker/abc/inner\n");
        assert_eq!(
            locate("memory", &mounts, &own, ""),
            Ok((Version::V1, PathBuf::from("/sys/fs/cgroup/memory/inner")))
        );
        let own = parse_self_cgroup("5:memory:/docker/abcdef\n");
        assert!(locate("memory", &mounts, &own, "").is_err());
        assert!(locate("pids", &[], &own, "").is_err());
    }

    #[test]
    fn mountinfo_escapes() {
        let line = "1 2 0:1 / /mnt/a\\040b rw - cgroup2 none rw\n";
        assert_eq!(
            parse_mountinfo(line)[0].mount_point,
            PathBuf::from("/mnt/a b")
        );
        assert_eq!(unescape("x\\134y\\0"), "x\\y\\0");
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<u32>::new());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("0-4294967295").is_err());
        assert!(parse_cpu_list("x").is_err());
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpu_list(&[5]), "5");
    }

    #[test]
    fn names_are_single_safe_components() {
        assert!(valid_name("build-12.a_b"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n";
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed("oom_kill_disable 0\nunder_oom 0\n", "oom_kill"), None);
    }
}
