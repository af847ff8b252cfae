//! Granting the paths one account holds to another: how a path substituted once for the
//! whole server (held by [`PUBLIC_ACCOUNT`]) joins the view of each account that asks for it.

use std::collections::{BTreeSet, HashSet};

use nixbuild_core::store_path::StorePath;

use super::db::{self, NewPath, ObjectRow, RefTarget};
use super::error::StoreError;
use super::Store;

/// The holder of paths substituted from trusted binary caches: public content, granted to
/// any account that asks for it. Not a valid account name (`:` is not allowed in one), so
/// no client can ever be it.
pub const PUBLIC_ACCOUNT: &str = ":public";

/// One path of `from` to copy, with what its new row needs.
struct Grant {
    path: StorePath,
    object: ObjectRow,
    info: nixbuild_core::serve::ValidPathInfo,
}

impl Store {
    /// Grants `to` the closure of `paths` as `from` holds it: each path of that closure that
    /// `to` does not hold yet gets a row of its own, with the same object, deriver, content
    /// address and signatures, its references pointing at `to`'s rows; all in one
    /// transaction, `from`'s rows marked used. A path `to` already holds keeps its own row
    /// (and its own contents). The closure is walked under the same store lock as the
    /// rows are written, so the collector cannot take part of it in between.
    /// Returns the paths granted now. Err([`StoreError::NotValid`]) when one of `paths` is
    /// not valid for `from`.
    /// The grants count against `to`'s quota like an upload ([`StoreError::Quota`], after
    /// collecting `to`'s expired paths).
    pub fn grant_closure(
        &self,
        from: &str,
        to: &str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        self.collecting_for_quota(to, || self.grant_once(from, to, paths))
    }

    fn grant_once(
        &self,
        from: &str,
        to: &str,
        paths: &BTreeSet<StorePath>,
    ) -> Result<BTreeSet<StorePath>, StoreError> {
        let mut conn = self.inner.lock_db();
        let start = super::starting_rows(&conn, from, paths)?;
        let rows = db::walk_references(&conn, start, &mut HashSet::new())?;
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        Store::hold(&conn, &ids, None)?;
        let mut grants = Vec::new();
        for (_, path) in rows {
            if db::path_id(&conn, to, &path)?.is_some() {
                continue;
            }
            let not_valid = || StoreError::NotValid {
                path: path.clone(),
                account: from.to_owned(),
            };
            let (_, object) = db::path_object(&conn, from, &path)?.ok_or_else(not_valid)?;
            let info = db::path_info(&conn, from, &path)?.ok_or_else(not_valid)?;
            grants.push(Grant { path, object, info });
        }
        self.check_quota(&conn, to, grants.iter().map(|g| g.object.nar_size).sum())?;
        let batch: HashSet<&StorePath> = grants.iter().map(|g| &g.path).collect();
        let now = db::now();
        let mut news = Vec::with_capacity(grants.len());
        for g in &grants {
            let mut references = Vec::with_capacity(g.info.references.len());
            for reference in &g.info.references {
                if batch.contains(reference) {
                    references.push(RefTarget::New(reference));
                    continue;
                }
                let id = db::path_id(&conn, to, reference)?.ok_or_else(|| {
                    StoreError::MissingReference {
                        path: g.path.clone(),
                        reference: Box::new(reference.clone()),
                        account: to.to_owned(),
                    }
                })?;
                references.push(RefTarget::Row(id));
            }
            news.push(NewPath {
                account: to,
                path: &g.path,
                object: &g.object,
                deriver: g.info.deriver.as_ref(),
                ca: g.info.ca.as_ref(),
                registration_time: now,
                references,
                sigs: &g.info.sigs,
            });
        }
        db::insert_paths(&mut conn, &news)?;
        Ok(grants.into_iter().map(|g| g.path).collect())
    }
}
