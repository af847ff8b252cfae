//! Structured attributes (`__structuredAttrs = true`): the derivation's attributes as one JSON
//! object in the `__json` environment variable, handed to the builder as `.attrs.json` and
//! `.attrs.sh` (docs/sandbox.md C.10).
//!
//! The files are byte-identical to a current Nix's: `.attrs.json` is the object re-serialised
//! compactly with its keys sorted, control characters escaped as `\u00xx` and floats in the
//! shortest form that reads back (`1e+30`, `3.0`); `.attrs.sh` declares each top-level key
//! that is a shell name and whose value is a string, an integral number, a boolean, `null`, or
//! an array or object of those, quoting every string in single quotes.

use std::collections::BTreeMap;
use std::io;

use serde_json::{Map, Value};

use super::paths::hash_placeholder;

/// The environment variable holding the attributes.
pub const JSON_VAR: &[u8] = b"__json";

/// Why the `__json` attribute could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StructuredAttrsError {
    /// `__json` is not a JSON object.
    #[error("cannot process __json attribute: {0}")]
    Json(String),
    /// An attribute that must have a certain JSON type has another.
    #[error("attribute '{attr}' of the structured attributes must be {expected}")]
    Type {
        /// The attribute, with the path into it (`outputChecks."out".maxSize`).
        attr: String,
        /// What it must be.
        expected: &'static str,
    },
}

/// The structured attributes of a derivation: the parsed `__json` object.
#[derive(Debug, Clone, PartialEq)]
pub struct StructuredAttrs {
    attrs: Map<String, Value>,
}

impl StructuredAttrs {
    /// Parses the value of `__json`, which must be a JSON object.
    pub fn parse(json: &[u8]) -> Result<StructuredAttrs, StructuredAttrsError> {
        match serde_json::from_slice::<Value>(json) {
            Ok(Value::Object(attrs)) => Ok(StructuredAttrs { attrs }),
            Ok(_) => Err(StructuredAttrsError::Json("it is not a JSON object".into())),
            Err(e) => Err(StructuredAttrsError::Json(e.to_string())),
        }
    }

    /// The structured attributes of a derivation with environment `env`, if it has `__json`.
    pub fn from_env(
        env: &BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Result<Option<StructuredAttrs>, StructuredAttrsError> {
        env.get(JSON_VAR).map(|v| Self::parse(v)).transpose()
    }

    /// Attribute `name`.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.attrs.get(name)
    }

    /// The object the builder sees: the attributes with `outputs` replaced by a map from each
    /// output name to its placeholder (the sandbox rewrites placeholders to paths in the files
    /// it writes) and each `exportReferencesGraph` key set to its closure (`graphs`, from
    /// [`super::options::GraphPath::to_json`]).
    pub fn prepare<'a>(
        &self,
        outputs: impl IntoIterator<Item = &'a str>,
        graphs: &BTreeMap<String, Value>,
    ) -> Map<String, Value> {
        let mut json = self.attrs.clone();
        let outputs: Map<String, Value> = outputs
            .into_iter()
            .map(|o| (o.to_owned(), Value::String(hash_placeholder(o))))
            .collect();
        json.insert("outputs".into(), Value::Object(outputs));
        for (key, value) in graphs {
            json.insert(key.clone(), value.clone());
        }
        json
    }
}

/// `.attrs.json`: `json` serialised compactly, as Nix's JSON library writes it.
pub fn to_json(json: &Map<String, Value>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, NixJsonFormatter);
    // Writing to a Vec cannot fail, and a Map of Values always serialises.
    let _ = serde::Serialize::serialize(json, &mut ser);
    out
}

/// A compact JSON formatter that writes floats as Nix's JSON library (nlohmann's) does.
struct NixJsonFormatter;

impl serde_json::ser::Formatter for NixJsonFormatter {
    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(format_float(value).as_bytes())
    }
}

/// A double as nlohmann's `dump` writes it: the shortest digits that read back, in plain
/// notation when the decimal point falls within 15 digits (`3.0`, `2.5`, `0.001`), else as
/// `d.ddde±XX` (`1e+30`, `1e-07`).
pub fn format_float(value: f64) -> String {
    if !value.is_finite() {
        // JSON has no infinity; nlohmann writes null.
        return "null".into();
    }
    let mut out = String::new();
    if value.is_sign_negative() {
        out.push('-');
    }
    let value = value.abs();
    if value == 0.0 {
        out.push_str("0.0");
        return out;
    }
    // `{:e}` gives the shortest round-trip digits: `d[.ddd]e<exp>`.
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let exp: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    // The decimal point sits after `n` digits.
    let n = exp + 1;
    const MIN_EXP: i32 = -4;
    const MAX_EXP: i32 = 15;
    if k <= n && n <= MAX_EXP {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
        out.push_str(".0");
    } else if 0 < n && n <= MAX_EXP {
        out.push_str(&digits[..n as usize]);
        out.push('.');
        out.push_str(&digits[n as usize..]);
    } else if MIN_EXP < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        out.push_str(&digits[..1]);
        if k > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let e = n - 1;
        out.push('e');
        out.push(if e < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", e.abs()));
    }
    out
}

/// `.attrs.sh`: a `declare` line for each top-level key that is a shell variable name and
/// whose value the shell can hold, in key order.
pub fn to_shell(json: &Map<String, Value>) -> Vec<u8> {
    let mut out = String::new();
    for (key, value) in json {
        if !is_shell_name(key) {
            continue;
        }
        if let Some(s) = simple_value(value) {
            out.push_str(&format!("declare {key}={s}\n"));
        } else if let Value::Array(items) = value {
            let parts: Option<Vec<String>> = items.iter().map(simple_value).collect();
            if let Some(parts) = parts {
                let list: String = parts.iter().map(|p| format!("{p} ")).collect();
                out.push_str(&format!("declare -a {key}=({list})\n"));
            }
        } else if let Value::Object(items) = value {
            let parts: Option<Vec<String>> = items
                .iter()
                .map(|(k, v)| simple_value(v).map(|s| format!("[{}]={s} ", shell_quote(k))))
                .collect();
            if let Some(parts) = parts {
                out.push_str(&format!("declare -A {key}=({})\n", parts.concat()));
            }
        }
    }
    out.into_bytes()
}

/// `[A-Za-z_][A-Za-z0-9_]*`.
fn is_shell_name(key: &str) -> bool {
    let mut bytes = key.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A string, an integral number, a boolean or `null` as the shell word Nix writes for it;
/// `None` for anything else (which leaves the variable out).
fn simple_value(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(shell_quote(s)),
        Value::Number(n) => shell_integer(n).map(|i| i.to_string()),
        Value::Null => Some("''".into()),
        Value::Bool(b) => Some(if *b { "1" } else { "" }.into()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Nix tests a number with `float f = value; ceil(f) == f` and then prints `(int) value`: an
/// integer wraps to 32 bits, a float out of `int`'s range becomes `INT_MIN` (what x86-64
/// gives), and a float that is not integral in single precision is left out.
fn shell_integer(n: &serde_json::Number) -> Option<i32> {
    if let Some(i) = n.as_i64() {
        return Some(i as i32);
    }
    if let Some(u) = n.as_u64() {
        return Some(u as i32);
    }
    let d = n.as_f64()?;
    let f = d as f32;
    if f.ceil() != f {
        return None;
    }
    if (-2_147_483_648.0..2_147_483_648.0).contains(&d) {
        Some(d as i32)
    } else {
        Some(i32::MIN)
    }
}

/// Nix's `escapeShellArgAlways`: single quotes, with `'` written as `'\''`.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a panic is how a test reports failure
mod tests {
    use super::*;

    #[test]
    fn floats_as_nlohmann_writes_them() {
        for (v, s) in [
            (3.0, "3.0"),
            (2.5, "2.5"),
            (1e30, "1e+30"),
            (1e-7, "1e-07"),
            (0.001, "0.001"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-0.0, "-0.0"),
            (123456789012345.0, "123456789012345.0"),
            (1234567890123456.0, "1.234567890123456e+15"),
            (1e15, "1e+15"),
            (1e14, "100000000000000.0"),
            (1.5e300, "1.5e+300"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (-12.25, "-12.25"),
        ] {
            assert_eq!(format_float(v), s, "{v}");
        }
    }

    #[test]
    fn shell_numbers_follow_nix_casts() {
        let n = |s: &str| serde_json::from_str::<serde_json::Number>(s).unwrap();
        assert_eq!(shell_integer(&n("42")), Some(42));
        assert_eq!(shell_integer(&n("-7")), Some(-7));
        assert_eq!(shell_integer(&n("3000000000")), Some(-1294967296));
        assert_eq!(shell_integer(&n("3.0")), Some(3));
        assert_eq!(shell_integer(&n("1e30")), Some(i32::MIN));
        assert_eq!(shell_integer(&n("2.5")), None);
        assert_eq!(shell_integer(&n("1e-7")), None);
        // Integral in single precision, though not in double.
        assert_eq!(shell_integer(&n("2.0000001")), Some(2));
    }

    #[test]
    fn shell_names() {
        assert!(is_shell_name("a_1"));
        assert!(is_shell_name("_"));
        assert!(!is_shell_name("1a"));
        assert!(!is_shell_name("bad-name"));
        assert!(!is_shell_name(""));
        assert!(!is_shell_name("é"));
    }

    /// The `__json` of a derivation instantiated by Nix 2.34, and the `.attrs.json` and
    /// `.attrs.sh` its sandbox wrote for it (before the placeholders were rewritten to the
    /// output paths, which the golden files hold as `@out@` and `@dev@`).
    #[test]
    fn golden_files_of_nix_2_34() {
        let drv_json = include_bytes!("testdata/structured.json");
        let attrs = StructuredAttrs::parse(drv_json.trim_ascii_end()).unwrap();
        let json = attrs.prepare(["dev", "out"], &BTreeMap::new());
        let subst = |s: &[u8]| {
            String::from_utf8(s.to_vec())
                .unwrap()
                .replace(&hash_placeholder("out"), "@out@")
                .replace(&hash_placeholder("dev"), "@dev@")
        };
        let want_json = include_str!("testdata/structured.attrs.json");
        let want_sh = include_str!("testdata/structured.attrs.sh");
        assert_eq!(subst(&to_json(&json)), want_json.trim_end());
        assert_eq!(subst(&to_shell(&json)), want_sh);
    }

    #[test]
    fn not_an_object_is_refused() {
        for bad in [&b"[1]"[..], b"{", b"\"x\"", b""] {
            let e = StructuredAttrs::parse(bad).unwrap_err();
            assert!(e
                .to_string()
                .starts_with("cannot process __json attribute: "));
        }
    }

    #[test]
    fn round_trip_of_strings_escapes_like_nix() {
        let attrs =
            StructuredAttrs::parse(br#"{"s":"\u0001\u001f\u007f\b\f\n\r\t\"\\/\u00e9"}"#).unwrap();
        let mut json = attrs.attrs.clone();
        json.remove("outputs");
        assert_eq!(
            String::from_utf8(to_json(&json)).unwrap(),
            "{\"s\":\"\\u0001\\u001f\u{7f}\\b\\f\\n\\r\\t\\\"\\\\/é\"}"
        );
    }
}
