//! BuildOptions (docs/serve-protocol.md §5.2), BuildResult (§5.3), its status codes (§5.5) and
//! `builtOutputs` in the serve 2.6/2.7 and 2.8 forms (§5.4).

use std::collections::{BTreeMap, BTreeSet};

use bytes::BufMut;

use super::fields::{parse_store_path, put_store_path};
use super::{ProtocolVersion, ReadResult, ServeError};
use crate::hash::{Hash, HashAlgo};
use crate::store_path::StorePath;
use crate::wire::{self, BufMutExt, Reader};

/// The build settings a client sends with BuildPaths and BuildDerivation. Fields the
/// negotiated version does not carry are not sent and decode as 0 / false.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildOptions {
    /// Seconds without log output before the build is killed; 0 = no limit.
    pub max_silent_time: u32,
    /// Wall-clock seconds; 0 = no limit.
    pub build_timeout: u32,
    /// Bytes of log output; 0 = no limit (v ≥ 2.2).
    pub max_log_size: u64,
    /// Extra rounds for `--repeat`/`--check` (v ≥ 2.3).
    pub nr_repeats: u32,
    /// Only meaningful with `nr_repeats > 0` (v ≥ 2.3). An "int" upstream reads as a bool:
    /// any non-zero value is true.
    pub enforce_determinism: bool,
    /// Keep the build directory of a failed build (v ≥ 2.7). Non-zero is true, as upstream.
    pub keep_failed: bool,
}

impl BuildOptions {
    /// Reads the options as a client of version `v` sends them.
    pub fn read(r: &mut Reader<'_>, v: ProtocolVersion) -> ReadResult<Self> {
        let mut o = BuildOptions {
            max_silent_time: r.int("maxSilentTime")?,
            build_timeout: r.int("buildTimeout")?,
            ..Default::default()
        };
        if v >= ProtocolVersion::V2_2 {
            o.max_log_size = r.u64()?;
        }
        if v >= ProtocolVersion::V2_3 {
            o.nr_repeats = r.int("nrRepeats")?;
            o.enforce_determinism = r.bool("enforceDeterminism")?;
        }
        if v >= ProtocolVersion::V2_7 {
            o.keep_failed = r.bool("keepFailed")?;
        }
        Ok(o)
    }

    /// Writes the options for version `v`.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut impl BufMut) {
        buf.put_wire_u64(self.max_silent_time.into());
        buf.put_wire_u64(self.build_timeout.into());
        if v >= ProtocolVersion::V2_2 {
            buf.put_wire_u64(self.max_log_size);
        }
        if v >= ProtocolVersion::V2_3 {
            buf.put_wire_u64(self.nr_repeats.into());
            buf.put_wire_bool(self.enforce_determinism);
        }
        if v >= ProtocolVersion::V2_7 {
            buf.put_wire_bool(self.keep_failed);
        }
    }
}

/// The outcome of a build (docs/serve-protocol.md §5.5), as its wire value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum BuildStatus {
    /// The builder ran and the outputs were registered.
    Built = 0,
    /// Substituted (not from BuildDerivation).
    Substituted = 1,
    /// All outputs were already valid.
    AlreadyValid = 2,
    /// The builder failed (sandboxed, input-addressed derivation), or out of memory.
    PermanentFailure = 3,
    /// Input rejected.
    InputRejected = 4,
    /// The output check failed, e.g. a fixed-output hash mismatch.
    OutputRejected = 5,
    /// A failure worth retrying (fixed-output builder failure, disk full).
    TransientFailure = 6,
    /// No longer used.
    CachedFailure = 7,
    /// `maxSilentTime` or `buildTimeout` exceeded.
    TimedOut = 8,
    /// Any other failure.
    MiscFailure = 9,
    /// A dependency failed.
    DependencyFailed = 10,
    /// `maxLogSize` exceeded.
    LogLimitExceeded = 11,
    /// Repeated builds differed.
    NotDeterministic = 12,
    /// A CA derivation resolved to already valid outputs (Nix ≥ 2.4).
    ResolvesToAlreadyValid = 13,
    /// No substituters.
    NoSubstituters = 14,
}

impl BuildStatus {
    const ALL: [BuildStatus; 15] = [
        BuildStatus::Built,
        BuildStatus::Substituted,
        BuildStatus::AlreadyValid,
        BuildStatus::PermanentFailure,
        BuildStatus::InputRejected,
        BuildStatus::OutputRejected,
        BuildStatus::TransientFailure,
        BuildStatus::CachedFailure,
        BuildStatus::TimedOut,
        BuildStatus::MiscFailure,
        BuildStatus::DependencyFailed,
        BuildStatus::LogLimitExceeded,
        BuildStatus::NotDeterministic,
        BuildStatus::ResolvesToAlreadyValid,
        BuildStatus::NoSubstituters,
    ];

    /// The status with wire value `n`, if it is one of 0–14.
    pub fn from_wire(n: u64) -> Option<Self> {
        usize::try_from(n)
            .ok()
            .and_then(|i| Self::ALL.get(i).copied())
    }

    /// The wire value.
    pub fn to_wire(self) -> u64 {
        self as u64
    }

    /// Whether Nix ≥ 2.4 clients count the status as success (0, 1, 2, 13).
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// One entry of `builtOutputs`: where an output ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltOutput {
    /// The derivation hash of the serve 2.6/2.7 key `sha256:<hex>!<output>`:
    /// `hashDerivationModulo` of the BasicDerivation as received (docs/serve-protocol.md §5.4).
    /// `None` when unknown (decoded from the serve 2.8 form, which has no key hash); it is then
    /// written as 64 zeros in the 2.6 form, as Nix 2.35's compatibility writer does.
    pub drv_hash: Option<Hash>,
    /// The output path.
    pub out_path: StorePath,
    /// Signatures of the realisation (`keyname:base64`).
    pub signatures: BTreeSet<String>,
}

/// The answer to BuildDerivation (docs/serve-protocol.md §5.3). Fields the negotiated version does
/// not carry are not sent and decode as 0 / empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// The outcome.
    pub status: BuildStatus,
    /// `""` on success; otherwise the message the client shows.
    pub error_msg: Vec<u8>,
    /// How many times the derivation was built (v ≥ 2.3).
    pub times_built: u32,
    /// Whether repeated builds differed (v ≥ 2.3).
    pub is_non_deterministic: bool,
    /// Unix seconds when the build started (v ≥ 2.3).
    pub start_time: u64,
    /// Unix seconds when the build stopped (v ≥ 2.3).
    pub stop_time: u64,
    /// Every output by name on success, empty on failure (v ≥ 2.6).
    pub built_outputs: BTreeMap<String, BuiltOutput>,
}

impl BuildResult {
    /// A result with `status` and `error_msg` and nothing else: no build ran, no times, no
    /// outputs.
    pub fn without_build(status: BuildStatus, error_msg: Vec<u8>) -> Self {
        BuildResult {
            status,
            error_msg,
            times_built: 0,
            is_non_deterministic: false,
            start_time: 0,
            stop_time: 0,
            built_outputs: BTreeMap::new(),
        }
    }

    /// Reads the status and message, the start of a BuildResult in both protocols; the
    /// rest is empty.
    pub(crate) fn read_head(r: &mut Reader<'_>, limits: &wire::Limits) -> ReadResult<Self> {
        let offset = r.position();
        let value = u64::from(r.int("status")?);
        let status =
            BuildStatus::from_wire(value).ok_or(ServeError::UnknownStatus { offset, value })?;
        let error_msg = r.bytes("errorMsg", limits.max_string_len)?.to_vec();
        Ok(BuildResult::without_build(status, error_msg))
    }

    /// Reads timesBuilt, isNonDeterministic, startTime and stopTime.
    pub(crate) fn read_times(&mut self, r: &mut Reader<'_>) -> ReadResult<()> {
        self.times_built = r.int("timesBuilt")?;
        self.is_non_deterministic = r.bool("isNonDeterministic")?;
        self.start_time = r.u64()?;
        self.stop_time = r.u64()?;
        Ok(())
    }

    /// Writes the status and message.
    pub(crate) fn put_head(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(self.status.to_wire());
        buf.put_wire_bytes(&self.error_msg);
    }

    /// Writes timesBuilt, isNonDeterministic, startTime and stopTime.
    pub(crate) fn put_times(&self, buf: &mut impl BufMut) {
        buf.put_wire_u64(self.times_built.into());
        buf.put_wire_bool(self.is_non_deterministic);
        buf.put_wire_u64(self.start_time);
        buf.put_wire_u64(self.stop_time);
    }

    /// Reads a BuildResult as a server of version `v` sends it.
    pub fn read(r: &mut Reader<'_>, v: ProtocolVersion, limits: &wire::Limits) -> ReadResult<Self> {
        let mut res = Self::read_head(r, limits)?;
        if v >= ProtocolVersion::V2_3 {
            res.read_times(r)?;
        }
        if v >= ProtocolVersion::V2_8 {
            res.built_outputs = read_outputs_v28(r, limits)?;
        } else if v >= ProtocolVersion::V2_6 {
            res.built_outputs = read_outputs_v26(r, limits)?;
        }
        Ok(res)
    }

    /// Writes the BuildResult for version `v`.
    pub fn encode(&self, v: ProtocolVersion, buf: &mut impl BufMut) {
        self.put_head(buf);
        if v >= ProtocolVersion::V2_3 {
            self.put_times(buf);
        }
        if v >= ProtocolVersion::V2_8 {
            buf.put_wire_u64(self.built_outputs.len() as u64);
            for (name, o) in &self.built_outputs {
                buf.put_wire_bytes(name.as_bytes());
                put_store_path(buf, &o.out_path);
                buf.put_wire_strings(&o.signatures);
            }
        } else if v >= ProtocolVersion::V2_6 {
            put_outputs_v26(buf, &self.built_outputs);
        }
    }
}

/// Writes builtOutputs in the serve 2.6/2.7 form (also the worker protocol's from 1.28 on):
/// DrvOutput id → realisation JSON, ordered by id.
pub(crate) fn put_outputs_v26(buf: &mut impl BufMut, outputs: &BTreeMap<String, BuiltOutput>) {
    let mut entries: Vec<(String, String)> = outputs
        .iter()
        .map(|(name, o)| {
            let key = drv_output_id(o.drv_hash.as_ref(), name);
            let json = realisation_json(&key, o);
            (key, json)
        })
        .collect();
    // Keys sort by derivation hash first: the map is ordered by key on the wire.
    entries.sort();
    buf.put_wire_u64(entries.len() as u64);
    for (key, json) in entries {
        buf.put_wire_bytes(key.as_bytes());
        buf.put_wire_bytes(json.as_bytes());
    }
}

/// The DrvOutput id `sha256:<hex>!<output>` of output `output` of the derivation whose hash
/// modulo is `hash`; zeros when the hash is unknown.
pub fn drv_output_id(hash: Option<&Hash>, output: &str) -> String {
    match hash {
        Some(h) => format!("{}:{}!{output}", h.algo().name(), h.to_base16()),
        None => format!("sha256:{}!{output}", "0".repeat(64)),
    }
}

/// The realisation JSON exactly as nlohmann's `dump()` writes it: sorted keys, no whitespace,
/// `outPath` a basename.
pub fn realisation_json(id: &str, o: &BuiltOutput) -> String {
    let mut s = String::from(r#"{"dependentRealisations":{},"id":"#);
    json_string(&mut s, id);
    s.push_str(r#","outPath":"#);
    json_string(&mut s, &o.out_path.base_name());
    s.push_str(r#","signatures":["#);
    for (i, sig) in o.signatures.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        json_string(&mut s, sig);
    }
    s.push_str("]}");
    s
}

/// Appends `v` as a JSON string with nlohmann's escapes (non-ASCII passes through).
fn json_string(out: &mut String, v: &str) {
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Reads builtOutputs in the serve 2.8 form: name → (full outPath, signatures).
fn read_outputs_v28(
    r: &mut Reader<'_>,
    limits: &wire::Limits,
) -> ReadResult<BTreeMap<String, BuiltOutput>> {
    let n = r.count("builtOutputs", limits.max_list_len)?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        let name = r
            .str("output name", limits.max_short_string_len)?
            .to_owned();
        let offset = r.position();
        let out_path = parse_store_path(
            r.bytes("outPath", limits.max_short_string_len)?,
            "outPath",
            offset,
        )?;
        let signatures = r.string_set("signatures", limits, limits.max_short_string_len)?;
        map.insert(
            name,
            BuiltOutput {
                drv_hash: None,
                out_path,
                signatures,
            },
        );
    }
    Ok(map)
}

/// Reads builtOutputs in the serve 2.6/2.7 form: DrvOutput id → realisation JSON.
pub(crate) fn read_outputs_v26(
    r: &mut Reader<'_>,
    limits: &wire::Limits,
) -> ReadResult<BTreeMap<String, BuiltOutput>> {
    let n = r.count("builtOutputs", limits.max_list_len)?;
    let mut map = BTreeMap::new();
    for _ in 0..n {
        let key_offset = r.position();
        let key = r.str("builtOutputs key", limits.max_short_string_len)?;
        let bad_key = |reason: &str| ServeError::Malformed {
            field: "builtOutputs key",
            offset: key_offset,
            reason: reason.to_owned(),
        };
        let (hash_s, name) = key.rsplit_once('!').ok_or_else(|| bad_key("no '!'"))?;
        if name.is_empty() {
            return Err(bad_key("empty output name").into());
        }
        let hash = Hash::parse_any(hash_s, None).map_err(|e| bad_key(&e.to_string()))?;
        let zero = Hash::new(HashAlgo::Sha256, &[0; 32]).ok();
        let drv_hash = if Some(hash) == zero { None } else { Some(hash) };
        let json_offset = r.position();
        let json = r.bytes("realisation", limits.max_string_len)?;
        let bad_json = |reason: String| ServeError::Malformed {
            field: "realisation",
            offset: json_offset,
            reason,
        };
        let real = json::parse_realisation(json).map_err(bad_json)?;
        if real.id != key {
            return Err(bad_json(format!("id {:?} differs from key {key:?}", real.id)).into());
        }
        let out_path = StorePath::from_base_name(real.out_path.as_bytes())
            .map_err(|e| bad_json(format!("outPath: {e}")))?;
        map.insert(
            name.to_owned(),
            BuiltOutput {
                drv_hash,
                out_path,
                signatures: real.signatures,
            },
        );
    }
    Ok(map)
}

/// A small reader for the realisation JSON of the serve 2.6/2.7 form. It accepts any
/// whitespace and key order, strings with every JSON escape, and an empty
/// `dependentRealisations`; anything else is an error (those only come from the experimental
/// `ca-derivations` feature, which nixbuild does not serve).
mod json {
    use std::collections::BTreeSet;

    /// The fields nixbuild reads from a realisation.
    pub(super) struct Realisation {
        pub id: String,
        pub out_path: String,
        pub signatures: BTreeSet<String>,
    }

    struct P<'a> {
        s: &'a [u8],
        i: usize,
    }

    impl P<'_> {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(|c| c.is_ascii_whitespace()) {
                self.i += 1;
            }
        }

        fn eat(&mut self, c: u8) -> Result<(), String> {
            self.ws();
            if self.s.get(self.i) == Some(&c) {
                self.i += 1;
                Ok(())
            } else {
                Err(format!("expected '{}' at byte {}", c as char, self.i))
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.ws();
            self.s.get(self.i).copied()
        }

        fn hex4(&mut self) -> Result<u32, String> {
            let h = self
                .s
                .get(self.i..self.i + 4)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u32::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad \\u escape at byte {}", self.i))?;
            self.i += 4;
            Ok(h)
        }

        fn string(&mut self) -> Result<String, String> {
            self.eat(b'"')?;
            let mut out = Vec::new();
            loop {
                let c = *self
                    .s
                    .get(self.i)
                    .ok_or_else(|| "unterminated string".to_owned())?;
                self.i += 1;
                match c {
                    b'"' => break,
                    b'\\' => {
                        let e = *self
                            .s
                            .get(self.i)
                            .ok_or_else(|| "unterminated escape".to_owned())?;
                        self.i += 1;
                        let ch = match e {
                            b'"' => '"',
                            b'\\' => '\\',
                            b'/' => '/',
                            b'b' => '\u{8}',
                            b'f' => '\u{c}',
                            b'n' => '\n',
                            b'r' => '\r',
                            b't' => '\t',
                            b'u' => {
                                let mut cp = self.hex4()?;
                                if (0xd800..0xdc00).contains(&cp)
                                    && self.s.get(self.i..self.i + 2) == Some(b"\\u")
                                {
                                    self.i += 2;
                                    let lo = self.hex4()?;
                                    cp =
                                        0x10000 + ((cp - 0xd800) << 10) + (lo.wrapping_sub(0xdc00));
                                }
                                char::from_u32(cp)
                                    .ok_or_else(|| format!("bad code point {cp:#x}"))?
                            }
                            _ => return Err(format!("bad escape at byte {}", self.i - 1)),
                        };
                        let mut b = [0; 4];
                        out.extend_from_slice(ch.encode_utf8(&mut b).as_bytes());
                    }
                    c if c < 0x20 => return Err("control character in string".to_owned()),
                    c => out.push(c),
                }
            }
            String::from_utf8(out).map_err(|_| "string is not UTF-8".to_owned())
        }
    }

    /// Parses a realisation object.
    pub(super) fn parse_realisation(s: &[u8]) -> Result<Realisation, String> {
        let mut p = P { s, i: 0 };
        let (mut id, mut out_path, mut signatures) = (None, None, BTreeSet::new());
        p.eat(b'{')?;
        if p.peek() != Some(b'}') {
            loop {
                let key = p.string()?;
                p.eat(b':')?;
                match key.as_str() {
                    "id" => id = Some(p.string()?),
                    "outPath" => out_path = Some(p.string()?),
                    "signatures" => {
                        p.eat(b'[')?;
                        if p.peek() != Some(b']') {
                            loop {
                                signatures.insert(p.string()?);
                                if p.peek() != Some(b',') {
                                    break;
                                }
                                p.eat(b',')?;
                            }
                        }
                        p.eat(b']')?;
                    }
                    "dependentRealisations" => {
                        p.eat(b'{')?;
                        p.eat(b'}')
                            .map_err(|_| "non-empty dependentRealisations".to_owned())?;
                    }
                    other => return Err(format!("unknown key {other:?}")),
                }
                if p.peek() != Some(b',') {
                    break;
                }
                p.eat(b',')?;
            }
        }
        p.eat(b'}')?;
        p.ws();
        if p.i != s.len() {
            return Err(format!("trailing bytes at byte {}", p.i));
        }
        Ok(Realisation {
            id: id.ok_or("missing id")?,
            out_path: out_path.ok_or("missing outPath")?,
            signatures,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn json_escapes_like_nlohmann() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n\u{1}é/");
        assert_eq!(s, r#""a\"b\\c\n\u0001é/""#);
    }

    #[test]
    fn realisation_json_parser_accepts_whitespace_escapes_and_the_2_35_form() {
        let r = json::parse_realisation(
            br#" { "outPath" : "x\u0041\/" , "id":"k", "signatures":["b","a"] } "#,
        )
        .unwrap();
        assert_eq!((r.id.as_str(), r.out_path.as_str()), ("k", "xA/"));
        assert_eq!(r.signatures.len(), 2);
        let r = json::parse_realisation(br#"{"id":"k","outPath":"p"}"#).unwrap();
        assert!(r.signatures.is_empty());
        for bad in [
            &br#"{"id":"k"}"#[..],
            br#"{"id":"k","outPath":"p","x":1}"#,
            br#"{"id":"k","outPath":"p","dependentRealisations":{"a":"b"}}"#,
            br#"{"id":"k","outPath":"p"} x"#,
            br#"{"id":"k\q","outPath":"p"}"#,
            br#"{"id":"k"#,
        ] {
            assert!(json::parse_realisation(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn status_codes_are_0_to_14() {
        for n in 0..15u64 {
            assert_eq!(BuildStatus::from_wire(n).unwrap().to_wire(), n);
        }
        assert_eq!(BuildStatus::from_wire(15), None);
        assert_eq!(BuildStatus::from_wire(u64::MAX), None);
        assert!(BuildStatus::ResolvesToAlreadyValid.is_success());
        assert!(!BuildStatus::PermanentFailure.is_success());
    }

    #[test]
    fn options_field_count_follows_the_version() {
        let o = BuildOptions {
            max_silent_time: 1,
            build_timeout: 2,
            max_log_size: 3,
            nr_repeats: 4,
            enforce_determinism: true,
            keep_failed: true,
        };
        for (v, n) in [
            (ProtocolVersion::V2_0, 2),
            (ProtocolVersion::V2_2, 3),
            (ProtocolVersion::V2_5, 5),
            (ProtocolVersion::V2_6, 5),
            (ProtocolVersion::V2_7, 6),
        ] {
            let mut b = Vec::new();
            o.encode(v, &mut b);
            assert_eq!(b.len(), 8 * n, "{v:?}");
        }
    }

    #[test]
    fn options_int_fields_reject_2_pow_32_and_bools_reject_2() {
        let mut b = Vec::new();
        for n in [0u64, 0, 0, 0, 1, 1] {
            b.put_wire_u64(n);
        }
        let o = BuildOptions::read(&mut Reader::new(&b), ProtocolVersion::V2_7).unwrap();
        assert!(o.enforce_determinism && o.keep_failed);
        b[40..48].copy_from_slice(&7u64.to_le_bytes());
        assert!(matches!(
            BuildOptions::read(&mut Reader::new(&b), ProtocolVersion::V2_7),
            Err(wire::Stop::Invalid(ServeError::Wire(
                wire::WireError::BadBool {
                    field: "keepFailed",
                    value: 7,
                    ..
                }
            )))
        ));
        b[..8].copy_from_slice(&(1u64 << 32).to_le_bytes());
        assert!(matches!(
            BuildOptions::read(&mut Reader::new(&b), ProtocolVersion::V2_7),
            Err(wire::Stop::Invalid(ServeError::Wire(
                wire::WireError::IntTooLarge {
                    field: "maxSilentTime",
                    ..
                }
            )))
        ));
    }
}
