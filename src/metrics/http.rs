//! The scrape endpoint: just enough HTTP/1.1 to answer `GET /metrics` with the text
//! exposition of [`METRICS`]. One request per connection, then `Connection: close`; the
//! request head is bounded ([`MAX_HEAD`]) and timed ([`HEAD_TIMEOUT`]), and at most
//! [`MAX_CONNECTIONS`] are served at once, so a scraper (or anyone who can reach the address)
//! cannot make the daemon hold much.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::{Snapshot, METRICS};

/// The longest request head (request line and headers) read; a longer one is answered 431.
const MAX_HEAD: usize = 8 * 1024;

/// How long a client has, from its connection, to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client has to take the response.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once; one more is closed at once.
const MAX_CONNECTIONS: usize = 16;

/// After the response, what the client still sends is read and dropped, up to this much and
/// for this long: closing with unread bytes would reset the connection, and the client could
/// lose the response (a 431 in particular).
const LINGER_BYTES: usize = 64 * 1024;

/// How long a client's remaining bytes are waited for (see [`LINGER_BYTES`]).
const LINGER: Duration = Duration::from_secs(2);

/// What a scrape calls for the gauges of the daemon's state.
type SnapshotFn = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Serves `GET /metrics` on `listener` until `stop` turns true (or its sender is gone).
/// `snapshot` is called on a blocking thread (it may query the store) for each scrape.
/// Connections still open when it returns are dropped.
pub async fn serve(
    listener: TcpListener,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
    mut stop: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics at /metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut connections = JoinSet::new();
    loop {
        // The select only picks the event: the watch's guard, inside its output, must not be
        // held across the awaits below, or the future would not be `Send`.
        let accepted = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            Some(joined) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = joined {
                    tracing::debug!("metrics connection task failed: {e}");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::debug!("metrics: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} connections open; closed");
            continue;
        };
        let snapshot = Arc::clone(&snapshot);
        connections.spawn(async move {
            if let Err(e) = connection(stream, &snapshot).await {
                tracing::debug!(%peer, "metrics connection: {e}");
            }
            drop(slot);
        });
    }
}

/// Why a connection ended without a response.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The head did not arrive in time.
    #[error("no complete request head within {HEAD_TIMEOUT:?}")]
    HeadTimeout,
    /// The client closed before the end of its head.
    #[error("closed after {0} bytes, before the end of the request head")]
    Closed(usize),
    /// The client did not take the response in time.
    #[error("the response was not taken within {WRITE_TIMEOUT:?}")]
    WriteTimeout,
}

/// Reads one request, answers it and closes.
async fn connection(mut stream: TcpStream, snapshot: &SnapshotFn) -> Result<(), ConnectionError> {
    let mut buf = vec![0; MAX_HEAD];
    let head = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buf))
        .await
        .map_err(|_| ConnectionError::HeadTimeout)??;
    let response = match head {
        Head::Complete(len) => respond(buf.get(..len).unwrap_or_default(), snapshot).await,
        Head::TooLong => {
            tracing::debug!("metrics: request head longer than {MAX_HEAD} bytes");
            response(
                Status::HeadTooLarge,
                TEXT,
                b"request head too large\n",
                true,
            )
        }
        Head::Closed(len) => return Err(ConnectionError::Closed(len)),
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| ConnectionError::WriteTimeout)??;
    linger(&mut stream).await;
    Ok(())
}

/// How reading a request head ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// The head is the first `.0` bytes, blank line included.
    Complete(usize),
    /// The buffer filled up before the blank line.
    TooLong,
    /// The client closed after `.0` bytes, before the blank line.
    Closed(usize),
}

/// Reads into `buf` until the blank line that ends a request head, or until `buf` is full.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<Head> {
    let mut filled = 0;
    loop {
        let Some(free) = buf.get_mut(filled..).filter(|free| !free.is_empty()) else {
            return Ok(Head::TooLong);
        };
        let n = stream.read(free).await?;
        if n == 0 {
            return Ok(Head::Closed(filled));
        }
        // A blank line that ends in the new bytes starts at most two bytes before them.
        let from = filled.saturating_sub(2);
        filled += n;
        if let Some(end) = head_end(buf.get(..filled).unwrap_or_default(), from) {
            return Ok(Head::Complete(end));
        }
    }
}

/// Where the head in `buf` ends (after its blank line, `\r\n` or a lenient `\n`), looking
/// at line ends from `from` on.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    let rest = buf.get(from..)?;
    memchr::memchr_iter(b'\n', rest).find_map(|i| {
        let after = buf.get(from + i + 1..)?;
        if after.starts_with(b"\n") {
            Some(from + i + 2)
        } else if after.starts_with(b"\r\n") {
            Some(from + i + 3)
        } else {
            None
        }
    })
}

/// The first line of `head`, without its line end.
fn first_line(head: &[u8]) -> &[u8] {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The parts of a request line that choose the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestLine<'a> {
    /// The method, as sent (methods are case-sensitive).
    method: &'a [u8],
    /// The target's path, without its query.
    path: &'a [u8],
}

/// Why a request line is not one this endpoint understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum BadRequest {
    /// Not three fields separated by single spaces.
    #[error("the request line is not `METHOD TARGET VERSION`")]
    Shape,
    /// The method has a character that is not allowed in a token.
    #[error("the method is not a token")]
    Method,
    /// The target is not an absolute path (`/...`) of visible ASCII characters.
    #[error("the target is not an absolute path")]
    Target,
    /// An HTTP version other than 1.0 and 1.1.
    #[error("the HTTP version is neither 1.0 nor 1.1")]
    Version,
}

/// Parses a request line (RFC 9112 §3), `METHOD SP TARGET SP HTTP/1.x`, without its line end.
/// Only the origin form of the target is accepted, and the query is dropped.
fn parse_request_line(line: &[u8]) -> Result<RequestLine<'_>, BadRequest> {
    let mut fields = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(BadRequest::Shape);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(BadRequest::Method);
    }
    if !target.starts_with(b"/") || !target.iter().all(u8::is_ascii_graphic) {
        return Err(BadRequest::Target);
    }
    match version {
        b"HTTP/1.0" | b"HTTP/1.1" => {}
        v if v.starts_with(b"HTTP/") => return Err(BadRequest::Version),
        _ => return Err(BadRequest::Shape),
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    Ok(RequestLine { method, path })
}

/// Whether `b` may appear in a token (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What a well-formed request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `/metrics`.
    Metrics,
    /// `/`, a pointer to `/metrics`.
    Index,
    /// Any other path.
    NotFound,
    /// A method other than GET and HEAD.
    MethodNotAllowed,
}

/// The answer to `line`, and whether it has a body (not for HEAD).
fn route(line: &RequestLine<'_>) -> (Route, bool) {
    let with_body = match line.method {
        b"GET" => true,
        b"HEAD" => false,
        _ => return (Route::MethodNotAllowed, true),
    };
    let route = match line.path {
        b"/metrics" => Route::Metrics,
        b"/" => Route::Index,
        _ => Route::NotFound,
    };
    (route, with_body)
}

/// The answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    Internal,
    VersionNotSupported,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::Ok => "200 OK",
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::HeadTooLarge => "431 Request Header Fields Too Large",
            Status::Internal => "500 Internal Server Error",
            Status::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// The content type of the text exposition, format version 0.0.4.
const EXPOSITION: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of every other answer.
const TEXT: &str = "text/plain; charset=utf-8";

/// The answer to the request whose head is `head`.
async fn respond(head: &[u8], snapshot: &SnapshotFn) -> Vec<u8> {
    let line = match parse_request_line(first_line(head)) {
        Ok(line) => line,
        Err(e) => {
            tracing::debug!("metrics: bad request: {e}");
            let status = match e {
                BadRequest::Version => Status::VersionNotSupported,
                _ => Status::BadRequest,
            };
            return response(status, TEXT, format!("{e}\n").as_bytes(), true);
        }
    };
    match route(&line) {
        (Route::Metrics, with_body) => {
            let snapshot = Arc::clone(snapshot);
            match tokio::task::spawn_blocking(move || snapshot()).await {
                Ok(snapshot) => {
                    let text = METRICS.render(&snapshot);
                    response(Status::Ok, EXPOSITION, text.as_bytes(), with_body)
                }
                Err(e) => {
                    tracing::debug!("metrics: the snapshot failed: {e}");
                    response(Status::Internal, TEXT, b"the snapshot failed\n", with_body)
                }
            }
        }
        (Route::Index, with_body) => response(
            Status::Ok,
            TEXT,
            b"nixbuild: the metrics are at /metrics\n",
            with_body,
        ),
        (Route::NotFound, with_body) => response(Status::NotFound, TEXT, b"not found\n", with_body),
        (Route::MethodNotAllowed, _) => response(
            Status::MethodNotAllowed,
            TEXT,
            b"only GET and HEAD are allowed\n",
            true,
        ),
    }
}

/// A whole response: status line, headers and, when `with_body`, `body` (whose length is
/// given either way, as HEAD requires).
fn response(status: Status, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}\
         Connection: close\r\n\r\n",
        status.line(),
        body.len(),
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

/// Reads and drops what the client still sends, within [`LINGER_BYTES`] and [`LINGER`].
async fn linger(stream: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::task::JoinHandle;

    #[test]
    fn parses_good_request_lines() {
        for (line, method, path) in [
            (&b"GET /metrics HTTP/1.1"[..], &b"GET"[..], &b"/metrics"[..]),
            (b"GET /metrics HTTP/1.0", b"GET", b"/metrics"),
            (b"HEAD /metrics?name[]=x&y HTTP/1.1", b"HEAD", b"/metrics"),
            (b"GET / HTTP/1.1", b"GET", b"/"),
            (b"GET /? HTTP/1.1", b"GET", b"/"),
            (b"POST /metrics HTTP/1.1", b"POST", b"/metrics"),
            (b"get /x/y%20z HTTP/1.1", b"get", b"/x/y%20z"),
        ] {
            assert_eq!(
                parse_request_line(line),
                Ok(RequestLine { method, path }),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn rejects_bad_request_lines() {
        for (line, error) in [
            (&b""[..], BadRequest::Shape),
            (b"GET", BadRequest::Shape),
            (b"GET /metrics", BadRequest::Shape),
            (b"GET  /metrics HTTP/1.1", BadRequest::Shape),
            (b"GET /metrics HTTP/1.1 ", BadRequest::Shape),
            (b"GET /metrics HTTP/1.1 extra", BadRequest::Shape),
            (b"GET\t/metrics HTTP/1.1", BadRequest::Shape),
            (b"GET /metrics http/1.1", BadRequest::Shape),
            (b"GET /metrics SPDY/3", BadRequest::Shape),
            (b" /metrics HTTP/1.1", BadRequest::Method),
            (b"G(T /metrics HTTP/1.1", BadRequest::Method),
            (b"G\xffT /metrics HTTP/1.1", BadRequest::Method),
            (b"GET metrics HTTP/1.1", BadRequest::Target),
            (b"GET http://localhost/metrics HTTP/1.1", BadRequest::Target),
            (b"OPTIONS * HTTP/1.1", BadRequest::Target),
            (b"GET /met\x00rics HTTP/1.1", BadRequest::Target),
            (b"GET /m\xc3\xa9trics HTTP/1.1", BadRequest::Target),
            (b"GET /metrics HTTP/2.0", BadRequest::Version),
            (b"GET /metrics HTTP/0.9", BadRequest::Version),
            (b"GET /metrics HTTP/1.1\r", BadRequest::Version),
        ] {
            assert_eq!(
                parse_request_line(line),
                Err(error),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn huge_request_lines_do_not_panic() {
        let long_path = [&b"GET /"[..], &[b'a'; 100_000], b" HTTP/1.1"].concat();
        assert_eq!(parse_request_line(&long_path).unwrap().path.len(), 100_001);
        assert_eq!(parse_request_line(&[b' '; 100_000]), Err(BadRequest::Shape));
        assert_eq!(parse_request_line(&[b'G'; 100_000]), Err(BadRequest::Shape));
        let every_byte: Vec<u8> = (0..=255).cycle().take(100_000).collect();
        assert!(parse_request_line(&every_byte).is_err());
    }

    #[test]
    fn finds_the_end_of_the_head() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest";
        assert_eq!(head_end(head, 0), Some(head.len() - 4));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\n", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n", 0), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r", 0), None);
        assert_eq!(head_end(b"abc", 10), None);
        // The blank line split across two reads, found from two bytes before the new ones.
        let head = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(head_end(head, head.len() - 1 - 2), Some(head.len()));
        assert_eq!(
            first_line(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            b"GET / HTTP/1.1"
        );
        assert_eq!(first_line(b"GET / HTTP/1.0\n\n"), b"GET / HTTP/1.0");
        assert_eq!(first_line(b""), b"");
    }

    #[test]
    fn routes_by_method_and_path() {
        let route_of = |line: &[u8]| route(&parse_request_line(line).unwrap());
        assert_eq!(route_of(b"GET /metrics HTTP/1.1"), (Route::Metrics, true));
        assert_eq!(route_of(b"HEAD /metrics HTTP/1.1"), (Route::Metrics, false));
        assert_eq!(route_of(b"GET / HTTP/1.1"), (Route::Index, true));
        assert_eq!(route_of(b"GET /metrics/ HTTP/1.1"), (Route::NotFound, true));
        assert_eq!(route_of(b"HEAD /nope HTTP/1.1"), (Route::NotFound, false));
        assert_eq!(
            route_of(b"POST /metrics HTTP/1.1"),
            (Route::MethodNotAllowed, true)
        );
        assert_eq!(
            route_of(b"get /metrics HTTP/1.1"),
            (Route::MethodNotAllowed, true)
        );
    }

    /// `serve` on a loopback port, with its stop sender.
    async fn start() -> (SocketAddr, watch::Sender<bool>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let snapshot: SnapshotFn = Arc::new(|| Snapshot {
            store_paths: 4242,
            ..Snapshot::default()
        });
        (addr, stop, tokio::spawn(serve(listener, snapshot, stopped)))
    }

    /// Sends `request` and reads the answer to its end: the status line, the headers (in
    /// lower case) and the body.
    async fn exchange(addr: SocketAddr, request: &[u8]) -> (String, Vec<String>, Vec<u8>) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let end = head_end(&answer, 0).unwrap();
        let head = String::from_utf8(answer[..end].to_vec()).unwrap();
        let mut lines = head.split("\r\n").filter(|l| !l.is_empty());
        let status = lines.next().unwrap().to_owned();
        let headers: Vec<String> = lines.map(str::to_ascii_lowercase).collect();
        (status, headers, answer[end..].to_vec())
    }

    fn content_length(headers: &[String]) -> usize {
        let value = headers
            .iter()
            .find_map(|h| h.strip_prefix("content-length: "))
            .unwrap();
        value.parse().unwrap()
    }

    #[tokio::test]
    async fn get_metrics_answers_the_exposition() {
        let (addr, _stop, _task) = start().await;
        let (status, headers, body) = exchange(
            addr,
            b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(headers.contains(&"content-type: text/plain; version=0.0.4; charset=utf-8".into()));
        assert!(headers.contains(&"connection: close".into()));
        assert_eq!(content_length(&headers), body.len());
        let body = String::from_utf8(body).unwrap();
        assert!(body.contains("\nnixbuild_store_paths 4242\n"), "{body}");
        assert!(body.contains("# TYPE nixbuild_build_info gauge\n"));

        let (status, headers, body) = exchange(addr, b"GET /metrics HTTP/1.0\n\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(content_length(&headers), body.len());

        let (status, headers, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(content_length(&headers) > 1000);
        assert!(body.is_empty());

        let (status, _, body) = exchange(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(String::from_utf8(body).unwrap().contains("/metrics"));
    }

    #[tokio::test]
    async fn other_paths_methods_and_malformed_requests_are_refused() {
        let (addr, _stop, _task) = start().await;
        let (status, headers, body) = exchange(addr, b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(content_length(&headers), body.len());

        let (status, headers, _) =
            exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
        assert!(headers.contains(&"allow: get, head".into()));

        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/2.0\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 505 HTTP Version Not Supported");
        let (status, _, _) = exchange(addr, b"\x16\x03\x01\x02\x00\x01\x00\n\n").await;
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
    }

    #[tokio::test]
    async fn an_oversized_head_gets_431() {
        let (addr, _stop, _task) = start().await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        request.resize(2 * MAX_HEAD, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let (status, headers, body) = exchange(addr, &request).await;
        assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
        assert!(headers.contains(&"connection: close".into()));
        assert_eq!(content_length(&headers), body.len());
        // A head of exactly the limit is still read.
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Long: ".to_vec();
        request.resize(MAX_HEAD - 4, b'a');
        request.extend_from_slice(b"\r\n\r\n");
        let (status, _, _) = exchange(addr, &request).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        let (addr, _stop, _task) = start().await;
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\n")
                .await
                .unwrap();
            idle.push(stream);
        }
        // The connections are accepted in order, so this one finds every slot taken.
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut answer));
        assert_eq!(read.await.unwrap().unwrap(), 0);
        // Closing the idle ones frees their slots.
        drop(idle);
        let mut status = String::new();
        for _ in 0..100 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
            status =
                String::from_utf8_lossy(answer.split(|&b| b == b'\r').next().unwrap()).into_owned();
            if !answer.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[tokio::test]
    async fn stop_ends_serve() {
        let (addr, stop, task) = start().await;
        // A connection that never sends its head does not hold serve up.
        let _idle = TcpStream::connect(addr).await.unwrap();
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn a_panicking_snapshot_answers_500() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_stop, stopped) = watch::channel(false);
        let snapshot: SnapshotFn = Arc::new(|| panic!("the store is gone"));
        let _task = tokio::spawn(serve(listener, snapshot, stopped));
        let (status, _, _) = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert_eq!(status, "HTTP/1.1 500 Internal Server Error");
    }
}
