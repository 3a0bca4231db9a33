//! JSON objects of options decoded with every key at most once.
//!
//! serde's `BTreeMap` keeps the last of two equal keys, so
//! `{"size":"1gb","size":"100gb"}` would silently mean `100gb`. A key given
//! twice has no single meaning, so these decoders refuse it and name it.
//! Use with `#[serde(deserialize_with = "...")]`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{Deserializer, Error, MapAccess, Visitor};

struct UniqueMap;

impl<'de> Visitor<'de> for UniqueMap {
    type Value = BTreeMap<String, String>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object of string values with each key once")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some((key, value)) = access.next_entry::<String, String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format_args!(
                    "duplicate key {key:?}; give each option once"
                )));
            }
            out.insert(key, value);
        }
        Ok(out)
    }
}

struct OptionalUniqueMap;

impl<'de> Visitor<'de> for OptionalUniqueMap {
    type Value = Option<BTreeMap<String, String>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("null or an object of string values with each key once")
    }

    fn visit_none<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        map(d).map(Some)
    }
}

/// An object of string values; a key given twice is an error.
pub fn map<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    d.deserialize_map(UniqueMap)
}

/// `null` or [`map`].
pub fn optional_map<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BTreeMap<String, String>>, D::Error> {
    d.deserialize_option(OptionalUniqueMap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[serde(default, deserialize_with = "map")]
        opts: BTreeMap<String, String>,
        #[serde(default, deserialize_with = "optional_map")]
        maybe: Option<BTreeMap<String, String>>,
    }

    #[test]
    fn a_key_given_twice_is_refused_by_name() {
        let b: Body = serde_json::from_str(r#"{"opts":{"a":"1","b":"2"},"maybe":null}"#).unwrap();
        assert_eq!(b.opts.len(), 2);
        assert_eq!(b.maybe, None);
        let b: Body = serde_json::from_str(r#"{"maybe":{"a":"1"}}"#).unwrap();
        assert_eq!(b.maybe.unwrap()["a"], "1");
        assert!(b.opts.is_empty());
        for bad in [
            r#"{"opts":{"size":"1gb","size":"100gb"}}"#,
            r#"{"maybe":{"size":"1gb","x":"","size":"1gb"}}"#,
        ] {
            let e = serde_json::from_str::<Body>(bad).unwrap_err().to_string();
            assert!(e.contains("duplicate key \"size\""), "{bad}: {e}");
        }
        assert!(serde_json::from_str::<Body>(r#"{"opts":{"a":5}}"#).is_err());
        assert!(serde_json::from_str::<Body>(r#"{"opts":null}"#).is_err());
    }
}
