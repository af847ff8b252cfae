//! What passes between the daemon and the sandbox helper process: the plan, as JSON on the
//! helper's stdin ([`encode_plan`]), and the report line that ends the helper's stderr
//! ([`parse_report`]).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::process::ExitStatus;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::SandboxPlan;

/// Why the helper could not decode the plan it was given.
#[derive(Debug, thiserror::Error)]
pub enum PlanDecodeError {
    /// The bytes are not a plan in the format [`encode_plan`] writes.
    #[error("the plan is not valid: {0}")]
    Decode(#[from] serde_json::Error),
}

/// What the daemon writes to the helper's stdin (then closes it).
pub fn encode_plan(plan: &SandboxPlan) -> Vec<u8> {
    // The plan has no maps and every byte string goes through `bytes`, so serialising cannot
    // fail; if it ever did, the helper would report the empty plan as a set-up failure.
    serde_json::to_vec(plan).unwrap_or_default()
}

/// The inverse of [`encode_plan`], run by the helper.
pub fn decode_plan(bytes: &[u8]) -> Result<SandboxPlan, PlanDecodeError> {
    Ok(serde_json::from_slice(bytes)?)
}

/// How a build run by the helper ended, from the report line the helper writes last on its
/// stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelperReport {
    /// The builder (PID 1 of the sandbox) exited with this code.
    Exited(i32),
    /// The builder was killed by this signal.
    Signaled(i32),
    /// The sandbox could not be set up (or the helper failed); the builder never ran. The
    /// message names the step and the error.
    SetupFailed(String),
}

/// The prefix of the report line.
pub(crate) const REPORT_PREFIX: &str = "nixbuild-sandbox-report: ";

impl HelperReport {
    /// The report line the helper writes last on its stderr (without the newline).
    pub(crate) fn line(&self) -> String {
        match self {
            HelperReport::Exited(code) => format!("{REPORT_PREFIX}exited {code}"),
            HelperReport::Signaled(sig) => format!("{REPORT_PREFIX}signaled {sig}"),
            HelperReport::SetupFailed(msg) => {
                format!("{REPORT_PREFIX}setup-failed {}", msg.replace('\n', " "))
            }
        }
    }

    fn from_line(rest: &str) -> Option<HelperReport> {
        let (kind, arg) = rest.split_once(' ').unwrap_or((rest, ""));
        match kind {
            "exited" => arg.parse().ok().map(HelperReport::Exited),
            "signaled" => arg.parse().ok().map(HelperReport::Signaled),
            "setup-failed" => Some(HelperReport::SetupFailed(arg.to_string())),
            _ => None,
        }
    }
}

/// How much of the helper's stderr a missing-report message quotes.
const STDERR_TAIL: usize = 2000;

/// Reads the helper's report from its whole stderr and its exit status. A helper that ended
/// without a report (killed, or crashed) gives [`HelperReport::SetupFailed`] naming its status
/// and quoting the end of its stderr.
pub fn parse_report(stderr: &[u8], status: ExitStatus) -> HelperReport {
    let text = String::from_utf8_lossy(stderr);
    if let Some(report) = text
        .lines()
        .rev()
        .filter_map(|l| l.strip_prefix(REPORT_PREFIX))
        .find_map(HelperReport::from_line)
    {
        return report;
    }
    let tail_start = text
        .char_indices()
        .rev()
        .nth(STDERR_TAIL)
        .map_or(0, |(i, _)| i);
    HelperReport::SetupFailed(format!(
        "the sandbox helper ended ({status}) without a report; its stderr ends with: {:?}",
        &text[tail_start..]
    ))
}

/// `deserialize_with` for the plan's `&'static str` fields. Only the helper decodes a plan,
/// once per process, so the few leaked bytes live exactly as long as they are needed.
pub(crate) fn leak_str<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
    String::deserialize(d).map(|s| &*Box::leak(s.into_boxed_str()))
}

/// A byte string in the JSON: a JSON string when it is UTF-8 (the common case, and readable),
/// else an array of numbers. Paths and environment values are arbitrary bytes on Linux.
pub(crate) struct Bytes(Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(&self.0) {
            Ok(text) => s.serialize_str(text),
            Err(_) => s.serialize_bytes(&self.0),
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or an array of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Bytes, E> {
                Ok(Bytes(v.as_bytes().to_vec()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(b) = seq.next_element::<u8>()? {
                    out.push(b);
                }
                Ok(Bytes(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A plan field made of byte strings, with the form it takes in the JSON.
pub(crate) trait WireForm: Sized {
    /// The serialisable form.
    type Repr: Serialize + for<'de> Deserialize<'de>;
    /// To the JSON form.
    fn to_repr(&self) -> Self::Repr;
    /// From the JSON form.
    fn from_repr(repr: Self::Repr) -> Self;
}

impl WireForm for Vec<u8> {
    type Repr = Bytes;
    fn to_repr(&self) -> Bytes {
        Bytes(self.clone())
    }
    fn from_repr(repr: Bytes) -> Self {
        repr.0
    }
}

impl WireForm for PathBuf {
    type Repr = Bytes;
    fn to_repr(&self) -> Bytes {
        Bytes(self.as_os_str().as_bytes().to_vec())
    }
    fn from_repr(repr: Bytes) -> Self {
        PathBuf::from(OsString::from_vec(repr.0))
    }
}

impl WireForm for String {
    type Repr = String;
    fn to_repr(&self) -> String {
        self.clone()
    }
    fn from_repr(repr: String) -> Self {
        repr
    }
}

impl<T: WireForm> WireForm for Vec<T> {
    type Repr = Vec<T::Repr>;
    fn to_repr(&self) -> Self::Repr {
        self.iter().map(T::to_repr).collect()
    }
    fn from_repr(repr: Self::Repr) -> Self {
        repr.into_iter().map(T::from_repr).collect()
    }
}

impl<A: WireForm, B: WireForm> WireForm for (A, B) {
    type Repr = (A::Repr, B::Repr);
    fn to_repr(&self) -> Self::Repr {
        (self.0.to_repr(), self.1.to_repr())
    }
    fn from_repr(repr: Self::Repr) -> Self {
        (A::from_repr(repr.0), B::from_repr(repr.1))
    }
}

/// `#[serde(with = "crate::helper_messages::bytes")]` for fields made of byte strings and paths.
pub(crate) mod bytes {
    use super::WireForm;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Serialises through the JSON form.
    pub(crate) fn serialize<T: WireForm, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.to_repr().serialize(s)
    }

    /// Deserialises through the JSON form.
    pub(crate) fn deserialize<'de, T: WireForm, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        T::Repr::deserialize(d).map(T::from_repr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{sample_host, sample_request};
    use crate::{plan, HostOp, InputKind, InputPath};
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn a_plan_survives_the_trip_to_the_helper_byte_for_byte() {
        let mut req = sample_request();
        // Paths and values that are not UTF-8 travel as byte arrays.
        req.inputs.push(InputPath {
            base_name: "1b9p07z77phvv2hf6gm9f28syp39f1ag-link".into(),
            host_path: "/var/lib/nixbuild/objects/k9".into(),
            kind: InputKind::Symlink {
                target: PathBuf::from(OsString::from_vec(b"/nix/store/\xff\xfe".to_vec())),
            },
        });
        req.env.insert(b"latin1".to_vec(), b"caf\xe9".to_vec());
        req.args.push(b"\xc3\x28".to_vec());
        let plan = plan(&req, &sample_host()).expect("plan");
        assert!(plan.host_ops.iter().any(|op| matches!(op,
            HostOp::Symlink { target, .. } if target.as_os_str().as_bytes().ends_with(b"\xff\xfe"))));
        let bytes = encode_plan(&plan);
        assert_eq!(decode_plan(&bytes).expect("decodes"), plan);
        // Readable where it can be.
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            text.contains("\"/var/lib/nixbuild/builds/b1/root\""),
            "{text}"
        );
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(decode_plan(b"{\"steps\": [").is_err());
        assert!(decode_plan(b"").is_err());
        assert!(decode_plan(b"{}").is_err());
    }

    #[test]
    fn reports_round_trip_and_the_last_one_counts() {
        let ok = ExitStatus::from_raw(0);
        for r in [
            HelperReport::Exited(0),
            HelperReport::Exited(3),
            HelperReport::Signaled(9),
            HelperReport::SetupFailed("mount: bind /a onto /b: No such file".into()),
        ] {
            let stderr = format!("some diagnostic\n{}\n", r.line());
            assert_eq!(parse_report(stderr.as_bytes(), ok), r);
        }
        let two = format!(
            "{}\n{}\n",
            HelperReport::Exited(1).line(),
            HelperReport::Exited(2).line()
        );
        assert_eq!(parse_report(two.as_bytes(), ok), HelperReport::Exited(2));
        // Newlines in a message cannot forge a second report line.
        let forged = HelperReport::SetupFailed(format!("x\n{REPORT_PREFIX}exited 0"));
        assert!(matches!(
            parse_report(format!("{}\n", forged.line()).as_bytes(), ok),
            HelperReport::SetupFailed(m) if m.starts_with('x')
        ));
    }

    #[test]
    fn a_helper_without_a_report_is_a_setup_failure_naming_its_status() {
        let killed = ExitStatus::from_raw(9);
        match parse_report(b"partial diagnostic", killed) {
            HelperReport::SetupFailed(m) => {
                assert!(m.contains("signal: 9"), "{m}");
                assert!(m.contains("partial diagnostic"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        let long = "é".repeat(10_000);
        match parse_report(long.as_bytes(), killed) {
            HelperReport::SetupFailed(m) => assert!(m.len() < 3 * STDERR_TAIL + 200),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_report(format!("{REPORT_PREFIX}exited nope\n").as_bytes(), killed),
            HelperReport::SetupFailed(_)
        ));
    }
}
