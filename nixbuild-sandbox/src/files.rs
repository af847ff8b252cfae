//! The exact contents of the files the sandbox writes into `/etc` (docs/sandbox.md C.3, C.4, C.6).

/// The user id the builder runs as inside the sandbox.
pub const SANDBOX_UID: u32 = 1000;
/// The group id the builder runs as inside the sandbox.
pub const SANDBOX_GID: u32 = 100;
/// The build directory inside the sandbox (Nix's `sandbox-build-dir`).
pub const SANDBOX_BUILD_DIR: &str = "/build";
/// The store directory inside the sandbox.
pub const STORE_DIR: &str = "/nix/store";

/// `/etc/passwd`: root, the build user (home = the build dir) and nobody.
pub const ETC_PASSWD: &[u8] = b"root:x:0:0:Nix build user:/build:/noshell\n\
nixbld:x:1000:100:Nix build user:/build:/noshell\n\
nobody:x:65534:65534:Nobody:/:/noshell\n";

/// `/etc/group`: root, the build group (password field `!`) and nogroup.
pub const ETC_GROUP: &[u8] = b"root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n";

/// `/etc/hosts` of a sandboxed (not fixed-output) build; fixed-output builds get the host's.
pub const ETC_HOSTS: &[u8] = b"127.0.0.1 localhost\n::1 localhost\n";

/// `/etc/nsswitch.conf` of a fixed-output build, so name lookups use the bind-mounted host files
/// and DNS.
pub const ETC_NSSWITCH_FOD: &[u8] = b"hosts: files dns\nservices: files\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_is_exactly_the_three_lines_of_the_spec() {
        let lines: Vec<&[u8]> = ETC_PASSWD.split(|&b| b == b'\n').collect();
        assert_eq!(
            lines,
            [
                &b"root:x:0:0:Nix build user:/build:/noshell"[..],
                b"nixbld:x:1000:100:Nix build user:/build:/noshell",
                b"nobody:x:65534:65534:Nobody:/:/noshell",
                b"",
            ]
        );
    }

    #[test]
    fn passwd_home_and_ids_agree_with_the_constants() {
        let text = std::str::from_utf8(ETC_PASSWD).expect("ascii");
        let nixbld = text
            .lines()
            .find(|l| l.starts_with("nixbld:"))
            .expect("nixbld line");
        let fields: Vec<&str> = nixbld.split(':').collect();
        assert_eq!(fields[2], SANDBOX_UID.to_string());
        assert_eq!(fields[3], SANDBOX_GID.to_string());
        assert_eq!(fields[5], SANDBOX_BUILD_DIR);
    }

    #[test]
    fn group_bytes() {
        assert_eq!(ETC_GROUP, b"root:x:0:\nnixbld:!:100:\nnogroup:x:65534:\n");
    }

    #[test]
    fn hosts_bytes() {
        assert_eq!(ETC_HOSTS, b"127.0.0.1 localhost\n::1 localhost\n");
    }

    #[test]
    fn nsswitch_bytes() {
        assert_eq!(ETC_NSSWITCH_FOD, b"hosts: files dns\nservices: files\n");
    }
}
