//! Registering paths whose files are ready: the last step shared by imports
//! ([`super::Import::commit`]) and builds ([`Store::register_built`]). The files move to
//! `objects/<key>` and the rows are inserted under the store lock, all paths of one call in
//! one transaction.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nixbuild_core::content_address::ContentAddress;
use nixbuild_core::hash::Hash;
use nixbuild_core::store_path::{make_fixed_output_path, StorePath};
use rusqlite::Connection;

use super::db::{self, NewPath, ObjectRow, RefTarget};
use super::error::StoreError;
use super::{fsutil, object_key, Store};
use crate::failpoint::failpoint;

/// One path to register: its files, in their final canonical form, and its metadata.
pub(super) struct Publication<'a> {
    /// The store path.
    pub path: &'a StorePath,
    /// The root file, directory or symlink, canonical, on the state directory's file system
    /// (it is renamed into `objects/`).
    pub files: &'a Path,
    /// The sha256 of the files' NAR, computed by the caller from these files.
    pub nar_hash: Hash,
    /// The size of that NAR.
    pub nar_size: u64,
    /// The deriver, recorded as given.
    pub deriver: Option<&'a StorePath>,
    /// The content address; the path must be the one it gives with `references`.
    pub ca: Option<&'a ContentAddress>,
    /// References: the path itself, another path of the same call, or a path valid for the
    /// account.
    pub references: &'a BTreeSet<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: u64,
    /// Signatures, recorded as given.
    pub sigs: &'a BTreeSet<String>,
}

/// A path produced by a build on this server, checked and canonicalised by the build
/// service ([`crate::builds::outputs`]), ready for [`Store::register_built`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltPath {
    /// The store path.
    pub path: StorePath,
    /// Its files: the root file, directory or symlink, already canonical (owned by the
    /// daemon, files 0444/0555, directories 0555, mtime 1, no extended attributes), on the
    /// same file system as the state directory, since they are moved, not copied.
    pub files: PathBuf,
    /// The sha256 of the NAR of `files`. The store takes it from its own build service
    /// without re-hashing: it is never a client's claim.
    pub nar_hash: Hash,
    /// The size of that NAR in bytes.
    pub nar_size: u64,
    /// References: the path itself, another path of the same registration, or paths valid
    /// for the account.
    pub references: BTreeSet<StorePath>,
    /// The derivation that produced it.
    pub deriver: Option<StorePath>,
    /// The content address of a fixed output; the path must be the one it gives.
    pub ca: Option<ContentAddress>,
}

/// Checks that `path` is the path that `ca` and `references` (which may include `path`
/// itself) give.
pub(super) fn check_ca_path(
    path: &StorePath,
    ca: &ContentAddress,
    references: &BTreeSet<StorePath>,
) -> Result<(), StoreError> {
    let self_reference = references.contains(path);
    let others = if self_reference {
        let mut others = references.clone();
        others.remove(path);
        Cow::Owned(others)
    } else {
        Cow::Borrowed(references)
    };
    let expected =
        make_fixed_output_path(path.name(), ca, &others, self_reference).map_err(|source| {
            StoreError::CaPath {
                path: path.clone(),
                ca: Box::new(*ca),
                source,
            }
        })?;
    if expected != *path {
        return Err(StoreError::PathMismatch {
            path: path.clone(),
            ca: Box::new(*ca),
            expected,
        });
    }
    Ok(())
}

impl Store {
    /// Registers the outputs of one build for `account`, all or none, with the current time
    /// and no signatures. Returns, for each path, whether it was registered now (`false`:
    /// it was already valid for the account, its row is left as it was and its `files` are
    /// left where they are for the caller to delete).
    ///
    /// Under the store lock, like an import's commit: every reference must be one of
    /// `paths`, the path itself, or valid for the account
    /// ([`StoreError::MissingReference`]); a path with a content address must be the one it
    /// gives ([`StoreError::PathMismatch`]). Each new path's files are renamed to
    /// `objects/<key>` unless an identical object exists, then all rows are inserted in one
    /// transaction. On failure, nothing is registered and the objects moved by this call
    /// are removed.
    pub fn register_built(
        &self,
        account: &str,
        paths: &[BuiltPath],
    ) -> Result<Vec<bool>, StoreError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let no_sigs = BTreeSet::new();
        let items: Vec<Publication<'_>> = paths
            .iter()
            .map(|p| Publication {
                path: &p.path,
                files: &p.files,
                nar_hash: p.nar_hash,
                nar_size: p.nar_size,
                deriver: p.deriver.as_ref(),
                ca: p.ca.as_ref(),
                references: &p.references,
                registration_time: now,
                sigs: &no_sigs,
            })
            .collect();
        // The build ran: its outputs are kept whatever the quota; the account's next upload or
        // build is refused while it is over.
        self.publish(account, &items, false)
    }

    /// Moves each item's files to `objects/<key>` (unless an identical object exists) and
    /// inserts the rows of all items in one transaction, under the store lock so that
    /// existence checks, renames and inserts are one step for other commits. Items already
    /// valid for the account are skipped (`false` in the result). On failure the objects
    /// this call moved are removed again and nothing is registered. With `quota`, the items
    /// must fit in the account's quota, after collecting its expired paths if they do not at
    /// first ([`StoreError::Quota`]).
    pub(super) fn publish(
        &self,
        account: &str,
        items: &[Publication<'_>],
        quota: bool,
    ) -> Result<Vec<bool>, StoreError> {
        self.collecting_for_quota(account, || self.publish_once(account, items, quota))
    }

    fn publish_once(
        &self,
        account: &str,
        items: &[Publication<'_>],
        quota: bool,
    ) -> Result<Vec<bool>, StoreError> {
        for item in items {
            if let Some(ca) = item.ca {
                check_ca_path(item.path, ca, item.references)?;
            }
        }
        let objects: Vec<ObjectRow> = items
            .iter()
            .map(|item| ObjectRow {
                key: object_key(item.path, &item.nar_hash),
                nar_hash: item.nar_hash,
                nar_size: item.nar_size,
            })
            .collect();
        let mut conn = self.inner.lock_db();
        let mut fresh = Vec::with_capacity(items.len());
        for item in items {
            fresh.push(db::path_id(&conn, account, item.path)?.is_none());
        }
        let batch: HashSet<&StorePath> = items
            .iter()
            .zip(&fresh)
            .filter(|(_, &f)| f)
            .map(|(item, _)| item.path)
            .collect();
        if quota {
            let adding = items
                .iter()
                .zip(&fresh)
                .filter(|(_, &f)| f)
                .map(|(item, _)| item.nar_size)
                .sum();
            self.check_quota(&conn, account, adding)?;
        }
        let mut news = Vec::with_capacity(batch.len());
        let mut files = Vec::with_capacity(batch.len());
        for ((item, object), _) in items.iter().zip(&objects).zip(&fresh).filter(|(_, &f)| f) {
            let mut references = Vec::with_capacity(item.references.len());
            for reference in item.references {
                if batch.contains(reference) {
                    references.push(RefTarget::New(reference));
                    continue;
                }
                match db::path_id(&conn, account, reference)? {
                    Some(id) => references.push(RefTarget::Row(id)),
                    None => {
                        return Err(StoreError::MissingReference {
                            path: item.path.clone(),
                            reference: Box::new(reference.clone()),
                            account: account.to_owned(),
                        })
                    }
                }
            }
            news.push(NewPath {
                account,
                path: item.path,
                object,
                deriver: item.deriver,
                ca: item.ca,
                registration_time: item.registration_time,
                references,
                sigs: item.sigs,
            });
            files.push(item.files);
        }
        let mut placed = Vec::new();
        let result = self.place_and_insert(&mut conn, &news, &files, &mut placed);
        if result.is_err() {
            // Anything failing once an object is in place (its mtime, another rename, the
            // insert) takes it out again; best effort: Store::open removes an object
            // without a row anyway.
            for target in &placed {
                let _ = fsutil::remove_tree(target);
            }
        }
        result.map(|()| fresh)
    }

    /// Renames each new path's files into `objects/` unless its object exists (recording
    /// each rename in `placed`), then inserts all rows.
    fn place_and_insert(
        &self,
        conn: &mut Connection,
        news: &[NewPath<'_>],
        files: &[&Path],
        placed: &mut Vec<PathBuf>,
    ) -> Result<(), StoreError> {
        failpoint!("publish-before-rename");
        for (new, root) in news.iter().zip(files) {
            if db::object_exists(conn, &new.object.key)? {
                continue;
            }
            let target = self.inner.objects.join(&new.object.key);
            fsutil::rename_noreplace(root, &target)?;
            placed.push(target.clone());
            // A directory moved to a new parent may get a new mtime on some file systems.
            fsutil::set_canonical_mtime(&target)?;
        }
        failpoint!("publish-after-rename");
        db::insert_paths(conn, news)?;
        failpoint!("publish-after-commit");
        Ok(())
    }
}
