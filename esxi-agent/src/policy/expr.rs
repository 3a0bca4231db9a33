//! VSAN policy expressions: `(("stripeWidth" i2) ("forceProvisioning" i1))`.
//!
//! The syntax is the one `esxcli vsan policy getdefault` prints and
//! `objtool setPolicy` reads: a parenthesized list of rules, each a quoted
//! capability name and a typed value:
//!
//! ```text
//! policy := '(' rule+ ')'
//! rule   := '(' string value ')'
//! value  := 'i' integer | 'l' integer | string
//! integer:= ['+' | '-'] digit+
//! string := '"' (any char but '"' and '\', or '\"', '\\')* '"'
//! ```
//!
//! Whitespace may separate tokens. The original vDVS stored any text; this
//! parser refuses what vSAN would refuse later, at the point where the
//! administrator can still fix it, and says where the problem is. Known
//! capabilities ([`CAPABILITIES`]) are checked for type and range; unknown
//! ones are kept (vSAN has more than vDVS documented) and reported by
//! [`PolicyExpr::unknown_capabilities`] so the CLI can warn about typos.

use std::fmt;

/// A parsed, validated policy expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyExpr {
    /// The rules in the order written.
    pub rules: Vec<Rule>,
}

/// One `("capability" value)` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Capability id, e.g. `stripeWidth`.
    pub capability: String,
    /// Its value.
    pub value: Value,
}

/// A typed value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `i<int>`: an integer (booleans are `i0`/`i1`).
    Int(i64),
    /// `l<int>`: a long integer.
    Long(i64),
    /// `"text"`.
    Str(String),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Self::Int(_) => "an integer (i<int>)",
            Self::Long(_) => "a long (l<int>)",
            Self::Str(_) => "a string",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(v) => write!(f, "i{v}"),
            Self::Long(v) => write!(f, "l{v}"),
            Self::Str(s) => write!(f, "\"{}\"", escape(s)),
        }
    }
}

/// What a known capability accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    /// An integer (`i` or `l`) in `min..=max` (`max` `None`: unbounded).
    Int {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: Option<i64>,
    },
    /// `i0` or `i1`.
    Bool,
    /// A non-empty string.
    Str,
}

impl fmt::Display for Accepts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int { min, max: Some(max) } => write!(f, "an integer from {min} to {max}"),
            Self::Int { min, max: None } => write!(f, "an integer >= {min}"),
            Self::Bool => f.write_str("i0 or i1"),
            Self::Str => f.write_str("a quoted string"),
        }
    }
}

/// The capabilities vmdk checks, with what each accepts (vSAN 6.x docs).
pub const CAPABILITIES: &[(&str, Accepts)] = &[
    ("hostFailuresToTolerate", Accepts::Int { min: 0, max: Some(3) }),
    ("stripeWidth", Accepts::Int { min: 1, max: Some(12) }),
    ("forceProvisioning", Accepts::Bool),
    ("proportionalCapacity", Accepts::Int { min: 0, max: Some(100) }),
    ("cacheReservation", Accepts::Int { min: 0, max: None }),
    ("iopsLimit", Accepts::Int { min: 0, max: None }),
    ("checksumDisabled", Accepts::Bool),
    ("replicaPreference", Accepts::Str),
];

/// Why a policy expression was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A token other than the one the grammar needs.
    Expected {
        /// What was needed.
        expected: &'static str,
        /// What was there (`end of input`, `'x'`, ...).
        found: String,
    },
    /// A string without its closing quote.
    UnterminatedString,
    /// A backslash escape other than `\"` and `\\`.
    BadEscape {
        /// The escaped character.
        found: char,
    },
    /// An integer that does not fit 64 bits.
    IntegerTooLarge {
        /// The digits.
        text: String,
    },
    /// `()`: a policy without rules.
    NoRules,
    /// An empty capability name `""`.
    EmptyCapability,
    /// The same capability twice.
    Duplicate {
        /// The capability.
        capability: String,
    },
    /// A known capability with a value of the wrong type.
    WrongType {
        /// The capability.
        capability: String,
        /// What it accepts.
        accepts: Accepts,
        /// The type found.
        found: &'static str,
    },
    /// A known capability with a value out of its range.
    OutOfRange {
        /// The capability.
        capability: String,
        /// The value given.
        value: String,
        /// What it accepts.
        accepts: Accepts,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Expected { expected, found } => write!(f, "expected {expected}, found {found}"),
            Self::UnterminatedString => f.write_str("string is not closed with '\"'"),
            Self::BadEscape { found } => write!(f, "unknown escape '\\{found}' in string (only \\\" and \\\\)"),
            Self::IntegerTooLarge { text } => write!(f, "integer {text} does not fit in 64 bits"),
            Self::NoRules => f.write_str("the policy has no rules; give at least one (\"capability\" value)"),
            Self::EmptyCapability => f.write_str("capability name is empty"),
            Self::Duplicate { capability } => write!(f, "capability \"{capability}\" is given twice"),
            Self::WrongType {
                capability,
                accepts,
                found,
            } => write!(f, "\"{capability}\" takes {accepts}, found {found}"),
            Self::OutOfRange {
                capability,
                value,
                accepts,
            } => write!(f, "\"{capability}\" takes {accepts}, found {value}"),
        }
    }
}

/// A refused policy expression: the problem, where it is, and the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid policy content: {problem} at column {column}\n  {content}\n  {caret}", caret = self.caret())]
pub struct ContentError {
    /// The expression as given.
    pub content: String,
    /// 1-based character column of the problem.
    pub column: usize,
    /// What is wrong.
    pub problem: Problem,
}

impl ContentError {
    fn caret(&self) -> String {
        // Tabs stay tabs so the caret lines up under them.
        let prefix: String = self
            .content
            .chars()
            .take(self.column - 1)
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        format!("{prefix}^")
    }
}

impl PolicyExpr {
    /// Parses and validates an expression.
    pub fn parse(content: &str) -> Result<Self, ContentError> {
        if content.contains(['\n', '\r']) {
            // One line keeps the column (and the policy file) unambiguous.
            let at = content.find(['\n', '\r']).unwrap_or(0);
            return Err(ContentError {
                content: content.replace(['\n', '\r'], " "),
                column: content[..at].chars().count() + 1,
                problem: Problem::Expected {
                    expected: "the policy on one line",
                    found: "a line break".into(),
                },
            });
        }
        let mut p = Parser { src: content, pos: 0 };
        p.policy().map_err(|(offset, problem)| ContentError {
            content: content.to_owned(),
            column: content[..offset].chars().count() + 1,
            problem,
        })
    }

    /// Capabilities that are not in [`CAPABILITIES`], each with a known
    /// capability of similar spelling when there is one.
    pub fn unknown_capabilities(&self) -> Vec<(&str, Option<&'static str>)> {
        self.rules
            .iter()
            .filter(|r| !CAPABILITIES.iter().any(|(n, _)| *n == r.capability))
            .map(|r| (r.capability.as_str(), suggest(&r.capability)))
            .collect()
    }
}

/// A string as the grammar quotes it: `\` and `"` escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl fmt::Display for PolicyExpr {
    /// The canonical form: `(("a" i1) ("b" i2))`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(")?;
        for (i, r) in self.rules.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "(\"{}\" {})", escape(&r.capability), r.value)?;
        }
        f.write_str(")")
    }
}

/// A known capability within edit distance 3 of `name`.
fn suggest(name: &str) -> Option<&'static str> {
    let lower = name.to_lowercase();
    CAPABILITIES
        .iter()
        .map(|(n, _)| (*n, edit_distance(&lower, &n.to_lowercase())))
        .filter(|(_, d)| *d <= 3)
        .min_by_key(|(_, d)| *d)
        .map(|(n, _)| n)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

type PResult<T> = Result<T, (usize, Problem)>;

struct Parser<'a> {
    src: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    /// Describes the token at the current position for an error.
    fn found(&self) -> String {
        let rest = &self.src[self.pos..];
        match rest.chars().next() {
            None => "end of input".into(),
            Some(c) if c.is_alphanumeric() || c == '+' || c == '-' => {
                let word: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || matches!(c, '+' | '-' | '_' | '.'))
                    .take(20)
                    .collect();
                format!("'{word}'")
            }
            Some(c) => format!("'{c}'"),
        }
    }

    fn expected<T>(&self, expected: &'static str) -> PResult<T> {
        Err((
            self.pos,
            Problem::Expected {
                expected,
                found: self.found(),
            },
        ))
    }

    fn eat(&mut self, c: char, expected: &'static str) -> PResult<()> {
        self.skip_ws();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            self.expected(expected)
        }
    }

    fn policy(&mut self) -> PResult<PolicyExpr> {
        self.eat('(', "'(' to start the policy")?;
        let mut rules: Vec<Rule> = Vec::new();
        loop {
            self.skip_ws();
            match self.peek() {
                Some(')') if rules.is_empty() => return Err((self.pos, Problem::NoRules)),
                Some(')') => {
                    self.pos += 1;
                    break;
                }
                Some('(') => {
                    let start = self.pos;
                    let rule = self.rule()?;
                    if rules.iter().any(|r| r.capability == rule.capability) {
                        return Err((
                            start + 1,
                            Problem::Duplicate {
                                capability: rule.capability,
                            },
                        ));
                    }
                    rules.push(rule);
                }
                _ if rules.is_empty() => return self.expected("'(' to start a (\"capability\" value) rule"),
                _ => return self.expected("'(' to start another rule, or ')' to end the policy"),
            }
        }
        self.skip_ws();
        if self.pos < self.src.len() {
            return self.expected("end of the policy after its closing ')'");
        }
        Ok(PolicyExpr { rules })
    }

    fn rule(&mut self) -> PResult<Rule> {
        self.eat('(', "'('")?;
        self.skip_ws();
        if self.peek() != Some('"') {
            return self.expected("a quoted capability name, e.g. \"stripeWidth\"");
        }
        let name_at = self.pos;
        let capability = self.string()?;
        if capability.is_empty() {
            return Err((name_at, Problem::EmptyCapability));
        }
        if let Some(c) = capability.chars().find(|c| c.is_control()) {
            return Err((
                name_at,
                Problem::Expected {
                    expected: "a capability name without control characters",
                    found: format!("U+{:04X}", c as u32),
                },
            ));
        }
        self.skip_ws();
        let value_at = self.pos;
        let value = self.value()?;
        check_capability(&capability, &value).map_err(|p| (value_at, p))?;
        self.eat(')', "')' to close the rule")?;
        Ok(Rule { capability, value })
    }

    fn value(&mut self) -> PResult<Value> {
        match self.peek() {
            Some('"') => Ok(Value::Str(self.string()?)),
            Some('i') => {
                self.pos += 1;
                Ok(Value::Int(self.integer()?))
            }
            Some('l') => {
                self.pos += 1;
                Ok(Value::Long(self.integer()?))
            }
            _ => self.expected("a value: i<int>, l<int> or a quoted string"),
        }
    }

    fn integer(&mut self) -> PResult<i64> {
        let start = self.pos;
        let rest = &self.src[self.pos..];
        let sign = usize::from(rest.starts_with(['+', '-']));
        let digits = rest[sign..].bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            self.pos += sign;
            return self.expected("digits after the value type, e.g. i2");
        }
        let text = &rest[..sign + digits];
        self.pos += text.len();
        text.parse::<i64>()
            .map_err(|_| (start, Problem::IntegerTooLarge { text: text.to_owned() }))
    }

    fn string(&mut self) -> PResult<String> {
        let open = self.pos;
        self.pos += 1; // the opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err((open, Problem::UnterminatedString));
            };
            self.pos += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => match self.peek() {
                    Some(e @ ('"' | '\\')) => {
                        self.pos += 1;
                        out.push(e);
                    }
                    Some(e) => return Err((self.pos - 1, Problem::BadEscape { found: e })),
                    None => return Err((open, Problem::UnterminatedString)),
                },
                c => out.push(c),
            }
        }
    }
}

fn check_capability(capability: &str, value: &Value) -> Result<(), Problem> {
    let Some((_, accepts)) = CAPABILITIES.iter().find(|(n, _)| *n == capability) else {
        return Ok(());
    };
    let wrong_type = || Problem::WrongType {
        capability: capability.to_owned(),
        accepts: *accepts,
        found: value.type_name(),
    };
    let out_of_range = || Problem::OutOfRange {
        capability: capability.to_owned(),
        value: value.to_string(),
        accepts: *accepts,
    };
    match (accepts, value) {
        (Accepts::Str, Value::Str(s)) if s.is_empty() => Err(out_of_range()),
        (Accepts::Str, Value::Str(_)) => Ok(()),
        (Accepts::Str, _) => Err(wrong_type()),
        (Accepts::Bool, Value::Int(v) | Value::Long(v)) if matches!(v, 0 | 1) => Ok(()),
        (Accepts::Bool, Value::Int(_) | Value::Long(_)) => Err(out_of_range()),
        (Accepts::Int { min, max }, Value::Int(v) | Value::Long(v)) => {
            if v < min || max.is_some_and(|m| *v > m) {
                Err(out_of_range())
            } else {
                Ok(())
            }
        }
        (Accepts::Bool | Accepts::Int { .. }, Value::Str(_)) => Err(wrong_type()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_examples() {
        for ok in [
            r#"(("stripeWidth" i2))"#,
            r#"(("hostFailuresToTolerate" i1) ("stripeWidth" i2) ("forceProvisioning" i1))"#,
            r#"(("proportionalCapacity" i0)("hostFailuresToTolerate" i0))"#,
            r#"(("proportionalCapacity" i50) ("hostFailuresToTolerate" i0))"#,
            r#"  ( ( "iopsLimit"  l+0 ) ("cacheReservation" i400000) )  "#,
            r#"(("replicaPreference" "RAID-5/6 (Erasure Coding) - Capacity") ("checksumDisabled" i0))"#,
            r#"(("someFutureCapability" "x\"y"))"#,
        ] {
            PolicyExpr::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        let e = PolicyExpr::parse(r#"(("hostFailuresToTolerate" i1)("stripeWidth" l2))"#).unwrap();
        assert_eq!(e.to_string(), r#"(("hostFailuresToTolerate" i1) ("stripeWidth" l2))"#);
        assert_eq!(e.rules[1].value, Value::Long(2));
    }

    #[test]
    fn points_at_the_problem() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 1, "expected '(' to start the policy, found end of input"),
            ("stripeWidth=2", 1, "found 'stripeWidth'"),
            (
                r#"(("stripeWidth" i2)"#,
                20,
                "or ')' to end the policy, found end of input",
            ),
            (
                r#"(("stripeWidth" i2)))"#,
                21,
                "expected end of the policy after its closing ')', found ')'",
            ),
            (r#"(("wrongKey" i50)"#, 18, "found end of input"),
            (r#"((stripeWidth i2))"#, 3, "expected a quoted capability name"),
            (r#"(("stripeWidth i2))"#, 3, "string is not closed"),
            (
                r#"(("stripeWidth" 2))"#,
                17,
                "expected a value: i<int>, l<int> or a quoted string, found '2'",
            ),
            (r#"(("stripeWidth" i))"#, 18, "expected digits after the value type"),
            (r#"(("stripeWidth" ix))"#, 18, "found 'x'"),
            (
                r#"(("stripeWidth" i2 i3))"#,
                20,
                "expected ')' to close the rule, found 'i3'",
            ),
            ("()", 2, "the policy has no rules"),
            (r#"(("" i1))"#, 3, "capability name is empty"),
            (
                r#"(("stripeWidth" i2) ("stripeWidth" i3))"#,
                22,
                "\"stripeWidth\" is given twice",
            ),
            (r#"(("a" i99999999999999999999))"#, 8, "does not fit in 64 bits"),
            (r#"(("a" "x\n"))"#, 9, "unknown escape '\\n'"),
            ("((\"stripeWidth\" i2)\n)", 20, "a line break"),
        ];
        for (input, column, want) in cases {
            let e = PolicyExpr::parse(input).expect_err(input);
            let text = e.to_string();
            assert!(text.contains(want), "{input:?}: {text:?} lacks {want:?}");
            assert_eq!(e.column, *column, "{input:?}: {text}");
        }
    }

    #[test]
    fn checks_known_capabilities() {
        let bad: &[(&str, &str)] = &[
            (
                r#"(("hostFailuresToTolerate" i4))"#,
                "takes an integer from 0 to 3, found i4",
            ),
            (r#"(("hostFailuresToTolerate" i-1))"#, "found i-1"),
            (r#"(("stripeWidth" i0))"#, "takes an integer from 1 to 12, found i0"),
            (r#"(("stripeWidth" l13))"#, "found l13"),
            (r#"(("forceProvisioning" i2))"#, "takes i0 or i1, found i2"),
            (r#"(("checksumDisabled" "yes"))"#, "takes i0 or i1, found a string"),
            (r#"(("proportionalCapacity" i101))"#, "from 0 to 100"),
            (r#"(("cacheReservation" i-5))"#, "takes an integer >= 0"),
            (r#"(("iopsLimit" i-1))"#, "takes an integer >= 0"),
            (
                r#"(("replicaPreference" i1))"#,
                "takes a quoted string, found an integer",
            ),
            (r#"(("replicaPreference" ""))"#, "takes a quoted string"),
        ];
        for (input, want) in bad {
            let text = PolicyExpr::parse(input).expect_err(input).to_string();
            assert!(text.contains(want), "{input}: {text:?} lacks {want:?}");
        }
        for ok in [
            r#"(("hostFailuresToTolerate" i3))"#,
            r#"(("stripeWidth" i12))"#,
            r#"(("stripeWidth" i1))"#,
            r#"(("proportionalCapacity" i100))"#,
            r#"(("iopsLimit" l1000000))"#,
        ] {
            PolicyExpr::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn caret_sits_under_the_column() {
        let e = PolicyExpr::parse(r#"(("stripeWidth" i20))"#).unwrap_err();
        let text = e.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        let caret = lines[2].find('^').unwrap();
        assert_eq!(&lines[1][caret..caret + 3], "i20", "{text}");
    }

    #[test]
    fn unknown_capabilities_get_suggestions() {
        let e = PolicyExpr::parse(r#"(("hostFailuresToTolarate" i1) ("wrongKey" i50) ("stripeWidth" i1))"#).unwrap();
        assert_eq!(
            e.unknown_capabilities(),
            vec![
                ("hostFailuresToTolarate", Some("hostFailuresToTolerate")),
                ("wrongKey", None)
            ]
        );
    }
}
