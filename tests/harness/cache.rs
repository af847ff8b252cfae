//! Binary caches for the substitution tests: written by the real Nix (`nix copy --to
//! file://…`, signed with the test key in `nixbuild-core/tests/data/binary-cache/`) and
//! served over HTTP by Python's `http.server` on 127.0.0.1, whose access log counts the
//! requests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::clients::ClientNix;

/// The key files of the test cache.
fn key_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("nixbuild-core/tests/data/binary-cache")
        .join(name)
}

/// The public key the test caches are signed with (`test-cache-1:…`).
pub fn public_key() -> String {
    std::fs::read_to_string(key_file("test-cache-1.public"))
        .expect("read the test cache's public key")
        .trim()
        .to_owned()
}

/// A binary cache in a temporary directory.
pub struct BinaryCache {
    dir: tempfile::TempDir,
}

impl BinaryCache {
    /// An empty cache.
    pub fn new() -> BinaryCache {
        BinaryCache {
            dir: tempfile::tempdir().expect("create the cache directory"),
        }
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Its `file://` URL.
    pub fn file_url(&self) -> String {
        format!("file://{}", self.dir().display())
    }

    /// `nix copy` of `paths` (with their closures) from `nix`'s store into the cache,
    /// compressed with `compression` and signed with `key` (a file in the test data:
    /// `test-cache-1.secret`, or `impostor.secret` for a key nobody trusts).
    pub fn copy(&self, nix: &ClientNix, paths: &[String], compression: &str, key: &str) {
        nix.share(self.dir());
        nix.share(&key_file(""));
        let to = format!(
            "{}?secret-key={}&compression={compression}",
            self.file_url(),
            key_file(key).display()
        );
        nix.ok(nix.command("nix").args(["copy", "--to", &to]).args(paths));
    }

    /// The narinfo file of `path` (`/nix/store/<hash>-<name>`).
    pub fn narinfo(&self, path: &str) -> PathBuf {
        let base = path.trim_start_matches("/nix/store/");
        self.dir().join(format!("{}.narinfo", &base[..32]))
    }

    /// The NAR file the narinfo of `path` names.
    pub fn nar(&self, path: &str) -> PathBuf {
        let text = std::fs::read_to_string(self.narinfo(path)).expect("read a narinfo");
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("a URL line");
        self.dir().join(url)
    }
}

/// `python3 -m http.server` serving a directory on 127.0.0.1, killed when dropped.
pub struct HttpServer {
    child: Child,
    port: u16,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl HttpServer {
    /// Serves `dir` on a port the server picks.
    pub fn serve(dir: &Path) -> HttpServer {
        let log_dir = tempfile::tempdir().expect("create the server's log directory");
        let log = log_dir.path().join("access.log");
        let mut child = Command::new("python3")
            .args([
                "-u",
                "-m",
                "http.server",
                "--bind",
                "127.0.0.1",
                "0",
                "--directory",
            ])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the access log"))
            .spawn()
            .expect("run python3 -m http.server (Debian's python3; the test command installs it)");
        // "Serving HTTP on 127.0.0.1 port 38123 (http://127.0.0.1:38123/) ..."
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read the server's first line");
        let port = line
            .split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        HttpServer {
            child,
            port,
            log,
            _log_dir: log_dir,
        }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The paths requested so far (`GET /x.narinfo` gives `/x.narinfo`), with their status.
    pub fn requests(&self) -> Vec<(String, u16)> {
        let log = std::fs::read_to_string(&self.log).expect("read the access log");
        log.lines()
            .filter_map(|l| {
                let rest = l.split_once("\"GET ")?.1;
                let (path, rest) = rest.split_once(' ')?;
                let status = rest.split_once("\" ")?.1.split_whitespace().next()?;
                Some((path.to_owned(), status.parse().ok()?))
            })
            .collect()
    }

    /// How many times `name` (e.g. `/nar/….nar.xz`) was requested.
    pub fn count(&self, name: &str) -> usize {
        self.requests().iter().filter(|(p, _)| p == name).count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 file server on 127.0.0.1 that dies in the middle of one file: for
/// `cut`, it sends the headers with the whole length and half the bytes, then closes the
/// connection (a cache going down mid-transfer). Serves until the test process ends.
pub struct CuttingServer {
    port: u16,
}

impl CuttingServer {
    /// Serves `dir`, cutting `cut` (a request path such as `/nar/….nar.xz`).
    pub fn serve(dir: &Path, cut: &str) -> CuttingServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let (dir, cut) = (dir.to_owned(), cut.to_owned());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (dir, cut) = (dir.clone(), cut.clone());
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8_lossy(&head);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    let Ok(body) = std::fs::read(dir.join(path.trim_start_matches('/'))) else {
                        let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                        return;
                    };
                    let send = if path == cut {
                        &body[..body.len() / 2]
                    } else {
                        &body[..]
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(send);
                });
            }
        });
        CuttingServer { port }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
