//! Consul's `?filter=` expressions (the grammar of HashiCorp's `go-bexpr`), evaluated against
//! the JSON objects an endpoint answers with.
//!
//! ```text
//! expr      := or
//! or        := and ("or" and)*
//! and       := unary ("and" unary)*
//! unary     := "not" unary | "(" expr ")" | match
//! match     := selector ("==" | "!=") value
//!            | selector "is" ["not"] "empty"
//!            | value ["not"] "in" selector
//!            | selector ["not"] ("contains" | "matches") value
//! selector  := name ("." name | "[" quoted "]")*      e.g. Service.Tags, Meta.env, Meta["a.b"]
//! value     := "double quoted" | `backquoted` | bare word or number
//! ```
//!
//! A selector that walks through a list (`Checks.Status`) selects every element's field; a
//! match on it holds when it holds for any of them. A selector naming nothing is empty: `==`
//! is false, `!=` true. No crate implements bexpr (crates.io has none), and the grammar is
//! small, so it is parsed here.

use regex::Regex;
use serde_json::Value;

/// A malformed filter expression (answered with a 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Failed to create boolean expression evaluator: {0}")]
pub struct FilterError(String);

/// A parsed filter expression.
#[derive(Debug)]
pub enum Filter {
    /// Both hold.
    And(Box<Filter>, Box<Filter>),
    /// Either holds.
    Or(Box<Filter>, Box<Filter>),
    /// It does not hold.
    Not(Box<Filter>),
    /// A comparison of the value at a selector.
    Match(Vec<String>, Op),
}

/// A comparison.
#[derive(Debug)]
pub enum Op {
    /// `==` (or, negated, `!=`).
    Equal(String),
    /// `is empty`.
    Empty,
    /// `"v" in Sel` / `Sel contains "v"`: list element, map key or substring.
    Contains(String),
    /// `Sel matches "re"`.
    Matches(Regex),
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Quoted(String),
    Op(&'static str),
    Open,
    Close,
    Dot,
    LBracket,
    RBracket,
}

fn err(m: impl Into<String>) -> FilterError {
    FilterError(m.into())
}

fn lex(s: &str) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let mut it = s.char_indices().peekable();
    while let Some(&(i, c)) = it.peek() {
        match c {
            c if c.is_whitespace() => {
                it.next();
            }
            '(' | ')' | '.' | '[' | ']' => {
                it.next();
                out.push(match c {
                    '(' => Tok::Open,
                    ')' => Tok::Close,
                    '.' => Tok::Dot,
                    '[' => Tok::LBracket,
                    _ => Tok::RBracket,
                });
            }
            '=' | '!' => {
                it.next();
                match it.next() {
                    Some((_, '=')) => out.push(Tok::Op(if c == '=' { "==" } else { "!=" })),
                    _ => return Err(err(format!("1:{}: unexpected {c:?}, expected \"==\" or \"!=\"", i + 1))),
                }
            }
            '"' | '`' => {
                it.next();
                let mut v = String::new();
                let mut closed = false;
                while let Some((_, d)) = it.next() {
                    if d == c {
                        closed = true;
                        break;
                    }
                    if d == '\\' && c == '"' {
                        match it.next() {
                            Some((_, e)) => v.push(e),
                            None => break,
                        }
                    } else {
                        v.push(d);
                    }
                }
                if !closed {
                    return Err(err(format!("1:{}: unterminated string", i + 1)));
                }
                out.push(Tok::Quoted(v));
            }
            c if c.is_alphanumeric() || matches!(c, '_' | '-' | '/' | ':' | '+') => {
                let mut v = String::new();
                while let Some(&(_, d)) = it.peek() {
                    if d.is_alphanumeric() || matches!(d, '_' | '-' | '/' | ':' | '+') {
                        v.push(d);
                        it.next();
                    } else {
                        break;
                    }
                }
                out.push(Tok::Word(v));
            }
            c => return Err(err(format!("1:{}: unexpected character {c:?}", i + 1))),
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<Tok>,
    pos: usize,
}

fn is_kw(t: Option<&Tok>, kw: &str) -> bool {
    matches!(t, Some(Tok::Word(w)) if w == kw)
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos)
    }
    fn peek_at(&self, n: usize) -> Option<&Tok> {
        self.toks.get(self.pos + n)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }
    fn expect_kw(&mut self, kw: &str) -> Result<(), FilterError> {
        match self.next() {
            Some(Tok::Word(w)) if w == kw => Ok(()),
            t => Err(err(format!("expected {kw:?}, found {}", describe(t.as_ref())))),
        }
    }

    fn or(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.and()?;
        while is_kw(self.peek(), "or") {
            self.next();
            left = Filter::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Filter, FilterError> {
        let mut left = self.unary()?;
        while is_kw(self.peek(), "and") {
            self.next();
            left = Filter::And(Box::new(left), Box::new(self.unary()?));
        }
        Ok(left)
    }

    fn unary(&mut self) -> Result<Filter, FilterError> {
        if is_kw(self.peek(), "not") {
            self.next();
            return Ok(Filter::Not(Box::new(self.unary()?)));
        }
        if self.peek() == Some(&Tok::Open) {
            self.next();
            let e = self.or()?;
            return match self.next() {
                Some(Tok::Close) => Ok(e),
                t => Err(err(format!("expected \")\", found {}", describe(t.as_ref())))),
            };
        }
        self.matcher()
    }

    /// `value [not] in selector`, or a match that starts with a selector.
    fn matcher(&mut self) -> Result<Filter, FilterError> {
        let value_first = matches!(self.peek(), Some(Tok::Quoted(_)))
            || is_kw(self.peek_at(1), "in")
            || (is_kw(self.peek_at(1), "not") && is_kw(self.peek_at(2), "in"));
        if value_first {
            let value = self.value()?;
            let negate = is_kw(self.peek(), "not");
            if negate {
                self.next();
            }
            self.expect_kw("in")?;
            let sel = self.selector()?;
            return Ok(negated(Filter::Match(sel, Op::Contains(value)), negate));
        }
        let sel = self.selector()?;
        match self.next() {
            Some(Tok::Op(op)) => {
                let v = self.value()?;
                Ok(negated(Filter::Match(sel, Op::Equal(v)), op == "!="))
            }
            Some(Tok::Word(w)) if w == "is" => {
                let negate = is_kw(self.peek(), "not");
                if negate {
                    self.next();
                }
                self.expect_kw("empty")?;
                Ok(negated(Filter::Match(sel, Op::Empty), negate))
            }
            Some(Tok::Word(w)) if w == "contains" || w == "matches" || w == "not" => {
                let (negate, verb) = if w == "not" {
                    match self.next() {
                        Some(Tok::Word(v)) if v == "contains" || v == "matches" => (true, v),
                        t => {
                            return Err(err(format!(
                                "expected \"contains\" or \"matches\", found {}",
                                describe(t.as_ref())
                            )));
                        }
                    }
                } else {
                    (false, w)
                };
                let v = self.value()?;
                let op = if verb == "contains" {
                    Op::Contains(v)
                } else {
                    Op::Matches(Regex::new(&v).map_err(|e| err(format!("invalid regular expression {v:?}: {e}")))?)
                };
                Ok(negated(Filter::Match(sel, op), negate))
            }
            t => Err(err(format!(
                "expected \"==\", \"!=\", \"is\", \"contains\" or \"matches\" after the selector, found {}",
                describe(t.as_ref())
            ))),
        }
    }

    fn selector(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = match self.next() {
            Some(Tok::Word(w)) if !is_reserved(&w) => vec![w],
            t => return Err(err(format!("expected a selector, found {}", describe(t.as_ref())))),
        };
        loop {
            match self.peek() {
                Some(Tok::Dot) => {
                    self.next();
                    match self.next() {
                        Some(Tok::Word(w)) => path.push(w),
                        t => {
                            return Err(err(format!(
                                "expected a field name after \".\", found {}",
                                describe(t.as_ref())
                            )));
                        }
                    }
                }
                Some(Tok::LBracket) => {
                    self.next();
                    match (self.next(), self.next()) {
                        (Some(Tok::Quoted(k)), Some(Tok::RBracket)) => path.push(k),
                        _ => return Err(err("expected [\"key\"] in the selector")),
                    }
                }
                _ => return Ok(path),
            }
        }
    }

    fn value(&mut self) -> Result<String, FilterError> {
        match self.next() {
            Some(Tok::Quoted(v)) => Ok(v),
            Some(Tok::Word(w)) if !is_reserved(&w) => {
                // A bare value may contain dots (1.5, a.b.c).
                let mut v = w;
                while self.peek() == Some(&Tok::Dot) {
                    self.next();
                    match self.next() {
                        Some(Tok::Word(w)) => {
                            v.push('.');
                            v.push_str(&w);
                        }
                        t => return Err(err(format!("expected a value, found {}", describe(t.as_ref())))),
                    }
                }
                Ok(v)
            }
            t => Err(err(format!("expected a value, found {}", describe(t.as_ref())))),
        }
    }
}

fn is_reserved(w: &str) -> bool {
    matches!(w, "and" | "or" | "not" | "in" | "is" | "empty" | "contains" | "matches")
}

fn describe(t: Option<&Tok>) -> String {
    match t {
        None => "the end of the expression".into(),
        Some(Tok::Word(w)) => format!("{w:?}"),
        Some(Tok::Quoted(q)) => format!("the string {q:?}"),
        Some(Tok::Op(o)) => format!("{o:?}"),
        Some(Tok::Open) => "\"(\"".into(),
        Some(Tok::Close) => "\")\"".into(),
        Some(Tok::Dot) => "\".\"".into(),
        Some(Tok::LBracket) => "\"[\"".into(),
        Some(Tok::RBracket) => "\"]\"".into(),
    }
}

fn negated(f: Filter, negate: bool) -> Filter {
    if negate { Filter::Not(Box::new(f)) } else { f }
}

impl Filter {
    /// Parse an expression.
    pub fn parse(s: &str) -> Result<Filter, FilterError> {
        let toks = lex(s)?;
        if toks.is_empty() {
            return Err(err("empty expression"));
        }
        let mut p = Parser { toks, pos: 0 };
        let f = p.or()?;
        match p.peek() {
            None => Ok(f),
            t => Err(err(format!("unexpected {} after the expression", describe(t)))),
        }
    }

    /// Parse the `filter` query parameter, if given and not blank.
    pub fn from_param(p: Option<&String>) -> Result<Option<Filter>, FilterError> {
        match p.map(|s| s.trim()).filter(|s| !s.is_empty()) {
            None => Ok(None),
            Some(s) => Filter::parse(s).map(Some),
        }
    }

    /// Whether `v` (one element of an endpoint's answer) matches.
    pub fn matches(&self, v: &Value) -> bool {
        match self {
            Filter::And(a, b) => a.matches(v) && b.matches(v),
            Filter::Or(a, b) => a.matches(v) || b.matches(v),
            Filter::Not(a) => !a.matches(v),
            Filter::Match(path, op) => {
                let mut found = Vec::new();
                select(v, path, &mut found);
                match op {
                    Op::Empty => found.iter().all(|x| is_empty(x)),
                    Op::Equal(want) => found.iter().any(|x| scalar(x).is_some_and(|s| s == *want)),
                    Op::Contains(want) => found.iter().any(|x| match x {
                        Value::Array(a) => a.iter().any(|e| scalar(e).is_some_and(|s| s == *want)),
                        Value::Object(m) => m.contains_key(want.as_str()),
                        Value::String(s) => s.contains(want.as_str()),
                        _ => false,
                    }),
                    Op::Matches(re) => found.iter().any(|x| match x {
                        Value::Array(a) => a.iter().any(|e| scalar(e).is_some_and(|s| re.is_match(&s))),
                        x => scalar(x).is_some_and(|s| re.is_match(&s)),
                    }),
                }
            }
        }
    }
}

/// The values at `path` (through lists, every element's).
fn select<'a>(v: &'a Value, path: &[String], out: &mut Vec<&'a Value>) {
    let Some((first, rest)) = path.split_first() else {
        out.push(v);
        return;
    };
    match v {
        Value::Object(m) => {
            if let Some(x) = m.get(first.as_str()) {
                select(x, rest, out);
            }
        }
        Value::Array(a) => {
            for e in a {
                select(e, path, out);
            }
        }
        _ => {}
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(m) => m.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc() -> Value {
        json!({
            "ID": "web-1", "Service": "web", "Tags": ["prod", "v1"], "Port": 8080,
            "Meta": {"env": "prod", "a.b": "x"}, "EnableTagOverride": false, "Address": "",
            "Checks": [{"Status": "passing"}, {"Status": "critical"}],
        })
    }

    fn m(expr: &str) -> bool {
        Filter::parse(expr).unwrap_or_else(|e| panic!("{expr}: {e}")).matches(&svc())
    }

    #[test]
    fn every_operator_matches_as_bexpr() {
        assert!(m(r#"Service == "web""#));
        assert!(m("Service == `web`"));
        assert!(m("Service == web"));
        assert!(!m(r#"Service != "web""#));
        assert!(m("Port == 8080"));
        assert!(m("EnableTagOverride == false"));
        assert!(m(r#""prod" in Tags"#));
        assert!(!m(r#""dev" in Tags"#));
        assert!(m(r#""dev" not in Tags"#));
        assert!(m(r#"Tags contains "v1""#));
        assert!(m(r#"Tags not contains "v2""#));
        assert!(m(r#"Service matches "^w.b$""#));
        assert!(!m(r#"Service not matches "^w""#));
        assert!(m("Address is empty"));
        assert!(m("Tags is not empty"));
        assert!(m("Missing is empty"), "a selector naming nothing is empty");
        assert!(m(r#"Meta.env == "prod""#));
        assert!(m(r#"Meta["a.b"] == "x""#));
        assert!(m(r#""env" in Meta"#), "in on a map looks at its keys");
        assert!(!m(r#"Meta.nope == "prod""#));
        assert!(m(r#"Meta.nope != "prod""#));
        assert!(m(r#"Checks.Status == "critical""#), "through a list: any element");
    }

    #[test]
    fn boolean_structure_and_precedence() {
        assert!(m(r#"Service == "web" and "prod" in Tags"#));
        assert!(!m(r#"Service == "db" and "prod" in Tags"#));
        assert!(m(r#"Service == "db" or "prod" in Tags"#));
        assert!(m(r#"not Service == "db""#));
        // and binds tighter than or
        assert!(m(r#"Service == "web" or Service == "x" and Port == 1"#));
        assert!(!m(r#"(Service == "web" or Service == "x") and Port == 1"#));
        assert!(m(r#"not (Port == 1 or Service == "db")"#));
    }

    #[test]
    fn malformed_expressions_are_errors_that_say_where() {
        for bad in [
            "not a valid expression((",
            "",
            "Service ==",
            "Service = \"web\"",
            "(Service == web",
            "Service == web)",
            "\"web\" in",
            "Service is full",
            "Service == \"web",
            "Service matches \"(\"",
            "Service == web and",
            "Meta[env] == x",
            "Service ~ x",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?} parsed");
        }
        let e = Filter::parse("Service ==").unwrap_err().to_string();
        assert!(e.contains("expected a value"), "{e}");
    }
}
