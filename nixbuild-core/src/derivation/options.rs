//! What a derivation asks of its build besides its builder, arguments and environment, read
//! from its environment or, with structured attributes, from `__json` (Nix's
//! `DerivationOptions`): reference checks per output, discarded references, `passAsFile`,
//! `exportReferencesGraph`, `impureEnvVars` and `requiredSystemFeatures`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use super::structured::{StructuredAttrs, StructuredAttrsError};
use crate::content_address::ContentAddress;
use crate::hash::Hash;
use crate::store_path::{StorePath, STORE_DIR};

/// Why a derivation's options are unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// The structured attributes are not a JSON object, or an attribute has the wrong type.
    #[error(transparent)]
    Structured(#[from] StructuredAttrsError),
    /// `exportReferencesGraph` (in the environment) is not a list of name/path pairs.
    #[error("odd number of tokens in 'exportReferencesGraph': '{0}'")]
    GraphOddTokens(String),
    /// An `exportReferencesGraph` file name that is not `[A-Za-z_][A-Za-z0-9_.-]*`.
    #[error("invalid file name '{0}' in 'exportReferencesGraph'")]
    GraphFileName(String),
    /// An `exportReferencesGraph` path outside the store.
    #[error("'exportReferencesGraph' contains a non-store path '{0}'")]
    GraphPath(String),
}

/// One element of a reference check: a store path, or the name of one of the derivation's
/// outputs (standing for that output's path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefSpec {
    /// A store path.
    Path(StorePath),
    /// Anything else: an output name, or an illegal specifier (refused when applied).
    Name(String),
}

impl RefSpec {
    /// An absolute store path is a path; anything else is a name.
    fn parse(s: &[u8]) -> RefSpec {
        match StorePath::from_absolute_path(s) {
            Ok(path) => RefSpec::Path(path),
            Err(_) => RefSpec::Name(String::from_utf8_lossy(s).into_owned()),
        }
    }
}

/// The checks on one output. A `None` list is no check; `Some(vec![])` is a check too (for
/// example `allowedReferences = []`: no references at all).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputChecks {
    /// `maxSize`: the largest NAR the output may have.
    pub max_size: Option<u64>,
    /// `maxClosureSize`: the largest total NAR size of the output's closure.
    pub max_closure_size: Option<u64>,
    /// `allowedReferences`: every direct reference must be listed.
    pub allowed_references: Option<Vec<RefSpec>>,
    /// `allowedRequisites`: every path of the closure must be listed.
    pub allowed_requisites: Option<Vec<RefSpec>>,
    /// `disallowedReferences`: no direct reference may be listed.
    pub disallowed_references: Vec<RefSpec>,
    /// `disallowedRequisites`: no path of the closure may be listed.
    pub disallowed_requisites: Vec<RefSpec>,
    /// Whether the output itself is left out of its closure for the requisite checks (the
    /// environment form; structured attributes count it).
    pub ignore_self_refs: bool,
}

impl OutputChecks {
    /// Whether any check is asked for.
    pub fn is_empty(&self) -> bool {
        self.max_size.is_none()
            && self.max_closure_size.is_none()
            && self.allowed_references.is_none()
            && self.allowed_requisites.is_none()
            && self.disallowed_references.is_empty()
            && self.disallowed_requisites.is_empty()
    }
}

/// The checks of all outputs: one set for every output (environment form), or a set per
/// output name (`outputChecks` of structured attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputChecksSpec {
    /// The same checks on every output.
    Uniform(OutputChecks),
    /// Checks by output name; outputs not named have none.
    PerOutput(BTreeMap<String, OutputChecks>),
}

impl Default for OutputChecksSpec {
    fn default() -> Self {
        OutputChecksSpec::Uniform(OutputChecks::default())
    }
}

impl OutputChecksSpec {
    /// The checks on output `name`, if any.
    pub fn for_output(&self, name: &str) -> Option<&OutputChecks> {
        match self {
            OutputChecksSpec::Uniform(c) => Some(c),
            OutputChecksSpec::PerOutput(m) => m.get(name),
        }
        .filter(|c| !c.is_empty())
    }
}

/// A derivation's options.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DerivationOptions {
    /// The structured attributes, if the derivation has them.
    pub structured: Option<StructuredAttrs>,
    /// The reference and size checks on the outputs.
    pub output_checks: OutputChecksSpec,
    /// `unsafeDiscardReferences`: outputs registered without references (structured only).
    pub unsafe_discard_references: BTreeMap<String, bool>,
    /// `passAsFile`: environment variables passed as files instead (environment form only).
    pub pass_as_file: BTreeSet<Vec<u8>>,
    /// `exportReferencesGraph`: a name → the store paths whose closure the builder gets under
    /// that name (a file in the build directory, or a key of `.attrs.json`).
    pub export_references_graph: BTreeMap<String, BTreeSet<StorePath>>,
    /// `impureEnvVars`: what a fixed-output build gets from the server's impure environment.
    pub impure_env_vars: BTreeSet<Vec<u8>>,
    /// `requiredSystemFeatures`.
    pub required_system_features: BTreeSet<String>,
}

/// Splits like Nix's `tokenizeString` with its default separators (space, tab, newline, CR).
pub fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .filter(|t| !t.is_empty())
}

/// The store path of `s`, which may name a file inside it (`/nix/store/<h>-<n>/bin/x`).
fn store_path_prefix(s: &[u8]) -> Option<StorePath> {
    let rest = s.strip_prefix(STORE_DIR.as_bytes())?.strip_prefix(b"/")?;
    let base = rest.split(|b| *b == b'/').next()?;
    StorePath::from_base_name(base).ok()
}

impl DerivationOptions {
    /// Reads the options of a derivation with environment `env`.
    pub fn from_env(env: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<DerivationOptions, OptionsError> {
        match StructuredAttrs::from_env(env)? {
            Some(s) => Self::from_structured(s),
            None => Self::from_plain_env(env),
        }
    }

    fn from_plain_env(env: &BTreeMap<Vec<u8>, Vec<u8>>) -> Result<DerivationOptions, OptionsError> {
        let set = |key: &str| -> Option<Vec<&[u8]>> {
            env.get(key.as_bytes()).map(|v| tokens(v).collect())
        };
        let refs =
            |key: &str| set(key).map(|l| l.into_iter().map(RefSpec::parse).collect::<Vec<_>>());
        let mut graphs = BTreeMap::new();
        if let Some(value) = env.get(&b"exportReferencesGraph"[..]) {
            let list: Vec<&[u8]> = tokens(value).collect();
            if list.len() % 2 != 0 {
                return Err(OptionsError::GraphOddTokens(lossy(value)));
            }
            for pair in list.chunks(2) {
                let name = lossy(pair[0]);
                if !is_graph_file_name(&name) {
                    return Err(OptionsError::GraphFileName(name));
                }
                let path = store_path_prefix(pair[1])
                    .ok_or_else(|| OptionsError::GraphPath(lossy(pair[1])))?;
                graphs.insert(name, BTreeSet::from([path]));
            }
        }
        Ok(DerivationOptions {
            structured: None,
            output_checks: OutputChecksSpec::Uniform(OutputChecks {
                max_size: None,
                max_closure_size: None,
                allowed_references: refs("allowedReferences"),
                allowed_requisites: refs("allowedRequisites"),
                disallowed_references: refs("disallowedReferences").unwrap_or_default(),
                disallowed_requisites: refs("disallowedRequisites").unwrap_or_default(),
                ignore_self_refs: true,
            }),
            unsafe_discard_references: BTreeMap::new(),
            pass_as_file: set("passAsFile")
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
            export_references_graph: graphs,
            impure_env_vars: set("impureEnvVars")
                .unwrap_or_default()
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect(),
            required_system_features: set("requiredSystemFeatures")
                .unwrap_or_default()
                .into_iter()
                .map(lossy)
                .collect(),
        })
    }

    fn from_structured(s: StructuredAttrs) -> Result<DerivationOptions, OptionsError> {
        let mut per_output = BTreeMap::new();
        if let Some(checks) = s.get("outputChecks") {
            let attr = "outputChecks";
            for (output, c) in as_object(checks, attr)? {
                let attr = |name: &str| format!("outputChecks.\"{output}\".{name}");
                let c = as_object(c, &attr(""))?;
                let list = |name: &str| -> Result<Option<Vec<RefSpec>>, OptionsError> {
                    c.get(name)
                        .map(|v| {
                            Ok(string_list(v, &attr(name))?
                                .into_iter()
                                .map(|s| RefSpec::parse(s.as_bytes()))
                                .collect())
                        })
                        .transpose()
                };
                let size = |name: &str| -> Result<Option<u64>, OptionsError> {
                    c.get(name)
                        .map(|v| v.as_u64().ok_or_else(|| type_error(&attr(name), "a size")))
                        .transpose()
                };
                per_output.insert(
                    output.clone(),
                    OutputChecks {
                        max_size: size("maxSize")?,
                        max_closure_size: size("maxClosureSize")?,
                        allowed_references: list("allowedReferences")?,
                        allowed_requisites: list("allowedRequisites")?,
                        disallowed_references: list("disallowedReferences")?.unwrap_or_default(),
                        disallowed_requisites: list("disallowedRequisites")?.unwrap_or_default(),
                        ignore_self_refs: false,
                    },
                );
            }
        }
        let mut discard = BTreeMap::new();
        if let Some(udr) = s.get("unsafeDiscardReferences") {
            for (output, v) in as_object(udr, "unsafeDiscardReferences")? {
                let b = v
                    .as_bool()
                    .ok_or_else(|| type_error("unsafeDiscardReferences", "a map to Booleans"))?;
                discard.insert(output.clone(), b);
            }
        }
        let mut graphs = BTreeMap::new();
        // Nix ignores (with a warning) an exportReferencesGraph that is not an object.
        if let Some(Value::Object(e)) = s.get("exportReferencesGraph") {
            for (key, value) in e {
                let mut paths = Vec::new();
                flatten(value, &mut paths)?;
                let paths = paths
                    .into_iter()
                    .map(|p| {
                        store_path_prefix(p.as_bytes())
                            .ok_or_else(|| OptionsError::GraphPath(p.to_owned()))
                    })
                    .collect::<Result<BTreeSet<_>, _>>()?;
                graphs.insert(key.clone(), paths);
            }
        }
        let strings = |name: &str| -> Result<Vec<String>, OptionsError> {
            s.get(name)
                .map(|v| {
                    Ok(string_list(v, name)?
                        .into_iter()
                        .map(str::to_owned)
                        .collect())
                })
                .unwrap_or(Ok(Vec::new()))
        };
        Ok(DerivationOptions {
            output_checks: OutputChecksSpec::PerOutput(per_output),
            unsafe_discard_references: discard,
            pass_as_file: BTreeSet::new(),
            export_references_graph: graphs,
            impure_env_vars: strings("impureEnvVars")?
                .into_iter()
                .map(String::into_bytes)
                .collect(),
            required_system_features: strings("requiredSystemFeatures")?.into_iter().collect(),
            structured: Some(s),
        })
    }

    /// Whether the references of output `name` are to be discarded.
    pub fn discards_references(&self, name: &str) -> bool {
        self.unsafe_discard_references
            .get(name)
            .copied()
            .unwrap_or(false)
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn type_error(attr: &str, expected: &'static str) -> OptionsError {
    OptionsError::Structured(StructuredAttrsError::Type {
        attr: attr.to_owned(),
        expected,
    })
}

fn as_object<'a>(
    v: &'a Value,
    attr: &str,
) -> Result<&'a serde_json::Map<String, Value>, OptionsError> {
    v.as_object().ok_or_else(|| type_error(attr, "an object"))
}

fn string_list<'a>(v: &'a Value, attr: &str) -> Result<Vec<&'a str>, OptionsError> {
    v.as_array()
        .and_then(|a| a.iter().map(Value::as_str).collect::<Option<Vec<_>>>())
        .ok_or_else(|| type_error(attr, "a list of strings"))
}

/// The strings of a string or (nested) list of strings.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a str>) -> Result<(), OptionsError> {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(items) => {
            for item in items {
                flatten(item, out)?;
            }
        }
        _ => {
            return Err(type_error(
                "exportReferencesGraph",
                "an object of strings or lists of strings",
            ))
        }
    }
    Ok(())
}

/// `[A-Za-z_][A-Za-z0-9_.-]*`: a file name the environment form of exportReferencesGraph may
/// write into the build directory.
fn is_graph_file_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// One path of an exported references graph, with what the builder is told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPath {
    /// The path.
    pub path: StorePath,
    /// Its NAR hash.
    pub nar_hash: Hash,
    /// Its NAR size.
    pub nar_size: u64,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Its content address, if it has one.
    pub ca: Option<ContentAddress>,
    /// The total NAR size of its closure.
    pub closure_size: u64,
}

/// What is known of a path before the closure sizes: NAR size, references, and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphPathInfo {
    /// Its NAR hash.
    pub nar_hash: Hash,
    /// Its NAR size.
    pub nar_size: u64,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Its content address, if it has one.
    pub ca: Option<ContentAddress>,
}

/// The paths of a closure (`infos` must hold every reference of every path) with their
/// closure sizes, in path order.
pub fn graph_paths(infos: &BTreeMap<StorePath, GraphPathInfo>) -> Vec<GraphPath> {
    infos
        .iter()
        .map(|(path, info)| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![path];
            let mut size = 0u64;
            while let Some(p) = todo.pop() {
                if !seen.insert(p) {
                    continue;
                }
                if let Some(i) = infos.get(p) {
                    size = size.saturating_add(i.nar_size);
                    todo.extend(&i.references);
                }
            }
            GraphPath {
                path: path.clone(),
                nar_hash: info.nar_hash,
                nar_size: info.nar_size,
                references: info.references.clone(),
                ca: info.ca,
                closure_size: size,
            }
        })
        .collect()
}

/// The graph as `nix-store --register-validity` reads it, without hashes or derivers (what
/// the environment form writes into the build directory).
pub fn validity_registration(graph: &[GraphPath]) -> Vec<u8> {
    let mut s = String::new();
    for p in graph {
        s.push_str(&format!("{}\n\n{}\n", p.path, p.references.len()));
        for r in &p.references {
            s.push_str(&format!("{r}\n"));
        }
    }
    s.into_bytes()
}

/// The graph as the structured form puts it into `.attrs.json`.
pub fn graph_json(graph: &[GraphPath]) -> Value {
    Value::Array(
        graph
            .iter()
            .map(|p| {
                let mut o = json!({
                    "closureSize": p.closure_size,
                    "narHash": p.nar_hash.to_string(),
                    "narSize": p.nar_size,
                    "path": p.path.to_absolute(),
                    "references": p.references.iter().map(StorePath::to_absolute).collect::<Vec<_>>(),
                    "valid": true,
                });
                if let (Some(ca), Some(o)) = (&p.ca, o.as_object_mut()) {
                    o.insert("ca".into(), Value::String(ca.to_string()));
                }
                o
            })
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    }

    const P1: &str = "/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-a";
    const P2: &str = "/nix/store/ffffffffffffffffffffffffffffffff-b";

    fn sp(s: &str) -> StorePath {
        StorePath::from_absolute_path(s.as_bytes()).unwrap()
    }

    #[test]
    fn environment_form() {
        let o = DerivationOptions::from_env(&env(&[
            ("allowedReferences", &format!("out {P1}")),
            ("disallowedRequisites", P2),
            ("passAsFile", " a\tb "),
            ("impureEnvVars", "http_proxy FOO"),
            ("requiredSystemFeatures", "kvm big-parallel"),
            ("exportReferencesGraph", &format!("g1 {P1}/bin/x g2 {P2}")),
        ]))
        .unwrap();
        let c = o.output_checks.for_output("anything").unwrap();
        assert_eq!(
            c.allowed_references,
            Some(vec![RefSpec::Name("out".into()), RefSpec::Path(sp(P1))])
        );
        assert_eq!(c.disallowed_requisites, vec![RefSpec::Path(sp(P2))]);
        assert!(c.ignore_self_refs);
        assert_eq!(
            o.pass_as_file,
            BTreeSet::from([b"a".to_vec(), b"b".to_vec()])
        );
        assert_eq!(o.required_system_features.len(), 2);
        assert_eq!(o.export_references_graph["g1"], BTreeSet::from([sp(P1)]));
        assert_eq!(o.export_references_graph["g2"], BTreeSet::from([sp(P2)]));
    }

    #[test]
    fn environment_form_refusals() {
        let e = |v: &str| DerivationOptions::from_env(&env(&[("exportReferencesGraph", v)]));
        assert_eq!(
            e("a").unwrap_err().to_string(),
            "odd number of tokens in 'exportReferencesGraph': 'a'"
        );
        assert_eq!(
            e(&format!(".x {P1}")).unwrap_err(),
            OptionsError::GraphFileName(".x".into())
        );
        assert_eq!(
            e(&format!("../x {P1}")).unwrap_err(),
            OptionsError::GraphFileName("../x".into())
        );
        assert_eq!(
            e("x /etc/passwd").unwrap_err(),
            OptionsError::GraphPath("/etc/passwd".into())
        );
    }

    #[test]
    fn structured_form() {
        let j = format!(
            r#"{{"outputChecks":{{"out":{{"maxSize":10,"allowedRequisites":["out","{P1}"]}},"dev":{{}}}},
            "unsafeDiscardReferences":{{"out":true}},
            "exportReferencesGraph":{{"closure":["{P1}",["{P2}"]],"weird key":"{P2}"}},
            "impureEnvVars":["A"],"requiredSystemFeatures":["kvm"],
            "allowedReferences":[],"passAsFile":["x"]}}"#
        );
        let o = DerivationOptions::from_env(&env(&[("__json", &j), ("passAsFile", "x")])).unwrap();
        let c = o.output_checks.for_output("out").unwrap();
        assert_eq!(c.max_size, Some(10));
        assert!(!c.ignore_self_refs);
        assert!(c.allowed_references.is_none(), "top-level lists do nothing");
        assert!(o.output_checks.for_output("dev").is_none());
        assert!(o.output_checks.for_output("lib").is_none());
        assert!(o.discards_references("out"));
        assert!(!o.discards_references("dev"));
        assert!(o.pass_as_file.is_empty());
        assert_eq!(
            o.export_references_graph["closure"],
            BTreeSet::from([sp(P1), sp(P2)])
        );
        assert!(o.export_references_graph.contains_key("weird key"));
        assert_eq!(o.impure_env_vars, BTreeSet::from([b"A".to_vec()]));
        assert!(o.required_system_features.contains("kvm"));
    }

    #[test]
    fn structured_type_errors_name_the_attribute() {
        for (j, attr) in [
            (r#"{"outputChecks":{"out":{"maxSize":"big"}}}"#, "maxSize"),
            (
                r#"{"outputChecks":{"out":{"allowedReferences":"x"}}}"#,
                "allowedReferences",
            ),
            (
                r#"{"unsafeDiscardReferences":{"out":1}}"#,
                "unsafeDiscardReferences",
            ),
            (
                r#"{"requiredSystemFeatures":"kvm"}"#,
                "requiredSystemFeatures",
            ),
            (
                r#"{"exportReferencesGraph":{"g":1}}"#,
                "exportReferencesGraph",
            ),
        ] {
            let e = DerivationOptions::from_env(&env(&[("__json", j)])).unwrap_err();
            assert!(e.to_string().contains(attr), "{e}");
        }
    }

    fn info(size: u64, refs: &[&str]) -> GraphPathInfo {
        GraphPathInfo {
            nar_hash: Hash::compute(crate::hash::HashAlgo::Sha256, b""),
            nar_size: size,
            references: refs.iter().map(|r| sp(r)).collect(),
            ca: None,
        }
    }

    #[test]
    fn graph_closure_sizes_and_formats() {
        let infos = BTreeMap::from([(sp(P1), info(100, &[P1, P2])), (sp(P2), info(7, &[]))]);
        let g = graph_paths(&infos);
        assert_eq!(g[0].closure_size, 107);
        assert_eq!(g[1].closure_size, 7);
        assert_eq!(
            String::from_utf8(validity_registration(&g)).unwrap(),
            format!("{P1}\n\n2\n{P1}\n{P2}\n{P2}\n\n0\n")
        );
        let j = crate::derivation::structured::to_json(
            &[("g".to_owned(), graph_json(&g[1..]))]
                .into_iter()
                .collect(),
        );
        assert_eq!(
            String::from_utf8(j).unwrap(),
            format!(
                "{{\"g\":[{{\"closureSize\":7,\"narHash\":\"sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73\",\
                 \"narSize\":7,\"path\":\"{P2}\",\"references\":[],\"valid\":true}}]}}"
            )
        );
    }
}
