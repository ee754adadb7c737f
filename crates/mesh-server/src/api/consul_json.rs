//! Reading Consul request bodies the way Consul does: field names match regardless of case and
//! underscores, so `LockDelay`, `lockdelay` and `lock_delay` are the same field (py-consul sends
//! lowercase and snake_case, Go clients PascalCase).
//!
//! [`CiObject`] wraps a JSON object and looks fields up that way, with typed getters that turn a
//! wrong JSON type into a [`DecodeError`] naming the field. Every Consul endpoint that takes a
//! body can use it:
//!
//! ```ignore
//! let body = consul_json::parse_body(&bytes)?;          // "" → {}
//! let obj = CiObject::new(&body)?;
//! let name = obj.string("Name")?.unwrap_or_default();
//! let checks = obj.strings("NodeChecks")?.or(obj.strings("Checks")?);
//! ```

use serde_json::{Map, Value};

/// A request body that cannot be decoded; shown to clients as Consul does (`Request decode
/// failed: ...`, 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("Request decode failed: {0}")]
    Syntax(String),
    /// A field (or the body) has the wrong JSON type.
    #[error("Request decode failed: {field}: expected {expected}, got {got}")]
    Type {
        /// The field as the caller named it (`body` for the whole body).
        field: String,
        /// What was expected.
        expected: &'static str,
        /// The JSON type found.
        got: &'static str,
    },
}

/// Parse a request body; an empty (or blank) body is an empty object, as Consul treats it.
pub fn parse_body(body: &[u8]) -> Result<Value, DecodeError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| DecodeError::Syntax(e.to_string()))
}

/// The JSON type name of a value, for error messages.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Whether two field names are the same to Consul: ASCII case and `_` do not matter.
pub fn same_field(a: &str, b: &str) -> bool {
    let mut x = a.bytes().filter(|c| *c != b'_');
    let mut y = b.bytes().filter(|c| *c != b'_');
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(p), Some(q)) if p.eq_ignore_ascii_case(&q) => {}
            _ => return false,
        }
    }
}

/// A JSON object with case- and underscore-insensitive field lookup.
#[derive(Clone, Copy, Debug)]
pub struct CiObject<'a> {
    map: &'a Map<String, Value>,
}

impl<'a> CiObject<'a> {
    /// Wrap a value that must be an object (`field` names it in the error otherwise).
    pub fn from_value(v: &'a Value, field: &str) -> Result<Self, DecodeError> {
        match v {
            Value::Object(map) => Ok(Self { map }),
            other => Err(type_error(field, "an object", other)),
        }
    }

    /// Wrap a request body that must be an object.
    pub fn new(v: &'a Value) -> Result<Self, DecodeError> {
        Self::from_value(v, "body")
    }

    /// The underlying map.
    pub fn map(&self) -> &'a Map<String, Value> {
        self.map
    }

    /// A field's value; an exact name match wins over an insensitive one. JSON `null` counts as
    /// absent (Go leaves the field at its zero value).
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let v = match self.map.get(name) {
            Some(v) => Some(v),
            None => self.map.iter().find(|(k, _)| same_field(k, name)).map(|(_, v)| v),
        };
        v.filter(|v| !v.is_null())
    }

    /// Whether the field is present (and not null).
    pub fn has(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    /// A string field.
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(type_error(name, "a string", v)),
        }
    }

    /// A string field, owned.
    pub fn string(&self, name: &str) -> Result<Option<String>, DecodeError> {
        Ok(self.str(name)?.map(str::to_owned))
    }

    /// A non-negative integer field.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| type_error(name, "a non-negative integer", v)),
        }
    }

    /// A boolean field.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(type_error(name, "a boolean", v)),
        }
    }

    /// An array field.
    pub fn array(&self, name: &str) -> Result<Option<&'a Vec<Value>>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(type_error(name, "an array", v)),
        }
    }

    /// An array-of-strings field.
    pub fn strings(&self, name: &str) -> Result<Option<Vec<String>>, DecodeError> {
        let Some(items) = self.array(name)? else { return Ok(None) };
        items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| type_error(name, "an array of strings", v)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// An object field.
    pub fn object(&self, name: &str) -> Result<Option<CiObject<'a>>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => CiObject::from_value(v, name).map(Some),
        }
    }
}

fn type_error(field: &str, expected: &'static str, got: &Value) -> DecodeError {
    DecodeError::Type { field: field.to_owned(), expected, got: type_name(got) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn fields_match_without_case_or_underscores() {
        let v = json!({"lock_delay": "1s", "NAME": "x", "behavior": null, "Checks": ["a"], "ttl": 5});
        let o = CiObject::new(&v).unwrap();
        assert_eq!(o.str("LockDelay").unwrap(), Some("1s"));
        assert_eq!(o.str("name").unwrap(), Some("x"));
        assert_eq!(o.str("Behavior").unwrap(), None, "null is absent");
        assert_eq!(o.strings("checks").unwrap(), Some(vec!["a".to_owned()]));
        assert!(matches!(o.str("TTL"), Err(DecodeError::Type { ref field, .. }) if field == "TTL"));
        assert_eq!(o.u64("ttl").unwrap(), Some(5));
        assert!(!o.has("missing"));
        let exact = json!({"name": "lower", "Name": "exact"});
        assert_eq!(CiObject::new(&exact).unwrap().str("Name").unwrap(), Some("exact"));
    }

    #[test]
    fn bodies_parse_like_consul() {
        assert_eq!(parse_body(b"  ").unwrap(), json!({}));
        assert!(matches!(parse_body(b"{nope"), Err(DecodeError::Syntax(_))));
        assert!(CiObject::new(&json!([1])).is_err());
        assert!(same_field("service_checks", "ServiceChecks"));
        assert!(!same_field("Check", "Checks"));
    }
}
