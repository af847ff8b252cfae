//! The builder's environment (docs/sandbox.md C.8, C.9).
//!
//! Nix fills a sorted map in a fixed order of writes, later writes winning, and passes it to
//! `execve` in key order. [`build_env`] does the same, so the result is both "in Nix's order"
//! (precedence) and byte-identical in layout (sorted by name).

use std::collections::BTreeMap;

use nixbuild_core::derivation::hash_placeholder;
use nixbuild_core::derivation::options::{graph_json, validity_registration, DerivationOptions};
use nixbuild_core::derivation::structured;
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

/// Output placeholders and the paths they stand for: Nix rewrites every placeholder of an
/// output (`builtins.placeholder "out"`) to the output's path in the builder's arguments, its
/// environment and the files it writes for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrites(Vec<(Vec<u8>, Vec<u8>)>);

impl Rewrites {
    /// The rewrites of the request's outputs.
    pub fn of(req: &BuildRequest) -> Rewrites {
        Rewrites(
            req.outputs
                .iter()
                .map(|(name, path)| {
                    (
                        hash_placeholder(name).into_bytes(),
                        path.clone().into_bytes(),
                    )
                })
                .collect(),
        )
    }

    /// `s` with every placeholder replaced by its path.
    pub fn apply(&self, s: &[u8]) -> Vec<u8> {
        let mut out = s.to_vec();
        for (from, to) in &self.0 {
            if memchr::memmem::find(&out, from).is_none() {
                continue;
            }
            let mut next = Vec::with_capacity(out.len());
            let mut rest = &out[..];
            while let Some(i) = memchr::memmem::find(rest, from) {
                next.extend_from_slice(&rest[..i]);
                next.extend_from_slice(to);
                rest = &rest[i + from.len()..];
            }
            next.extend_from_slice(rest);
            out = next;
        }
        out
    }
}

/// The builder's environment, sorted by name, and the files to write into the build directory
/// (docs/sandbox.md C.8–C.10): without structured attributes the derivation's environment,
/// `passAsFile` attributes as files and each `exportReferencesGraph` closure as a file; with
/// them, only `.attrs.json` and `.attrs.sh` and the variables naming them.
pub fn build_env(
    req: &BuildRequest,
    host: &HostSetup,
) -> Result<(EnvVars, Vec<BuildDirFile>), PlanError> {
    for (k, v) in &req.env {
        check_nul("environment name", k)?;
        check_nul("environment value", v)?;
    }
    if req.cores == 0 {
        return Err(PlanError::NoCores);
    }
    let options = DerivationOptions::from_env(&req.env)?;
    let graph = |name: &String| {
        req.graphs
            .get(name)
            .ok_or_else(|| PlanError::GraphMissing(name.clone()))
    };
    let rewrites = Rewrites::of(req);

    let mut env: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut set = |k: &[u8], v: &[u8]| {
        env.insert(k.to_vec(), v.to_vec());
    };
    let mut files = Vec::new();
    let mut file = |name: String, contents: &[u8]| {
        let var = format!("{SANDBOX_BUILD_DIR}/{name}");
        files.push(BuildDirFile {
            name,
            contents: rewrites.apply(contents),
        });
        var
    };

    // 1. Defaults the derivation may override.
    set(b"PATH", PATH.as_bytes());
    set(b"HOME", HOME.as_bytes());
    set(b"NIX_STORE", STORE_DIR.as_bytes());
    set(b"NIX_BUILD_CORES", req.cores.to_string().as_bytes());

    // 2. The derivation's attributes.
    if let Some(structured) = &options.structured {
        let mut graphs = BTreeMap::new();
        for name in options.export_references_graph.keys() {
            graphs.insert(name.clone(), graph_json(graph(name)?));
        }
        let json = structured.prepare(req.outputs.keys().map(String::as_str), &graphs);
        let sh = file(".attrs.sh".into(), &structured::to_shell(&json));
        set(b"NIX_ATTRS_SH_FILE", sh.as_bytes());
        let js = file(".attrs.json".into(), &structured::to_json(&json));
        set(b"NIX_ATTRS_JSON_FILE", js.as_bytes());
    } else {
        for (k, v) in &req.env {
            if options.pass_as_file.contains(k.as_slice()) {
                let mut var = k.clone();
                var.extend_from_slice(b"Path");
                let path = file(pass_as_file_name(k), v);
                set(&var, path.as_bytes());
            } else {
                set(k, v);
            }
        }
        for name in options.export_references_graph.keys() {
            file(name.clone(), &validity_registration(graph(name)?));
        }
    }

    // 3. The build directory, which the derivation cannot override.
    for k in ["NIX_BUILD_TOP", "TMPDIR", "TEMPDIR", "TMP", "TEMP", "PWD"] {
        set(k.as_bytes(), SANDBOX_BUILD_DIR.as_bytes());
    }

    if req.fixed_output {
        // 4. and 5.
        set(b"NIX_OUTPUT_CHECKED", b"1");
        for name in &options.impure_env_vars {
            check_nul("environment name", name)?;
            let value = host.impure_env.get(name).map_or(&[][..], Vec::as_slice);
            check_nul("environment value", value)?;
            set(name, value);
        }
    }

    // 6.
    set(b"NIX_LOG_FD", b"2");
    set(b"TERM", TERM.as_bytes());

    // Rewriting can only lengthen a name that holds a placeholder; collect again to keep the
    // order.
    let env: BTreeMap<Vec<u8>, Vec<u8>> = env
        .into_iter()
        .map(|(k, v)| (rewrites.apply(&k), rewrites.apply(&v)))
        .collect();
    Ok((env.into_iter().collect(), files))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::tests::{sample_host, sample_request};
    use nixbuild_core::derivation::options::GraphPath;
    use nixbuild_core::store_path::StorePath;

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
    fn malformed_options_and_nul_bytes_are_refused() {
        let mut req = sample_request();
        req.env.insert(b"__json".to_vec(), b"[]".to_vec());
        assert!(matches!(
            build_env(&req, &sample_host()),
            Err(PlanError::Options(_))
        ));
        let mut req = sample_request();
        req.env
            .insert(b"exportReferencesGraph".to_vec(), b"g /etc".to_vec());
        assert!(matches!(
            build_env(&req, &sample_host()),
            Err(PlanError::Options(_))
        ));
        let mut req = sample_request();
        req.env.insert(
            b"exportReferencesGraph".to_vec(),
            b"g /nix/store/7fgb0vvbd7ymwx8rwmgc5vhw1yfw3yhm-env-dump".to_vec(),
        );
        assert_eq!(
            build_env(&req, &sample_host()),
            Err(PlanError::GraphMissing("g".into()))
        );
        let mut req = sample_request();
        req.env.insert(b"a".to_vec(), b"x\0y".to_vec());
        assert!(matches!(
            build_env(&req, &sample_host()),
            Err(PlanError::NulByte { .. })
        ));
    }

    #[test]
    fn placeholders_become_output_paths_everywhere() {
        let mut req = sample_request();
        let out = req.outputs["out"].clone();
        let ph = hash_placeholder("out");
        req.env.insert(
            b"flags".to_vec(),
            format!("--prefix={ph} {ph}/lib").into_bytes(),
        );
        req.env.insert(b"passAsFile".to_vec(), b"text".to_vec());
        req.env
            .insert(b"text".to_vec(), format!("{ph}\n").into_bytes());
        let (env, files) = build_env(&req, &sample_host()).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(
            env[&b"flags"[..]],
            format!("--prefix={out} {out}/lib").into_bytes()
        );
        assert_eq!(files[0].contents, format!("{out}\n").into_bytes());
        // Another output's placeholder is not this one's.
        assert_eq!(
            Rewrites::of(&req).apply(hash_placeholder("dev").as_bytes()),
            hash_placeholder("dev").into_bytes()
        );
    }

    #[test]
    fn structured_attributes_become_two_files_and_nothing_else() {
        let mut req = sample_request();
        let out = req.outputs["out"].clone();
        req.env = BTreeMap::from([
            (
                b"__json".to_vec(),
                br#"{"name":"x","env":{"FOO":"bar"},"impureEnvVars":["P"],"list":["a b",1]}"#
                    .to_vec(),
            ),
            (b"out".to_vec(), out.clone().into_bytes()),
        ]);
        req.fixed_output = true;
        let mut host = sample_host();
        host.impure_env.insert(b"P".to_vec(), b"v".to_vec());
        let (env, files) = build_env(&req, &host).expect("env");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        let names: Vec<&[u8]> = env.keys().map(Vec::as_slice).collect();
        assert_eq!(
            names,
            [
                &b"HOME"[..],
                b"NIX_ATTRS_JSON_FILE",
                b"NIX_ATTRS_SH_FILE",
                b"NIX_BUILD_CORES",
                b"NIX_BUILD_TOP",
                b"NIX_LOG_FD",
                b"NIX_OUTPUT_CHECKED",
                b"NIX_STORE",
                b"P",
                b"PATH",
                b"PWD",
                b"TEMP",
                b"TEMPDIR",
                b"TERM",
                b"TMP",
                b"TMPDIR",
            ]
        );
        assert_eq!(env[&b"NIX_ATTRS_JSON_FILE"[..]], b"/build/.attrs.json");
        assert_eq!(files[0].name, ".attrs.sh");
        assert_eq!(
            String::from_utf8(files[0].contents.clone()).unwrap(),
            format!(
                "declare -A env=(['FOO']='bar' )\ndeclare -a impureEnvVars=('P' )\n\
                 declare -a list=('a b' 1 )\ndeclare name='x'\n\
                 declare -A outputs=(['out']='{out}' )\n"
            )
        );
        assert_eq!(files[1].name, ".attrs.json");
        assert_eq!(
            String::from_utf8(files[1].contents.clone()).unwrap(),
            format!(
                r#"{{"env":{{"FOO":"bar"}},"impureEnvVars":["P"],"list":["a b",1],"name":"x","outputs":{{"out":"{out}"}}}}"#
            )
        );
    }

    fn graph_entry(path: &str, refs: &[&str]) -> GraphPath {
        let sp = |s: &str| StorePath::from_absolute_path(s.as_bytes()).expect("path");
        GraphPath {
            path: sp(path),
            nar_hash: Hash::compute(HashAlgo::Sha256, path.as_bytes()),
            nar_size: 120,
            references: refs.iter().map(|r| sp(r)).collect(),
            ca: None,
            closure_size: 120,
        }
    }

    #[test]
    fn export_references_graph_in_both_forms() {
        let dep = "/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1";
        let graph = vec![graph_entry(dep, &[dep])];
        let mut req = sample_request();
        req.env.insert(
            b"exportReferencesGraph".to_vec(),
            format!("closure {dep}").into_bytes(),
        );
        req.graphs.insert("closure".into(), graph.clone());
        let (env, files) = build_env(&req, &sample_host()).expect("env");
        assert_eq!(files[0].name, "closure");
        assert_eq!(
            files[0].contents,
            format!("{dep}\n\n1\n{dep}\n").into_bytes()
        );
        // The variable itself stays in the environment, as under Nix.
        assert!(env.iter().any(|(k, _)| k == b"exportReferencesGraph"));

        let mut req = sample_request();
        req.env = BTreeMap::from([(
            b"__json".to_vec(),
            format!(r#"{{"exportReferencesGraph":{{"g":["{dep}"]}}}}"#).into_bytes(),
        )]);
        req.graphs.insert("g".into(), graph);
        let (_, files) = build_env(&req, &sample_host()).expect("env");
        let json = String::from_utf8(files[1].contents.clone()).unwrap();
        assert!(
            json.starts_with(&format!(
                r#"{{"exportReferencesGraph":{{"g":["{dep}"]}},"g":[{{"closureSize":120,"#
            )),
            "{json}"
        );
        assert!(json.contains(r#""references":["/nix/store/0c4kxzc8d3gsgz5ahlbxk7n8zylr3kkg-bash-5.1"],"valid":true}]"#), "{json}");
    }
}
