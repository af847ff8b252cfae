//! The builder's environment (docs/sandbox.md C.8, C.9).
//!
//! Nix fills a sorted map in a fixed order of writes, later writes winning, and passes it to
//! `execve` in key order. [`build_env`] does the same, so the result is both "in Nix's order"
//! (precedence) and byte-identical in layout (sorted by name).

use std::collections::{BTreeMap, BTreeSet};

use nixbuild_core::hash::{Hash, HashAlgo};

use crate::files::{SANDBOX_BUILD_DIR, STORE_DIR};
use crate::{BuildRequest, HostSetup, PlanError};

/// `HOME`: a directory that does not exist, so nothing leaks through dotfiles.
pub const HOME: &str = "/homeless-shelter";
/// `PATH` before the derivation's env: a directory that does not exist.
pub const PATH: &str = "/path-not-set";
/// `TERM`.
pub const TERM: &str = "xterm-256color";

/// Environment variables as `(name, value)` pairs, sorted by name: the `envp` of `execve`.
pub type EnvVars = Vec<(Vec<u8>, Vec<u8>)>;

/// A file the plan writes into the build directory before the builder starts: `passAsFile`
/// attributes (docs/sandbox.md C.9). Owned by the build user, mode 0644.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildDirFile {
    /// The file's name in `/build` (e.g. `.attr-<nix32>`); never contains `/`.
    pub name: String,
    /// The file's contents.
    pub contents: Vec<u8>,
}

/// Splits like Nix's `tokenizeString` with its default separators (space, tab, newline, CR).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .filter(|t| !t.is_empty())
}

/// The name of the file holding `passAsFile` attribute `name`: `.attr-<nix32(sha256(name))>`.
pub fn pass_as_file_name(name: &[u8]) -> String {
    format!(".attr-{}", Hash::compute(HashAlgo::Sha256, name).to_nix32())
}

fn check_nul(what: &'static str, value: &[u8]) -> Result<(), PlanError> {
    if value.contains(&0) {
        return Err(PlanError::NulByte {
            what,
            value: String::from_utf8_lossy(value).into_owned(),
        });
    }
    Ok(())
}

/// The builder's environment, sorted by name, and the files to write into the build directory.
pub fn build_env(
    req: &BuildRequest,
    host: &HostSetup,
) -> Result<(EnvVars, Vec<BuildDirFile>), PlanError> {
    for (k, v) in &req.env {
        check_nul("environment name", k)?;
        check_nul("environment value", v)?;
    }
    if req.env.contains_key(&b"__json"[..]) {
        return Err(PlanError::StructuredAttrsUnsupported);
    }
    if req
        .env
        .get(&b"exportReferencesGraph"[..])
        .is_some_and(|v| tokens(v).next().is_some())
    {
        return Err(PlanError::ExportReferencesGraphUnsupported);
    }
    if req.cores == 0 {
        return Err(PlanError::NoCores);
    }

    let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut set = |k: &[u8], v: &[u8]| {
        env.insert(k.to_vec(), v.to_vec());
    };

    // 1. Defaults the derivation may override.
    set(b"PATH", PATH.as_bytes());
    set(b"HOME", HOME.as_bytes());
    set(b"NIX_STORE", STORE_DIR.as_bytes());
    set(b"NIX_BUILD_CORES", req.cores.to_string().as_bytes());

    // 2. The derivation's env, with passAsFile attributes moved into files.
    let pass_as_file: BTreeSet<&[u8]> = req
        .env
        .get(&b"passAsFile"[..])
        .map(|v| tokens(v).collect())
        .unwrap_or_default();
    let mut files = Vec::new();
    for (k, v) in &req.env {
        if pass_as_file.contains(k.as_slice()) {
            let name = pass_as_file_name(k);
            let mut var = k.clone();
            var.extend_from_slice(b"Path");
            set(&var, format!("{SANDBOX_BUILD_DIR}/{name}").as_bytes());
            files.push(BuildDirFile {
                name,
                contents: v.clone(),
            });
        } else {
            set(k, v);
        }
    }

    // 3. The build directory, which the derivation cannot override.
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(k.as_bytes(), SANDBOX_BUILD_DIR.as_bytes());
    }

    if req.fixed_output {
        // 4. and 5.
        set(b"NIX_OUTPUT_CHECKED", b"1");
        if let Some(names) = req.env.get(&b"impureEnvVars"[..]) {
            for name in tokens(names) {
                let value = host.impure_env.get(name).map_or(&[][..], Vec::as_slice);
                check_nul("environment value", value)?;
                set(name, value);
            }
        }
    }

    // 6.
    set(b"NIX_LOG_FD", b"2");
    set(b"TERM", TERM.as_bytes());

    Ok((env.into_iter().collect(), files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{sample_host, sample_request};

    fn pairs(list: &[(&str, &str)]) -> Vec<(Vec<u8>, Vec<u8>)> {
        list.iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn sample_derivation_env_in_order_with_values() {
        let (env, files) = build_env(&sample_request(), &sample_host()).expect("env");
        assert!(files.is_empty());
        let out = "/nix/store/7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-env-dump";
        let builder = "/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1/bin/bash";
        assert_eq!(
            env,
            pairs(&[
                ("HOME", "/homeless-shelter"),
                ("NIX_BUILD_CORES", "2"),
                ("NIX_BUILD_TOP", "/build"),
                ("NIX_LOG_FD", "2"),
                ("NIX_STORE", "/nix/store"),
                ("PATH", "/path-not-set"),
                ("PWD", "/build"),
                ("TEMP", "/build"),
                ("TEMPDIR", "/build"),
                ("TERM", "xterm-256color"),
                ("TMP", "/build"),
                ("TMPDIR", "/build"),
                ("builder", builder),
                ("name", "env-dump"),
                ("out", out),
                ("system", "x86_64-linux"),
            ])
        );
    }

    #[test]
    fn derivation_overrides_the_defaults_but_not_the_build_dir_or_log_fd() {
        let mut req = sample_request();
        for (k, v) in [
            ("NIX_BUILD_CORES", "7"),
            ("PATH", "/nix/store/x/bin"),
            ("HOME", "/h"),
            ("NIX_STORE", "/s"),
            ("TMPDIR", "/elsewhere"),
            ("PWD", "/elsewhere"),
            ("NIX_LOG_FD", "9"),
            ("TERM", "dumb"),
        ] {
            req.env.insert(k.into(), v.into());
        }
        let (env, _) = build_env(&req, &sample_host()).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        let get = |k: &str| String::from_utf8(env[k.as_bytes()].clone()).expect("utf8");
        assert_eq!(get("NIX_BUILD_CORES"), "7");
        assert_eq!(get("PATH"), "/nix/store/x/bin");
        assert_eq!(get("HOME"), "/h");
        assert_eq!(get("NIX_STORE"), "/s");
        assert_eq!(get("TMPDIR"), "/build");
        assert_eq!(get("PWD"), "/build");
        assert_eq!(get("NIX_LOG_FD"), "2");
        assert_eq!(get("TERM"), "xterm-256color");
    }

    #[test]
    fn cores_granted_become_nix_build_cores() {
        let mut req = sample_request();
        req.cores = 16;
        let (env, _) = build_env(&req, &sample_host()).expect("env");
        assert!(env.contains(&(b"NIX_BUILD_CORES".to_vec(), b"16".to_vec())));
        req.cores = 0;
        assert_eq!(build_env(&req, &sample_host()), Err(PlanError::NoCores));
    }

    #[test]
    fn pass_as_file_moves_the_attribute_into_a_file() {
        let mut req = sample_request();
        req.env
            .insert(b"passAsFile".to_vec(), b" text\tother ".to_vec());
        req.env.insert(b"text".to_vec(), b"hello\n".to_vec());
        let (env, files) = build_env(&req, &sample_host()).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        // nix32(sha256("text")), computed independently of nixbuild-core.
        let name = ".attr-1lf969yddshzhld7sr1vbagr07bnygg99lgl6gk5kxcnp4z9wbcq";
        assert_eq!(pass_as_file_name(b"text"), name);
        assert_eq!(
            files,
            [BuildDirFile {
                name: name.into(),
                contents: b"hello\n".to_vec()
            }]
        );
        assert!(!env.contains_key(&b"text"[..]));
        assert_eq!(env[&b"textPath"[..]], format!("/build/{name}").into_bytes());
        // The list itself stays, and a listed name that is not an attribute does nothing.
        assert_eq!(env[&b"passAsFile"[..]], b" text\tother ".to_vec());
        assert!(!env.contains_key(&b"otherPath"[..]));
    }

    #[test]
    fn fixed_output_gets_output_checked_and_impure_vars() {
        let mut req = sample_request();
        req.fixed_output = true;
        req.env
            .insert(b"impureEnvVars".to_vec(), b"http_proxy NIX_SSL".to_vec());
        let mut host = sample_host();
        host.impure_env
            .insert(b"http_proxy".to_vec(), b"http://p:3128".to_vec());
        host.impure_env.insert(b"UNLISTED".to_vec(), b"x".to_vec());
        let (env, _) = build_env(&req, &host).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env[&b"NIX_OUTPUT_CHECKED"[..]], b"1");
        assert_eq!(env[&b"http_proxy"[..]], b"http://p:3128");
        assert_eq!(env[&b"NIX_SSL"[..]], b"");
        assert!(!env.contains_key(&b"UNLISTED"[..]));
    }

    #[test]
    fn sandboxed_build_ignores_impure_env_vars() {
        let mut req = sample_request();
        req.env
            .insert(b"impureEnvVars".to_vec(), b"http_proxy".to_vec());
        let mut host = sample_host();
        host.impure_env
            .insert(b"http_proxy".to_vec(), b"http://p:3128".to_vec());
        let (env, _) = build_env(&req, &host).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert!(!env.contains_key(&b"http_proxy"[..]));
        assert!(!env.contains_key(&b"NIX_OUTPUT_CHECKED"[..]));
    }

    #[test]
    fn unsupported_features_are_refused_not_ignored() {
        let mut req = sample_request();
        req.env.insert(b"__json".to_vec(), b"{}".to_vec());
        assert_eq!(
            build_env(&req, &sample_host()),
            Err(PlanError::StructuredAttrsUnsupported)
        );
        let mut req = sample_request();
        req.env.insert(
            b"exportReferencesGraph".to_vec(),
            b"g /nix/store/x".to_vec(),
        );
        assert_eq!(
            build_env(&req, &sample_host()),
            Err(PlanError::ExportReferencesGraphUnsupported)
        );
        let mut req = sample_request();
        req.env.insert(b"a".to_vec(), b"x\0y".to_vec());
        assert!(matches!(
            build_env(&req, &sample_host()),
            Err(PlanError::NulByte { .. })
        ));
    }
}
