//! One configured binary cache: where it is, how its files are fetched (HTTP(S) through a
//! shared agent, or a local directory), its `nix-cache-info`, and whether it is down.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nixbuild_core::binary_cache::CacheInfo;

use super::SubstituteError;

/// Nix's priority for a cache that states none.
const DEFAULT_PRIORITY: u64 = 50;
/// How long a cache that failed to answer is skipped before it is tried again.
const DOWN_FOR: Duration = Duration::from_secs(30);
/// Largest `nix-cache-info` or narinfo read.
pub(super) const MAX_SMALL_FILE: u64 = 1 << 20;

/// Where a cache's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheLocation {
    /// `http://…` or `https://…`, without a trailing slash.
    Http(String),
    /// `file:///dir`: a directory on this machine.
    File(PathBuf),
}

/// A cache as configured: `http[s]://host/path[?priority=N]` or `file:///dir[?priority=N]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    /// Where it is.
    pub location: CacheLocation,
    /// The `?priority=` given, which overrides the cache's own.
    pub priority: Option<u64>,
    /// The URL without its parameters, as logs and clients see it.
    pub display: String,
}

impl CacheUrl {
    /// Reads a configured URL; the only parameter understood is `priority` (any other is
    /// refused, so that a setting that would be ignored is not silently accepted).
    pub fn parse(text: &str) -> Result<CacheUrl, String> {
        let (base, query) = text.split_once('?').unwrap_or((text, ""));
        let mut priority = None;
        for param in query.split('&').filter(|p| !p.is_empty()) {
            match param.split_once('=') {
                Some(("priority", n)) => {
                    priority = Some(
                        n.parse()
                            .map_err(|_| format!("{text}: priority {n:?} is not a number"))?,
                    )
                }
                _ => {
                    return Err(format!(
                        "{text}: unknown parameter {param:?} (only priority)"
                    ))
                }
            }
        }
        let base = base.trim_end_matches('/');
        let location = if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(format!("{text}: a file:// URL needs an absolute path"));
            }
            CacheLocation::File(PathBuf::from(dir))
        } else if let Some(rest) = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"))
        {
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("{text}: no host"));
            }
            CacheLocation::Http(base.to_owned())
        } else {
            return Err(format!("{text}: not an http://, https:// or file:// URL"));
        };
        Ok(CacheUrl {
            location,
            priority,
            display: base.to_owned(),
        })
    }
}

/// What a fetch found.
pub(super) enum Fetched {
    /// The file, as a stream.
    Found(Box<dyn Read + Send>),
    /// The cache does not have it (404, 403 as S3 answers, or no such file).
    Missing,
}

/// One cache and what is known of it.
#[derive(Debug)]
pub(super) struct Cache {
    pub url: CacheUrl,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Its `nix-cache-info`, once read.
    info: Option<CacheInfo>,
    /// Skipped until then, after a failure to answer.
    down_until: Option<Instant>,
}

impl Cache {
    pub(super) fn new(url: CacheUrl) -> Cache {
        Cache {
            url,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its priority: the URL's, else its `nix-cache-info`'s, else Nix's default.
    pub(super) fn priority(&self) -> u64 {
        self.url
            .priority
            .or_else(|| self.state().info.as_ref().and_then(|i| i.priority))
            .unwrap_or(DEFAULT_PRIORITY)
    }

    /// Whether it may be asked now: not marked down, and its `nix-cache-info` read (now, if
    /// not yet) and naming `/nix/store`.
    pub(super) fn usable(&self, agent: &ureq::Agent) -> bool {
        {
            let state = self.state();
            if state.down_until.is_some_and(|t| Instant::now() < t) {
                return false;
            }
            if let Some(info) = &state.info {
                return info.same_store();
            }
        }
        let read = self.fetch(agent, "nix-cache-info").and_then(|f| match f {
            Fetched::Found(r) => read_small(r, &self.url.display, "nix-cache-info"),
            Fetched::Missing => Err(SubstituteError::NoCacheInfo {
                cache: self.url.display.clone(),
            }),
        });
        let info = read.and_then(|bytes| {
            CacheInfo::parse(&bytes).map_err(|source| SubstituteError::CacheInfo {
                cache: self.url.display.clone(),
                source,
            })
        });
        match info {
            Ok(info) => {
                if !info.same_store() {
                    tracing::warn!(
                        cache = %self.url.display,
                        store_dir = %info.store_dir,
                        "binary cache ignored: its paths are not in /nix/store"
                    );
                }
                let same = info.same_store();
                self.state().info = Some(info);
                same
            }
            Err(e) => {
                self.mark_down(&e);
                false
            }
        }
    }

    /// Skips the cache for a while after `error`.
    pub(super) fn mark_down(&self, error: &SubstituteError) {
        tracing::warn!(
            cache = %self.url.display,
            "binary cache unavailable for {}s: {error}",
            DOWN_FOR.as_secs()
        );
        self.state().down_until = Some(Instant::now() + DOWN_FOR);
    }

    /// Opens `rel` (a relative path checked safe by the caller: a narinfo name or a
    /// narinfo's URL) in the cache.
    pub(super) fn fetch(&self, agent: &ureq::Agent, rel: &str) -> Result<Fetched, SubstituteError> {
        match &self.url.location {
            CacheLocation::File(dir) => {
                let file = dir.join(rel);
                match File::open(&file) {
                    Ok(f) => Ok(Fetched::Found(Box::new(f))),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Fetched::Missing),
                    Err(source) => Err(SubstituteError::Read {
                        url: file.display().to_string(),
                        source,
                    }),
                }
            }
            CacheLocation::Http(base) => {
                let url = format!("{base}/{rel}");
                let response = agent
                    .get(&url)
                    .call()
                    .map_err(|source| SubstituteError::Http {
                        url: url.clone(),
                        source: Box::new(source),
                    })?;
                match response.status().as_u16() {
                    200 => Ok(Fetched::Found(Box::new(response.into_body().into_reader()))),
                    403 | 404 => Ok(Fetched::Missing),
                    status => Err(SubstituteError::Status { url, status }),
                }
            }
        }
    }
}

/// Reads all of a small file (at most [`MAX_SMALL_FILE`] bytes).
pub(super) fn read_small(
    reader: Box<dyn Read + Send>,
    cache: &str,
    name: &str,
) -> Result<Vec<u8>, SubstituteError> {
    let mut bytes = Vec::new();
    let url = || format!("{cache}/{name}");
    reader
        .take(MAX_SMALL_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| SubstituteError::Read { url: url(), source })?;
    if bytes.len() as u64 > MAX_SMALL_FILE {
        return Err(SubstituteError::TooLarge {
            url: url(),
            max: MAX_SMALL_FILE,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a panic is how a test reports failure

    use super::*;

    #[test]
    fn cache_urls_are_http_https_or_file_with_a_priority() {
        let url = CacheUrl::parse("https://cache.nixos.org/?priority=40").unwrap();
        assert_eq!(
            url.location,
            CacheLocation::Http("https://cache.nixos.org".into())
        );
        assert_eq!(url.priority, Some(40));
        assert_eq!(url.display, "https://cache.nixos.org");
        let url = CacheUrl::parse("file:///srv/cache").unwrap();
        assert_eq!(url.location, CacheLocation::File("/srv/cache".into()));
        assert_eq!(url.priority, None);
        for bad in [
            "s3://bucket",
            "file://relative",
            "http://",
            "https:///x",
            "http://h?priority=x",
            "http://h?trusted=1",
        ] {
            assert!(CacheUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
