//! The `.drv` walk of a graph build: reads the derivations a client asks to build, and every
//! derivation they need, from the account's own view of the store; verifies their output
//! paths (which needs `hashDerivationModulo` of every input derivation, each computed once);
//! and works out which of them must be built: a derivation is built when an output that a
//! request or a derivation being built needs is not valid for the account. The result is a
//! [`GraphPlan`], whose nodes become [`BuildJob`]s once their inputs are built.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use nixbuild_core::derivation::{
    name_from_drv_path, AtermError, BasicDerivation, Derivation, DerivationError, DerivationOutput,
};
use nixbuild_core::hash::Hash;
use nixbuild_core::serve::BuildOptions;
use nixbuild_core::store_path::StorePath;
use nixbuild_core::worker::{DerivedPath, OutputsSpec};

use super::BuildJob;
use crate::store::{Store, StoreError, MAX_DERIVATION_SIZE};

/// The most derivations one graph build reads: far more than a whole NixOS system's
/// closure (some tens of thousands), and a bound on what one request holds in memory.
pub const MAX_GRAPH_DERIVATIONS: usize = 200_000;

/// The most bytes of `.drv` files one graph build reads.
pub const MAX_GRAPH_DRV_BYTES: u64 = 1 << 30;

/// Why a requested derivation cannot be built: the message of its failure.
#[derive(Debug, thiserror::Error)]
pub enum DrvError {
    /// The path is not a `.drv` path.
    #[error("'{0}' is not a derivation")]
    NotDerivationPath(StorePath),
    /// The `.drv` is not valid for the account.
    #[error(
        "derivation '{0}' is not valid on this server for this account (copy the \
         derivations first, as `nix build --store ssh-ng://…` and `nix copy` do)"
    )]
    NotValid(StorePath),
    /// The object is not a regular file of at most [`MAX_DERIVATION_SIZE`] bytes.
    #[error("'{0}' is not a derivation file")]
    NotDerivationFile(StorePath),
    /// The file does not parse.
    #[error("'{path}' is not a valid derivation: {source}")]
    Parse {
        /// The `.drv`.
        path: StorePath,
        /// The parser's error.
        source: AtermError,
    },
    /// The derivation's name or the hash modulo of one in the graph is wrong.
    #[error("'{path}': {source}")]
    Derivation {
        /// The `.drv`.
        path: StorePath,
        /// What is wrong.
        source: Box<DerivationError>,
    },
    /// The output paths do not follow from the derivation.
    #[error("derivation '{path}' is not valid: {source}")]
    OutputPaths {
        /// The `.drv`.
        path: StorePath,
        /// What is wrong.
        source: Box<DerivationError>,
    },
    /// A derivation lacks an output that is asked for.
    #[error("derivation '{drv}' has no output '{output}'")]
    NoOutput {
        /// The `.drv`.
        drv: StorePath,
        /// The output's name.
        output: String,
    },
    /// An output whose path is only known after a build (a content-addressed derivation):
    /// the build hook's single-derivation builds handle those, graph builds do not.
    #[error(
        "output '{output}' of '{drv}' is content-addressed: its path is only known after the \
         build, and nixbuild builds such derivations only as a remote builder (--builders), \
         not in a graph build through a remote store"
    )]
    ContentAddressed {
        /// The `.drv`.
        drv: StorePath,
        /// The output's name.
        output: String,
    },
    /// The graph is larger than this server reads for one request.
    #[error(
        "the derivation graph of '{0}' has more than {MAX_GRAPH_DERIVATIONS} derivations or \
         {MAX_GRAPH_DRV_BYTES} bytes of them"
    )]
    TooLarge(StorePath),
    /// A derivation needs itself through its inputs (no real store holds such `.drv`
    /// files, whose paths follow from their contents; a client can upload them under made-up
    /// paths).
    #[error("derivation '{0}' depends on itself through its input derivations")]
    Cycle(StorePath),
    /// An input is not valid for the account when its build is about to start.
    #[error(
        "cannot build '{drv}': its input '{input}' is not valid on this server for this \
         account (copy it first)"
    )]
    MissingInput {
        /// The `.drv` to build.
        drv: StorePath,
        /// The first input missing.
        input: StorePath,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The blocking task of the walk panicked.
    #[error("internal error in a build task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// A derivation that must be built.
#[derive(Debug)]
pub(super) struct PlanNode {
    /// Its `.drv`.
    pub drv_path: StorePath,
    /// The derivation, `inputSrcs` holding its sources and the outputs of its input
    /// derivations that it uses (its closure is added when the build is about to start).
    pub drv: BasicDerivation,
}

/// What one request of a graph build comes to.
#[derive(Debug, Clone)]
pub enum Resolved {
    /// A path valid for the account, as it is.
    Valid,
    /// A path that is not valid and will not be (not a derivation, or a derivation that
    /// cannot be built): with why.
    Unknown {
        /// The path the client named (the `.drv` for outputs of a derivation).
        path: StorePath,
        /// Why, for the client.
        message: String,
    },
    /// Outputs of a derivation.
    Outputs {
        /// The `.drv`.
        drv: StorePath,
        /// The node that builds it, or `None` when the outputs asked for are valid.
        node: Option<usize>,
        /// The outputs asked for, by name.
        outputs: BTreeMap<String, StorePath>,
        /// The derivation's masked `hashDerivationModulo`, the key of its realisations.
        drv_hash: Hash,
    },
}

/// What a graph build will do: the derivations to build, in an order where every node's
/// inputs come after it is named (see [`GraphPlan::inputs`]), and what each request comes
/// to.
#[derive(Debug)]
pub struct GraphPlan {
    pub(super) nodes: Vec<PlanNode>,
    /// For each node, the nodes that must be built before it.
    pub(super) inputs: Vec<Vec<usize>>,
    /// Each request, in the order asked.
    pub requests: Vec<Resolved>,
    /// Paths to fetch from the binary caches rather than build or have uploaded: outputs
    /// wanted of derivations whose every missing wanted output a cache has (then they are
    /// not built, nor are their inputs wanted), missing sources of the derivations built,
    /// and missing paths asked for as they are.
    pub substitute: BTreeSet<StorePath>,
    /// Lines for the client about what was fetched while planning.
    pub notes: Vec<String>,
}

impl GraphPlan {
    /// The derivations that will be built (QueryMissing's `willBuild`).
    pub fn will_build(&self) -> impl Iterator<Item = &StorePath> {
        self.nodes.iter().map(|n| &n.drv_path)
    }

    /// The paths to fetch from binary caches (QueryMissing's `willSubstitute`).
    pub fn will_substitute(&self) -> impl Iterator<Item = &StorePath> {
        self.substitute.iter()
    }

    /// The paths asked for that are neither valid nor buildable (QueryMissing's `unknown`).
    pub fn unknown(&self) -> impl Iterator<Item = &StorePath> {
        self.requests.iter().filter_map(|r| match r {
            Resolved::Unknown { path, .. } if !self.substitute.contains(path) => Some(path),
            _ => None,
        })
    }

    /// How many derivations will be built.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether nothing needs building.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// A derivation read and checked.
struct Loaded {
    drv: Derivation,
    /// Its unmasked `hashDerivationModulo`, what its dependents' hashes use.
    modulo: Hash,
}

/// The derivations read so far for one graph build.
struct Walk<'a> {
    store: &'a Store,
    account: &'a str,
    loaded: HashMap<StorePath, Loaded>,
    /// Derivations read whose inputs are not all loaded yet: the current path of the walk.
    visiting: HashSet<StorePath>,
    /// Every derivation, after all of its inputs.
    order: Vec<StorePath>,
    bytes: u64,
}

impl Walk<'_> {
    /// Reads and checks `root` and every derivation it needs that is not read yet.
    fn load(&mut self, root: &StorePath) -> Result<(), DrvError> {
        // What an earlier walk that failed left.
        self.visiting.clear();
        // (path, the derivation once read and its inputs pushed); iterative, as graphs can
        // be thousands deep.
        let mut stack = vec![(root.clone(), None::<Derivation>)];
        while let Some((path, read)) = stack.pop() {
            if self.loaded.contains_key(&path) {
                continue;
            }
            if stack.len() + self.loaded.len() > MAX_GRAPH_DERIVATIONS {
                return Err(DrvError::TooLarge(root.clone()));
            }
            let Some(drv) = read else {
                // Pushed again by a derivation it needs: a cycle.
                if self.visiting.contains(&path) {
                    return Err(DrvError::Cycle(path));
                }
                let drv = self.read(&path, root)?;
                self.visiting.insert(path.clone());
                let inputs: Vec<StorePath> = drv
                    .input_drvs
                    .keys()
                    .filter(|i| !self.loaded.contains_key(*i))
                    .cloned()
                    .collect();
                stack.push((path, Some(drv)));
                stack.extend(inputs.into_iter().map(|i| (i, None)));
                continue;
            };
            self.visiting.remove(&path);
            let resolve = |p: &StorePath| self.loaded.get(p).map(|l| l.modulo);
            let name = name_from_drv_path(&path);
            drv.verify_output_paths(name, resolve)
                .map_err(|source| DrvError::OutputPaths {
                    path: path.clone(),
                    source: Box::new(source),
                })?;
            let modulo =
                drv.hash_modulo(false, resolve)
                    .map_err(|source| DrvError::Derivation {
                        path: path.clone(),
                        source: Box::new(source),
                    })?;
            self.order.push(path.clone());
            self.loaded.insert(path, Loaded { drv, modulo });
        }
        Ok(())
    }

    fn read(&mut self, path: &StorePath, root: &StorePath) -> Result<Derivation, DrvError> {
        if !path.is_derivation() {
            return Err(DrvError::NotDerivationPath(path.clone()));
        }
        let text = match self
            .store
            .read_small_file(self.account, path, MAX_DERIVATION_SIZE)
        {
            Ok(Some(text)) => text,
            Ok(None) => return Err(DrvError::NotDerivationFile(path.clone())),
            Err(StoreError::NotValid { .. }) => return Err(DrvError::NotValid(path.clone())),
            Err(e) => return Err(e.into()),
        };
        self.bytes += text.len() as u64;
        if self.bytes > MAX_GRAPH_DRV_BYTES {
            return Err(DrvError::TooLarge(root.clone()));
        }
        Derivation::from_aterm(&text).map_err(|source| DrvError::Parse {
            path: path.clone(),
            source,
        })
    }

    /// The outputs `spec` names of the loaded `drv`, with their paths.
    fn outputs(
        &self,
        drv: &StorePath,
        spec: &OutputsSpec,
    ) -> Result<BTreeMap<String, StorePath>, DrvError> {
        let outputs = &self.loaded[drv].drv.basic.outputs;
        let names: Vec<&String> = match spec {
            OutputsSpec::All => outputs.keys().collect(),
            OutputsSpec::Names(names) => names.iter().collect(),
        };
        names
            .into_iter()
            .map(|name| {
                let (drv, output) = (drv.clone(), name.clone());
                let path = match outputs.get(name) {
                    None => return Err(DrvError::NoOutput { drv, output }),
                    Some(o) => o.path().ok_or(DrvError::ContentAddressed { drv, output })?,
                };
                Ok((name.clone(), path.clone()))
            })
            .collect()
    }
}

/// Works out the graph build of `requests` for `account`, with no binary cache.
#[cfg(test)]
pub(super) fn plan(
    store: &Store,
    account: &str,
    requests: &[DerivedPath],
) -> Result<GraphPlan, StoreError> {
    plan_with(store, account, requests, &|_| BTreeSet::new())
}

/// Works out the graph build of `requests` for `account`; `substitutable` tells which of
/// some missing paths a binary cache has (asked only about the outputs of derivations that
/// would be built otherwise).
pub(super) fn plan_with(
    store: &Store,
    account: &str,
    requests: &[DerivedPath],
    substitutable: &dyn Fn(&BTreeSet<StorePath>) -> BTreeSet<StorePath>,
) -> Result<GraphPlan, StoreError> {
    let mut walk = Walk {
        store,
        account,
        loaded: HashMap::new(),
        visiting: HashSet::new(),
        order: Vec::new(),
        bytes: 0,
    };
    let opaque: BTreeSet<StorePath> = requests
        .iter()
        .filter_map(|r| match r {
            DerivedPath::Opaque(p) => Some(p.clone()),
            DerivedPath::Built { .. } => None,
        })
        .collect();
    let valid_opaque = store.query_valid_paths(account, &opaque)?;
    let mut substitute = substitutable(&opaque.difference(&valid_opaque).cloned().collect());
    // The outputs each derivation must have: first those the requests name.
    let mut wanted: HashMap<StorePath, BTreeSet<String>> = HashMap::new();
    let mut resolved = Vec::with_capacity(requests.len());
    for request in requests {
        let r = match request {
            DerivedPath::Opaque(p) if valid_opaque.contains(p) => Resolved::Valid,
            DerivedPath::Opaque(p) => Resolved::Unknown {
                path: p.clone(),
                message: format!("path '{p}' is not valid on this server and is not a derivation"),
            },
            DerivedPath::Built { drv, outputs } => {
                match walk
                    .load(drv)
                    .and_then(|()| walk.outputs(drv, outputs))
                    .and_then(|named| Ok((named, drv_hash(&walk, drv)?)))
                {
                    Ok((named, drv_hash)) => {
                        wanted
                            .entry(drv.clone())
                            .or_default()
                            .extend(named.keys().cloned());
                        Resolved::Outputs {
                            drv: drv.clone(),
                            node: None,
                            outputs: named,
                            drv_hash,
                        }
                    }
                    Err(DrvError::Store(e)) => return Err(e),
                    Err(e) => Resolved::Unknown {
                        path: drv.clone(),
                        message: e.to_string(),
                    },
                }
            }
        };
        resolved.push(r);
    }
    // Which outputs of every derivation read are valid, in one query.
    let every_output: BTreeSet<StorePath> = walk
        .loaded
        .values()
        .flat_map(|l| {
            l.drv
                .basic
                .outputs
                .values()
                .filter_map(DerivationOutput::path)
        })
        .cloned()
        .collect();
    let valid = store.query_valid_paths(account, &every_output)?;
    let every_src: BTreeSet<StorePath> = walk
        .loaded
        .values()
        .flat_map(|l| l.drv.basic.input_srcs.iter().cloned())
        .collect();
    let valid_srcs = store.query_valid_paths(account, &every_src)?;
    // Dependents before their inputs: a derivation is built when an output wanted of it is
    // not valid, and then it wants the outputs it uses of its inputs.
    let mut index: HashMap<StorePath, usize> = HashMap::new();
    let mut nodes = Vec::new();
    for path in walk.order.iter().rev() {
        let Some(names) = wanted.get(path) else {
            continue;
        };
        let drv = &walk.loaded[path].drv;
        // The wanted outputs that are not valid; `None` for one whose path only a build
        // decides (a floating content-addressed output), which no cache can be asked for.
        let missing: Vec<Option<&StorePath>> = names
            .iter()
            .map(|n| drv.basic.outputs.get(n).and_then(DerivationOutput::path))
            .filter(|p| p.is_none_or(|p| !valid.contains(p)))
            .collect();
        if missing.is_empty() {
            continue;
        }
        if let Some(paths) = missing
            .iter()
            .copied()
            .collect::<Option<BTreeSet<&StorePath>>>()
        {
            let paths: BTreeSet<StorePath> = paths.into_iter().cloned().collect();
            if substitutable(&paths).len() == paths.len() {
                substitute.extend(paths);
                continue;
            }
        }
        let missing_srcs: BTreeSet<StorePath> = drv
            .basic
            .input_srcs
            .difference(&valid_srcs)
            .cloned()
            .collect();
        if !missing_srcs.is_empty() {
            substitute.extend(substitutable(&missing_srcs));
        }
        let mut input_srcs = drv.basic.input_srcs.clone();
        for (input, outs) in &drv.input_drvs {
            let input_outputs = &walk.loaded[input].drv.basic.outputs;
            for o in outs {
                // A missing output fails the build when it is about to start (the
                // MissingInput check), with the derivation named.
                if let Some(p) = input_outputs.get(o).and_then(DerivationOutput::path) {
                    input_srcs.insert(p.clone());
                }
            }
            wanted
                .entry(input.clone())
                .or_default()
                .extend(outs.iter().cloned());
        }
        index.insert(path.clone(), nodes.len());
        let mut basic = drv.basic.clone();
        basic.input_srcs = input_srcs;
        nodes.push(PlanNode {
            drv_path: path.clone(),
            drv: basic,
        });
    }
    let inputs = nodes
        .iter()
        .map(|n| {
            walk.loaded[&n.drv_path]
                .drv
                .input_drvs
                .keys()
                .filter_map(|i| index.get(i).copied())
                .collect()
        })
        .collect();
    for r in &mut resolved {
        if let Resolved::Outputs { drv, node, .. } = r {
            *node = index.get(drv).copied();
        }
    }
    Ok(GraphPlan {
        nodes,
        inputs,
        requests: resolved,
        substitute,
        notes: Vec::new(),
    })
}

/// The masked `hashDerivationModulo` of the loaded `drv`.
fn drv_hash(walk: &Walk<'_>, drv: &StorePath) -> Result<Hash, DrvError> {
    walk.loaded[drv]
        .drv
        .hash_modulo(true, |p| walk.loaded.get(p).map(|l| l.modulo))
        .map_err(|source| DrvError::Derivation {
            path: drv.clone(),
            source: Box::new(source),
        })
}

/// The job that builds `node` for `account`, its inputs built: every input must be valid
/// for the account, and the job's `inputSrcs` become their closure.
pub(super) fn node_job(
    store: &Store,
    account: &str,
    node: &PlanNode,
    options: BuildOptions,
) -> Result<BuildJob, DrvError> {
    let inputs = &node.drv.input_srcs;
    let valid = store.query_valid_paths(account, inputs)?;
    if let Some(input) = inputs.difference(&valid).next() {
        return Err(DrvError::MissingInput {
            drv: node.drv_path.clone(),
            input: input.clone(),
        });
    }
    let mut drv = node.drv.clone();
    drv.input_srcs = store.query_closure(account, inputs, false)?;
    Ok(BuildJob {
        account: account.to_owned(),
        drv_path: node.drv_path.clone(),
        drv,
        options,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use crate::store::{PathClaim, StoreLimits};
    use nixbuild_core::nar::NarNode;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let limits = StoreLimits {
            max_nar_size: 1 << 20,
            disk_reserve: 0,
        };
        let store = Store::open(dir.path(), limits).unwrap();
        (dir, store)
    }

    /// Registers a file holding `contents` at `path` for `account`.
    fn add(store: &Store, account: &str, path: &StorePath, contents: &[u8]) {
        let nar = NarNode::File {
            executable: false,
            contents: contents.to_vec(),
        }
        .to_nar()
        .unwrap();
        let mut import = store.begin_import(account).unwrap();
        import.write(&nar).unwrap();
        import
            .commit(PathClaim {
                path: path.clone(),
                deriver: None,
                nar_hash: None,
                nar_size: None,
                references: BTreeSet::new(),
                registration_time: 0,
                ca: None,
                sigs: BTreeSet::new(),
            })
            .unwrap();
    }

    /// A derivation `name` with `outputs`, needing `inputs` (`.drv`, outputs used), its
    /// output paths as Nix computes them; uploaded for `account`. Returns its `.drv` and
    /// output paths.
    fn derivation(
        store: &Store,
        account: &str,
        known: &HashMap<StorePath, Hash>,
        name: &str,
        outputs: &[&str],
        inputs: &[(&StorePath, &[&str])],
    ) -> (StorePath, BTreeMap<String, StorePath>, Hash) {
        let placeholder = StorePath::from_absolute_path(
            b"/nix/store/00000000000000000000000000000000-placeholder",
        )
        .unwrap();
        let mut drv = Derivation {
            input_drvs: inputs
                .iter()
                .map(|(d, o)| ((*d).clone(), o.iter().map(|s| (*s).to_owned()).collect()))
                .collect(),
            basic: BasicDerivation {
                outputs: outputs
                    .iter()
                    .map(|o| {
                        (
                            (*o).to_owned(),
                            DerivationOutput::InputAddressed(placeholder.clone()),
                        )
                    })
                    .collect(),
                input_srcs: BTreeSet::new(),
                platform: b"x86_64-linux".to_vec(),
                builder: b"/bin/sh".to_vec(),
                args: vec![],
                env: outputs
                    .iter()
                    .map(|o| (o.as_bytes().to_vec(), Vec::new()))
                    .chain([(b"name".to_vec(), name.as_bytes().to_vec())])
                    .collect(),
            },
        };
        let resolve = |p: &StorePath| known.get(p).copied();
        let paths = drv.compute_output_paths(name, resolve).unwrap();
        for (o, p) in &paths {
            drv.basic
                .outputs
                .insert(o.clone(), DerivationOutput::InputAddressed(p.clone()));
            drv.basic
                .env
                .insert(o.as_bytes().to_vec(), p.to_absolute().into_bytes());
        }
        let modulo = drv.hash_modulo(false, resolve).unwrap();
        let drv_path = drv.drv_path(name).unwrap();
        add(store, account, &drv_path, &drv.to_aterm());
        (drv_path, paths, modulo)
    }

    fn built(drv: &StorePath) -> DerivedPath {
        DerivedPath::Built {
            drv: drv.clone(),
            outputs: OutputsSpec::All,
        }
    }

    fn will_build(plan: &GraphPlan) -> BTreeSet<String> {
        plan.will_build().map(|p| p.name().to_owned()).collect()
    }

    #[test]
    fn a_chain_is_built_from_its_first_missing_link_with_inputs_in_order() {
        let (_dir, store) = store();
        let mut known = HashMap::new();
        let (a, a_out, h) = derivation(&store, "u", &known, "a", &["out"], &[]);
        known.insert(a.clone(), h);
        let (b, _, h) = derivation(&store, "u", &known, "b", &["out"], &[(&a, &["out"])]);
        known.insert(b.clone(), h);
        let (c, _, _) = derivation(&store, "u", &known, "c", &["out"], &[(&b, &["out"])]);
        let plan = plan(&store, "u", &[built(&c)]).unwrap();
        assert_eq!(
            will_build(&plan),
            ["a.drv", "b.drv", "c.drv"].map(String::from).into()
        );
        // Each node's inputs are the nodes of its input derivations.
        let index = |p: &StorePath| plan.nodes.iter().position(|n| &n.drv_path == p).unwrap();
        assert_eq!(plan.inputs[index(&c)], vec![index(&b)]);
        assert_eq!(plan.inputs[index(&b)], vec![index(&a)]);
        assert!(plan.inputs[index(&a)].is_empty());
        // b's job needs a's output.
        assert!(plan.nodes[index(&b)].drv.input_srcs.contains(&a_out["out"]));
        // Once a's output is valid, only b and c are built.
        add(&store, "u", &a_out["out"], b"a");
        let plan = plan_of(&store, &c);
        assert_eq!(
            will_build(&plan),
            ["b.drv", "c.drv"].map(String::from).into()
        );
    }

    fn plan_of(store: &Store, drv: &StorePath) -> GraphPlan {
        plan(store, "u", &[built(drv)]).unwrap()
    }

    #[test]
    fn only_the_outputs_wanted_decide_what_is_built() {
        let (_dir, store) = store();
        let mut known = HashMap::new();
        let (lib, lib_out, h) = derivation(&store, "u", &known, "lib", &["out", "dev"], &[]);
        known.insert(lib.clone(), h);
        let (app, app_out, _) =
            derivation(&store, "u", &known, "app", &["out"], &[(&lib, &["dev"])]);
        // lib's dev is valid, its out is not: app needs only dev.
        add(&store, "u", &lib_out["dev"], b"dev");
        assert_eq!(
            will_build(&plan_of(&store, &app)),
            ["app.drv".to_owned()].into()
        );
        // A request of lib^out builds lib; of lib^dev, nothing.
        let named = |o: &str| DerivedPath::Built {
            drv: lib.clone(),
            outputs: OutputsSpec::Names([o.to_owned()].into()),
        };
        let p = plan(&store, "u", &[named("out")]).unwrap();
        assert_eq!(will_build(&p), ["lib.drv".to_owned()].into());
        let p = plan(&store, "u", &[named("dev")]).unwrap();
        assert!(p.is_empty());
        match &p.requests[0] {
            Resolved::Outputs { node, outputs, .. } => {
                assert_eq!(*node, None);
                assert_eq!(
                    outputs,
                    &BTreeMap::from([("dev".to_owned(), lib_out["dev"].clone())])
                );
            }
            other => panic!("{other:?}"),
        }
        // An output the derivation does not have is the request's failure.
        let p = plan(&store, "u", &[named("doc"), built(&app)]).unwrap();
        assert!(
            matches!(&p.requests[0], Resolved::Unknown { message, .. } if message.contains("no output 'doc'")),
            "{:?}",
            p.requests[0]
        );
        assert!(matches!(
            p.requests[1],
            Resolved::Outputs { node: Some(_), .. }
        ));
        assert!(!app_out.is_empty());
    }

    #[test]
    fn another_accounts_derivations_and_cycles_are_not_built() {
        let (_dir, store) = store();
        let known = HashMap::new();
        let (theirs, _, _) = derivation(&store, "other", &known, "theirs", &["out"], &[]);
        let p = plan(&store, "u", &[built(&theirs)]).unwrap();
        assert!(p.is_empty());
        assert!(
            matches!(&p.requests[0], Resolved::Unknown { message, .. } if message.contains("is not valid on this server for this account")),
            "{:?}",
            p.requests[0]
        );
        assert_eq!(p.unknown().collect::<Vec<_>>(), vec![&theirs]);
        // Two `.drv` files under made-up paths that need each other.
        let x = StorePath::from_absolute_path(b"/nix/store/11111111111111111111111111111111-x.drv")
            .unwrap();
        let y = StorePath::from_absolute_path(b"/nix/store/22222222222222222222222222222222-y.drv")
            .unwrap();
        for (path, input) in [(&x, &y), (&y, &x)] {
            let drv = Derivation {
                input_drvs: [(input.clone(), ["out".to_owned()].into())].into(),
                basic: BasicDerivation {
                    outputs: BTreeMap::new(),
                    input_srcs: BTreeSet::new(),
                    platform: b"x86_64-linux".to_vec(),
                    builder: b"/bin/sh".to_vec(),
                    args: vec![],
                    env: [(b"name".to_vec(), b"x".to_vec())].into(),
                },
            };
            add(&store, "u", path, &drv.to_aterm());
        }
        let p = plan(&store, "u", &[built(&x)]).unwrap();
        assert!(
            matches!(&p.requests[0], Resolved::Unknown { message, .. } if message.contains("depends on itself")),
            "{:?}",
            p.requests[0]
        );
        // The failed walk leaves nothing behind: a good request after it plans as usual.
        let (mine, _, _) = derivation(&store, "u", &known, "mine", &["out"], &[]);
        let p = plan(&store, "u", &[built(&x), built(&mine)]).unwrap();
        assert_eq!(will_build(&p), ["mine.drv".to_owned()].into());
    }
}
