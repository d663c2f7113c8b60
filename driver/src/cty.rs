//! Reading go-cty msgpack (what Nomad sends for plugin and task config) with
//! errors that name the offending field.
//!
//! Nomad encodes the HCL it decoded with our schema: objects are maps holding
//! every declared key (absent ones as nil), numbers are the smallest int, a
//! float64, or — when too large or precise — a decimal string; lists and sets
//! are arrays; unknown values are ext type 0 and never legitimately arrive.

use std::collections::BTreeMap;

use rmpv::Value;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CtyError {
    #[error("config is not valid msgpack: {0}")]
    Msgpack(String),
    #[error("config is not an object (found {found})")]
    NotAnObject { found: &'static str },
    #[error("`{field}`: expected {expected}, found {found}")]
    WrongType { field: String, expected: &'static str, found: String },
    #[error("`{field}`: {problem}")]
    BadValue { field: String, problem: String },
}

/// Decodes one msgpack value; trailing bytes are an error.
pub fn decode(bytes: &[u8]) -> Result<Value, CtyError> {
    let mut cursor = std::io::Cursor::new(bytes);
    let value = rmpv::decode::read_value(&mut cursor).map_err(|e| CtyError::Msgpack(e.to_string()))?;
    if (cursor.position() as usize) != bytes.len() {
        return Err(CtyError::Msgpack(format!(
            "{} trailing bytes after the value",
            bytes.len() - cursor.position() as usize
        )));
    }
    Ok(value)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "null",
        Value::Boolean(_) => "a bool",
        Value::Integer(_) => "a number",
        Value::F32(_) | Value::F64(_) => "a number",
        Value::String(_) => "a string",
        Value::Binary(_) => "binary data",
        Value::Array(_) => "a list",
        Value::Map(_) => "an object",
        Value::Ext(0, _) | Value::Ext(12, _) => "an unknown value",
        Value::Ext(_, _) => "a msgpack extension",
    }
}

/// An object (map with string keys) plus the path that led to it, so every
/// error can say `disk[0].path` rather than just `path`.
#[derive(Debug, Clone)]
pub struct Object<'a> {
    path: String,
    entries: &'a [(Value, Value)],
}

impl<'a> Object<'a> {
    pub fn root(value: &'a Value) -> Result<Object<'a>, CtyError> {
        match value {
            Value::Map(entries) => Ok(Object { path: String::new(), entries }),
            // An empty config block may arrive as nil on some paths.
            Value::Nil => Ok(Object { path: String::new(), entries: &[] }),
            other => Err(CtyError::NotAnObject { found: kind(other) }),
        }
    }

    fn field(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) }
    }

    /// The raw value of `key`, `None` when absent or nil.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v).filter(|v| !v.is_nil())
    }

    /// Keys present in the map (for rejecting keys we do not know).
    pub fn keys(&self) -> impl Iterator<Item = &'a str> {
        self.entries.iter().filter_map(|(k, _)| k.as_str())
    }

    fn wrong(&self, key: &str, expected: &'static str, v: &Value) -> CtyError {
        CtyError::WrongType { field: self.field(key), expected, found: kind(v).to_string() }
    }

    /// A nested block (`Block` spec): `None` when absent.
    pub fn object(&self, key: &str) -> Result<Option<Object<'a>>, CtyError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Map(entries)) => Ok(Some(Object { path: self.field(key), entries })),
            Some(v) => Err(self.wrong(key, "a block", v)),
        }
    }

    /// Repeated blocks (`BlockList`/`BlockSet` spec): empty when absent.
    pub fn object_list(&self, key: &str) -> Result<Vec<Object<'a>>, CtyError> {
        let Some(v) = self.get(key) else { return Ok(Vec::new()) };
        let Value::Array(items) = v else { return Err(self.wrong(key, "a list of blocks", v)) };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::Map(entries) => Ok(Object { path: format!("{}[{i}]", self.field(key)), entries }),
                other => Err(CtyError::WrongType {
                    field: format!("{}[{i}]", self.field(key)),
                    expected: "a block",
                    found: kind(other).to_string(),
                }),
            })
            .collect()
    }

    pub fn bad(&self, key: &str, problem: impl Into<String>) -> CtyError {
        CtyError::BadValue { field: self.field(key), problem: problem.into() }
    }

    pub fn string(&self, key: &str) -> Result<Option<String>, CtyError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => match s.as_str() {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(self.bad(key, "is not valid UTF-8")),
            },
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, CtyError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Boolean(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a bool", v)),
        }
    }

    /// A whole non-negative number (ints, integral floats, and the decimal
    /// strings go-cty uses for numbers that do not fit).
    pub fn u64(&self, key: &str) -> Result<Option<u64>, CtyError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let out_of_range = || self.bad(key, "must be a whole number between 0 and 2^64-1");
        match v {
            Value::Integer(i) => i.as_u64().map(Some).ok_or_else(out_of_range),
            Value::F64(f) if f.fract() == 0.0 && *f >= 0.0 && *f < 1.8446744073709552e19 => Ok(Some(*f as u64)),
            Value::F32(f) if f.fract() == 0.0 && *f >= 0.0 => Ok(Some(*f as u64)),
            Value::F64(_) | Value::F32(_) => Err(out_of_range()),
            Value::String(s) => s.as_str().and_then(|s| s.parse::<u64>().ok()).map(Some).ok_or_else(out_of_range),
            other => Err(self.wrong(key, "a number", other)),
        }
    }

    pub fn f64(&self, key: &str) -> Result<Option<f64>, CtyError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        match v {
            Value::Integer(i) => Ok(i.as_f64()),
            Value::F64(f) => Ok(Some(*f)),
            Value::F32(f) => Ok(Some(f64::from(*f))),
            Value::String(s) => {
                s.as_str().and_then(|s| s.parse::<f64>().ok()).map(Some).ok_or_else(|| self.bad(key, "is not a number"))
            }
            other => Err(self.wrong(key, "a number", other)),
        }
    }

    pub fn string_list(&self, key: &str) -> Result<Option<Vec<String>>, CtyError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Array(items) = v else { return Err(self.wrong(key, "a list of strings", v)) };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(s) => {
                    s.as_str().map(str::to_string).ok_or_else(|| self.bad(&format!("{key}[{i}]"), "is not valid UTF-8"))
                }
                other => Err(CtyError::WrongType {
                    field: format!("{}[{i}]", self.field(key)),
                    expected: "a string",
                    found: kind(other).to_string(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    pub fn string_map(&self, key: &str) -> Result<Option<BTreeMap<String, String>>, CtyError> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let Value::Map(entries) = v else { return Err(self.wrong(key, "a map of strings", v)) };
        let mut out = BTreeMap::new();
        for (k, val) in entries {
            let Some(k) = k.as_str() else { return Err(self.bad(key, "has a key that is not a string")) };
            match val {
                Value::String(s) => {
                    out.insert(k.to_string(), s.as_str().unwrap_or_default().to_string());
                }
                other => {
                    return Err(CtyError::WrongType {
                        field: format!("{}.{k}", self.field(key)),
                        expected: "a string",
                        found: kind(other).to_string(),
                    });
                }
            }
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &Value) -> Vec<u8> {
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, v).unwrap();
        buf
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    /// The sample payload from the protocol reference (§3.5), hand-built to
    /// go-cty's rules: sorted keys, every attribute present, nil for unset.
    const REFERENCE_SAMPLE: &str = "87a461726773c0a46469736b9182a470617468b22f616c6c6f632f726f6f7466732e65787434a9726561645f6f6e6c79c0a5696d616765ac6c6f63616c2f766d2e696d67a66b65726e656cc0a66c6162656c7381a161a162a96d656d5f726174696f02a5766370757302";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    #[test]
    fn reference_sample_decodes() {
        let v = decode(&hex(REFERENCE_SAMPLE)).unwrap();
        let o = Object::root(&v).unwrap();
        assert_eq!(o.string("args").unwrap(), None, "nil optional field");
        assert_eq!(o.string("image").unwrap().as_deref(), Some("local/vm.img"));
        assert_eq!(o.string("kernel").unwrap(), None);
        assert_eq!(o.u64("vcpus").unwrap(), Some(2));
        assert_eq!(o.f64("mem_ratio").unwrap(), Some(2.0));
        let labels = o.string_map("labels").unwrap().unwrap();
        assert_eq!(labels.get("a").map(String::as_str), Some("b"));
        // nested block list
        let disks = o.object_list("disk").unwrap();
        assert_eq!(disks.len(), 1);
        let d0 = &disks[0];
        assert_eq!(d0.string("path").unwrap().as_deref(), Some("/alloc/rootfs.ext4"));
        assert_eq!(d0.bool("read_only").unwrap(), None);
        assert_eq!(d0.bool("path").unwrap_err().to_string(), "`disk[0].path`: expected a bool, found a string");
    }

    #[test]
    fn numbers_in_every_cty_encoding() {
        let v = Value::Map(vec![
            (s("small"), Value::from(7)),
            (s("neg"), Value::from(-3)),
            (s("float"), Value::F64(1.5)),
            (s("whole_float"), Value::F64(4096.0)),
            (s("huge"), s("18446744073709551615")),
            (s("big_u"), Value::from(u64::MAX)),
        ]);
        let o = Object::root(&v).unwrap();
        assert_eq!(o.u64("small").unwrap(), Some(7));
        assert_eq!(o.u64("whole_float").unwrap(), Some(4096));
        assert_eq!(o.u64("huge").unwrap(), Some(u64::MAX));
        assert_eq!(o.u64("big_u").unwrap(), Some(u64::MAX));
        assert!(o.u64("neg").unwrap_err().to_string().starts_with("`neg`: must be a whole number"));
        assert!(o.u64("float").is_err());
        assert_eq!(o.f64("float").unwrap(), Some(1.5));
        assert_eq!(o.f64("neg").unwrap(), Some(-3.0));
    }

    #[test]
    fn lists_maps_and_wrong_types_name_the_field() {
        let v = Value::Map(vec![
            (s("roots"), Value::Array(vec![s("/nix/store"), Value::from(1)])),
            (s("ok"), Value::Array(vec![s("a"), s("b")])),
            (s("empty"), Value::Array(vec![])),
            (s("env"), Value::Map(vec![(s("A"), s("1")), (s("B"), Value::Boolean(true))])),
        ]);
        let o = Object::root(&v).unwrap();
        assert_eq!(o.string_list("ok").unwrap(), Some(vec!["a".into(), "b".into()]));
        assert_eq!(o.string_list("empty").unwrap(), Some(vec![]));
        assert_eq!(o.string_list("missing").unwrap(), None);
        assert_eq!(o.string_list("roots").unwrap_err().to_string(), "`roots[1]`: expected a string, found a number");
        assert_eq!(o.string_map("env").unwrap_err().to_string(), "`env.B`: expected a string, found a bool");
        assert_eq!(o.string("ok").unwrap_err().to_string(), "`ok`: expected a string, found a list");
    }

    #[test]
    fn garbage_and_unknowns_are_errors() {
        assert!(matches!(decode(&[0x92, 0x01]), Err(CtyError::Msgpack(_))), "truncated array");
        let mut bytes = enc(&Value::Map(vec![]));
        bytes.push(0x01);
        assert!(decode(&bytes).unwrap_err().to_string().contains("trailing"));
        assert_eq!(Object::root(&Value::from(3)).unwrap_err(), CtyError::NotAnObject { found: "a number" });
        let unknown = decode(&[0x81, 0xa1, b'x', 0xd4, 0x00, 0x00]).unwrap();
        let o = Object::root(&unknown).unwrap();
        assert_eq!(o.string("x").unwrap_err().to_string(), "`x`: expected a string, found an unknown value");
    }

    #[test]
    fn nil_root_is_an_empty_object() {
        let o = Object::root(&Value::Nil).unwrap();
        assert_eq!(o.string("anything").unwrap(), None);
        assert_eq!(o.keys().count(), 0);
    }
}
