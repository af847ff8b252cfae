//! When two requests may share one build in flight.
//!
//! Sharing is safe only if the shared build produces exactly what each requester's own build
//! would have produced. So the key of a build in flight is a digest of everything that
//! determines its result (`docs/design.md`, Builds):
//!
//! - the `.drv` path (recorded as the outputs' deriver);
//! - the derivation exactly as sent, nothing masked ([`BasicDerivation::to_aterm`]): builder,
//!   arguments, every environment variable (the ones named after outputs included), the
//!   outputs with their paths and content addresses, the system, the input sources;
//! - the input closure as the requesting account sees it: each path with its NAR hash.
//!
//! Neither `hashDerivationModulo` nor the `fixed:out:` hash of a fixed output will do: the
//! first blanks the output variables (two derivations that swap `out` and `dev` have the same
//! one), the second ignores the builder and its environment altogether (a builder that fails,
//! or that writes something else, has the same one).
//!
//! The other half of the rule, what each sharer receives, is in
//! [`super::outputs::process_outputs`]: every account gets the outputs this build produced,
//! never a row that another account already had.

use nixbuild_core::derivation::BasicDerivation;
use nixbuild_core::hash::{Hash, HashAlgo, Hasher};
use nixbuild_core::store_path::StorePath;

/// What identifies a build in flight for sharing (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BuildKey(Hash);

impl BuildKey {
    /// The key of building `drv` (named `drv_path`) with `inputs`, the input closure as the
    /// requesting account sees it: each path with its NAR hash, in any order.
    pub fn new<'a>(
        drv_path: &StorePath,
        drv: &BasicDerivation,
        inputs: impl IntoIterator<Item = (&'a StorePath, &'a Hash)>,
    ) -> BuildKey {
        let mut inputs: Vec<_> = inputs.into_iter().collect();
        inputs.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut key = Hasher::new(HashAlgo::Sha256);
        // Every field is length-prefixed, so no two sequences of fields give the same bytes.
        let mut field = |bytes: &[u8]| {
            key.update(&(bytes.len() as u64).to_le_bytes());
            key.update(bytes);
        };
        field(drv_path.to_absolute().as_bytes());
        field(&drv.to_aterm());
        for (path, nar_hash) in inputs {
            field(path.to_absolute().as_bytes());
            field(nar_hash.algo().name().as_bytes());
            field(nar_hash.digest());
        }
        BuildKey(key.finish())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use nixbuild_core::derivation::strategies::basic_derivation;
    use nixbuild_core::derivation::DerivationOutput;
    use nixbuild_core::store_path::strategies::{drv_path, store_path};
    use proptest::prelude::*;

    /// One change to a build request: each must give another key.
    #[derive(Debug, Clone)]
    enum Change {
        DrvPath(StorePath),
        Builder(Vec<u8>),
        AddArg(Vec<u8>),
        Platform(Vec<u8>),
        /// Sets an env variable to a value it does not have (an output's variable included).
        Env(prop::sample::Index, Vec<u8>),
        /// Swaps the values of the env variables of two outputs.
        SwapOutputVars,
        /// Gives an output another path.
        OutputPath(prop::sample::Index, StorePath),
        InputSrc(StorePath),
        /// Changes the NAR hash of one input.
        InputHash(prop::sample::Index, [u8; 32]),
        /// Adds an input.
        Input(StorePath, [u8; 32]),
    }

    fn change() -> impl Strategy<Value = Change> {
        let bytes = || proptest::collection::vec(any::<u8>(), 0..8);
        prop_oneof![
            drv_path().prop_map(Change::DrvPath),
            bytes().prop_map(Change::Builder),
            bytes().prop_map(Change::AddArg),
            bytes().prop_map(Change::Platform),
            (any::<prop::sample::Index>(), bytes()).prop_map(|(i, v)| Change::Env(i, v)),
            Just(Change::SwapOutputVars),
            (any::<prop::sample::Index>(), store_path())
                .prop_map(|(i, p)| Change::OutputPath(i, p)),
            store_path().prop_map(Change::InputSrc),
            (any::<prop::sample::Index>(), any::<[u8; 32]>())
                .prop_map(|(i, h)| Change::InputHash(i, h)),
            (store_path(), any::<[u8; 32]>()).prop_map(|(p, h)| Change::Input(p, h)),
        ]
    }

    type Inputs = Vec<(StorePath, Hash)>;

    fn sha256(digest: [u8; 32]) -> Hash {
        Hash::new(HashAlgo::Sha256, &digest).unwrap()
    }

    /// Applies `change`; `false` when it changes nothing (the test then skips the case).
    fn apply(
        change: Change,
        drv_path: &mut StorePath,
        drv: &mut BasicDerivation,
        inputs: &mut Inputs,
    ) -> bool {
        match change {
            Change::DrvPath(p) => std::mem::replace(drv_path, p) != *drv_path,
            Change::Builder(b) => std::mem::replace(&mut drv.builder, b) != drv.builder,
            Change::AddArg(a) => {
                drv.args.push(a);
                true
            }
            Change::Platform(p) => std::mem::replace(&mut drv.platform, p) != drv.platform,
            Change::Env(i, value) => {
                // Output variables first: they are what hashDerivationModulo blanks.
                let mut keys: Vec<Vec<u8>> = drv
                    .outputs
                    .keys()
                    .map(|o| o.clone().into_bytes())
                    .chain(drv.env.keys().cloned())
                    .collect();
                keys.dedup();
                let key = keys.get(i.index(keys.len().max(1))).cloned();
                let key = key.unwrap_or_else(|| b"unset".to_vec());
                drv.env.insert(key, value.clone()) != Some(value)
            }
            Change::SwapOutputVars => {
                let names: Vec<Vec<u8>> =
                    drv.outputs.keys().map(|o| o.clone().into_bytes()).collect();
                let [a, b, ..] = names.as_slice() else {
                    return false;
                };
                let (va, vb) = (drv.env.get(a).cloned(), drv.env.get(b).cloned());
                if va == vb {
                    return false;
                }
                for (k, v) in [(a, vb), (b, va)] {
                    match v {
                        Some(v) => drv.env.insert(k.clone(), v),
                        None => drv.env.remove(k),
                    };
                }
                true
            }
            Change::OutputPath(i, p) => {
                let Some(name) = drv.outputs.keys().nth(i.index(drv.outputs.len().max(1))) else {
                    return false;
                };
                let name = name.clone();
                let new = DerivationOutput::InputAddressed(p);
                drv.outputs.insert(name, new.clone()) != Some(new)
            }
            Change::InputSrc(p) => drv.input_srcs.insert(p),
            Change::InputHash(i, digest) => {
                if inputs.is_empty() {
                    return false;
                }
                let n = inputs.len();
                let slot = &mut inputs[i.index(n)].1;
                std::mem::replace(slot, sha256(digest)) != *slot
            }
            Change::Input(p, digest) => {
                if inputs.iter().any(|(q, _)| *q == p) {
                    return false;
                }
                inputs.push((p, sha256(digest)));
                true
            }
        }
    }

    fn key(drv_path: &StorePath, drv: &BasicDerivation, inputs: &Inputs) -> BuildKey {
        BuildKey::new(drv_path, drv, inputs.iter().map(|(p, h)| (p, h)))
    }

    fn inputs() -> impl Strategy<Value = Inputs> {
        proptest::collection::btree_map(store_path(), any::<[u8; 32]>(), 0..4)
            .prop_map(|m| m.into_iter().map(|(p, d)| (p, sha256(d))).collect())
    }

    proptest! {
        #[test]
        fn any_change_to_what_a_build_produces_gives_another_key(
            drv_path in drv_path(),
            drv in basic_derivation(),
            inputs in inputs(),
            change in change(),
        ) {
            let before = key(&drv_path, &drv, &inputs);
            let mut shuffled = inputs.clone();
            shuffled.reverse();
            prop_assert_eq!(key(&drv_path, &drv, &shuffled), before, "order of inputs");
            let (mut p, mut d, mut i) = (drv_path, drv, inputs);
            prop_assume!(apply(change.clone(), &mut p, &mut d, &mut i));
            prop_assert_ne!(key(&p, &d, &i), before, "{:?}", change);
        }
    }

    /// The holes of issue 14 that the modulo hash left open, as fixed cases.
    #[test]
    fn swapped_output_variables_and_another_fixed_output_builder_give_other_keys() {
        let path = |s: &str| StorePath::from_absolute_path(s.as_bytes()).unwrap();
        let out = path("/nix/store/7h7qgvs4kgzsn8a6rb273saxyqh4jxlz-d");
        let dev = path("/nix/store/8h7qgvs4kgzsn8a6rb273saxyqh4jxlz-d-dev");
        let drv_path = path("/nix/store/9h7qgvs4kgzsn8a6rb273saxyqh4jxlz-d.drv");
        let mut drv = BasicDerivation {
            outputs: [
                ("out".into(), DerivationOutput::InputAddressed(out.clone())),
                ("dev".into(), DerivationOutput::InputAddressed(dev.clone())),
            ]
            .into(),
            platform: b"x86_64-linux".to_vec(),
            builder: b"/bin/sh".to_vec(),
            ..BasicDerivation::default()
        };
        drv.env
            .insert(b"out".to_vec(), out.to_absolute().into_bytes());
        drv.env
            .insert(b"dev".to_vec(), dev.to_absolute().into_bytes());
        let mut swapped = drv.clone();
        swapped
            .env
            .insert(b"out".to_vec(), dev.to_absolute().into_bytes());
        swapped
            .env
            .insert(b"dev".to_vec(), out.to_absolute().into_bytes());
        assert_eq!(drv.hash_modulo(), swapped.hash_modulo(), "the old key");
        let none: [(&StorePath, &Hash); 0] = [];
        assert_ne!(
            BuildKey::new(&drv_path, &drv, none),
            BuildKey::new(&drv_path, &swapped, none)
        );

        let ca = nixbuild_core::content_address::ContentAddress::parse(
            "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
        )
        .unwrap();
        let fixed_path = path("/nix/store/ah7qgvs4kgzsn8a6rb273saxyqh4jxlz-f");
        let fixed = BasicDerivation {
            outputs: [(
                "out".into(),
                DerivationOutput::Fixed {
                    path: fixed_path,
                    ca,
                },
            )]
            .into(),
            builder: b"/bin/sh".to_vec(),
            args: vec![b"-c".to_vec(), b"echo secret > $out".to_vec()],
            ..BasicDerivation::default()
        };
        let failing = BasicDerivation {
            args: vec![b"-c".to_vec(), b"exit 1".to_vec()],
            ..fixed.clone()
        };
        assert_eq!(fixed.hash_modulo(), failing.hash_modulo(), "the old key");
        assert_ne!(
            BuildKey::new(&drv_path, &fixed, none),
            BuildKey::new(&drv_path, &failing, none)
        );
    }
}
