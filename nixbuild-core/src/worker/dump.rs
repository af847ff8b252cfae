//! What AddToStore and AddTextToStore add (docs/worker-protocol.md §5): the store path, its
//! content address and its NAR, worked out from the name, the method and the dump a client
//! sends, as Nix's daemon works them out.
//!
//! | form | dump | hashed |
//! |---|---|---|
//! | text (AddTextToStore, `text:sha256`) | the file's bytes | the bytes, sha256 |
//! | `fixed:<algo>` (1.25 on) | the file's bytes | the bytes |
//! | `fixed:r:<algo>` (1.25 on) | a NAR | the NAR |
//! | legacy, recursive (before 1.25) | a NAR | the NAR |
//! | legacy, flat (before 1.25) | a NAR of one regular file | the file's bytes |

use std::collections::BTreeSet;

use super::request::AddToStoreForm;
use super::WorkerError;
use crate::content_address::{ContentAddress, ContentAddressMethod};
use crate::hash::{Hash, HashAlgo};
use crate::nar::NarNode;
use crate::store_path::{make_fixed_output_path, StorePath};

/// A path to add.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// Where it goes.
    pub path: StorePath,
    /// Its content address.
    pub ca: ContentAddress,
    /// Its references.
    pub references: BTreeSet<StorePath>,
    /// Its NAR.
    pub nar: Vec<u8>,
}

fn bad(msg: String) -> WorkerError {
    WorkerError::Payload(msg)
}

/// The NAR of a regular, non-executable file holding `contents`.
fn file_nar(contents: Vec<u8>) -> Result<Vec<u8>, WorkerError> {
    NarNode::File {
        executable: false,
        contents,
    }
    .to_nar()
    .map_err(|e| bad(format!("cannot serialise the file: {e}")))
}

/// The path AddToStore adds for `name` in `form` from `dump`.
pub fn add_to_store(
    name: &str,
    form: &AddToStoreForm,
    dump: Vec<u8>,
) -> Result<Added, WorkerError> {
    let (method, algo, references, nar, hash) = match form {
        AddToStoreForm::Addressed {
            method,
            algo,
            references,
            ..
        } => {
            let (nar, hash) = match method {
                ContentAddressMethod::Recursive => (Hash::compute(*algo, &dump), dump),
                _ => (Hash::compute(*algo, &dump), file_nar(dump)?),
            }
            .swap();
            (*method, *algo, references.clone(), nar, hash)
        }
        AddToStoreForm::Legacy {
            recursive: true,
            algo,
            ..
        } => {
            let hash = Hash::compute(*algo, &dump);
            (
                ContentAddressMethod::Recursive,
                *algo,
                BTreeSet::new(),
                dump,
                hash,
            )
        }
        AddToStoreForm::Legacy {
            recursive: false,
            algo,
            ..
        } => {
            let node = NarNode::from_nar(&dump)
                .map_err(|e| bad(format!("the NAR of a flat AddToStore: {e}")))?;
            let NarNode::File { contents, .. } = node else {
                return Err(bad(
                    "a flat AddToStore must carry a single regular file".to_owned()
                ));
            };
            let hash = Hash::compute(*algo, &contents);
            (
                ContentAddressMethod::Flat,
                *algo,
                BTreeSet::new(),
                file_nar(contents)?,
                hash,
            )
        }
    };
    if method == ContentAddressMethod::Text && algo != HashAlgo::Sha256 {
        return Err(bad(format!(
            "text is hashed with sha256, not {}",
            algo.name()
        )));
    }
    let ca = ContentAddress { method, hash };
    let path = make_fixed_output_path(name, &ca, &references, false)
        .map_err(|e| bad(format!("adding '{name}': {e}")))?;
    Ok(Added {
        path,
        ca,
        references,
        nar,
    })
}

/// The path AddTextToStore adds: `text` named `name` with `references`.
pub fn add_text_to_store(
    name: &str,
    text: Vec<u8>,
    references: BTreeSet<StorePath>,
) -> Result<Added, WorkerError> {
    let form = AddToStoreForm::Addressed {
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references,
        repair: false,
    };
    add_to_store(name, &form, text)
}

trait Swap<A, B> {
    fn swap(self) -> (B, A);
}

impl<A, B> Swap<A, B> for (A, B) {
    fn swap(self) -> (B, A) {
        (self.1, self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn a_text_file_lands_where_nix_puts_it() {
        // `nix-instantiate --eval -E 'builtins.toFile "hello" "hello\n"'` (Nix 2.8).
        let added = add_text_to_store("hello", b"hello\n".to_vec(), BTreeSet::new()).unwrap();
        let expected = "/nix/store/nmrmdcw1bfnl35a893n7nyhw4xa5vy08-hello";
        assert_eq!(added.path.to_absolute(), expected);
        assert_eq!(added.ca.method, ContentAddressMethod::Text);
        assert_eq!(added.nar, file_nar(b"hello\n".to_vec()).unwrap());
    }

    #[test]
    fn a_flat_file_lands_where_nix_puts_it() {
        // `nix-store --add-fixed sha256 data` of a file holding "data" (Nix 2.8).
        let flat = AddToStoreForm::Addressed {
            method: ContentAddressMethod::Flat,
            algo: HashAlgo::Sha256,
            references: BTreeSet::new(),
            repair: false,
        };
        let added = add_to_store("data", &flat, b"data".to_vec()).unwrap();
        let expected = "/nix/store/n3mpf1s5i35d5g4dc4blhcbs5x1d9cfd-data";
        assert_eq!(added.path.to_absolute(), expected);
    }

    #[test]
    fn the_legacy_and_addressed_forms_agree() {
        let nar = file_nar(b"data".to_vec()).unwrap();
        for (recursive, method) in [
            (true, ContentAddressMethod::Recursive),
            (false, ContentAddressMethod::Flat),
        ] {
            let legacy = AddToStoreForm::Legacy {
                fixed: 1,
                recursive,
                algo: HashAlgo::Sha256,
            };
            let addressed = AddToStoreForm::Addressed {
                method,
                algo: HashAlgo::Sha256,
                references: BTreeSet::new(),
                repair: false,
            };
            let dump = if recursive {
                nar.clone()
            } else {
                b"data".to_vec()
            };
            let a = add_to_store("x", &legacy, nar.clone()).unwrap();
            let b = add_to_store("x", &addressed, dump).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn a_flat_legacy_dump_must_be_one_file() {
        let dir = NarNode::Directory(Default::default()).to_nar().unwrap();
        let legacy = AddToStoreForm::Legacy {
            fixed: 1,
            recursive: false,
            algo: HashAlgo::Sha256,
        };
        let err = add_to_store("x", &legacy, dir).unwrap_err().to_string();
        assert!(err.contains("single regular file"), "{err}");
        assert!(add_to_store("x", &legacy, b"not a nar".to_vec()).is_err());
    }
}
