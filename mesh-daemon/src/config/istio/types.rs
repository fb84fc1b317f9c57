//! Value types shared by Istio's resources.
use std::{collections::BTreeMap, fmt, time::Duration as StdDuration};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Istio duration ("30s", "0.5s", "1m30s", "250ms"): Go's `time.ParseDuration` syntax,
/// which Istio accepts alongside protobuf's decimal seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t == "0" {
            return Ok(Self(StdDuration::ZERO));
        }
        if t.is_empty() || t.starts_with('-') {
            return Err(format!(
                "{s:?} is not a duration (expected e.g. \"30s\", \"250ms\", \"1m\")"
            ));
        }
        let mut nanos: u128 = 0;
        let mut rest = t;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(|| format!("{s:?}: missing unit (ns, us, ms, s, m, h)"))?;
            let (num, tail) = rest.split_at(num_end);
            let unit_end = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_end);
            let per: u128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => {
                    return Err(format!(
                        "{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                    ));
                }
            };
            let value: f64 = num
                .parse()
                .map_err(|_| format!("{s:?}: {num:?} is not a number"))?;
            nanos += (value * per as f64).round() as u128;
            rest = next;
        }
        let nanos = u64::try_from(nanos).map_err(|_| format!("{s:?} is too long"))?;
        Ok(Self(StdDuration::from_nanos(nanos)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !self.0.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ns", self.0.as_nanos())
        } else if !ms.is_multiple_of(1000) {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", self.0.as_secs())
        }
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Duration::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Istio's `StringMatch`: exactly one of exact, prefix, regex.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StringMatch {
    pub exact: Option<String>,
    pub prefix: Option<String>,
    pub regex: Option<String>,
}

/// A percentage, 0 to 100, fractions allowed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default, schemars::JsonSchema)]
pub struct Percent {
    pub value: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortSelector {
    pub number: Option<u32>,
}

/// A port number used as a map key: YAML writes it as `8080:` or `"8080":`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortKey(pub u64);

impl<'de> Deserialize<'de> for PortKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = PortKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<PortKey, E> {
                Ok(PortKey(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<PortKey, E> {
                u64::try_from(v)
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("port {v} must be in range 1..65535")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<PortKey, E> {
                v.parse()
                    .map(PortKey)
                    .map_err(|_| E::custom(format!("{v:?} is not a port number")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

impl schemars::JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": "A duration such as \"30s\", \"250ms\" or \"1m30s\"."
        })
    }
}

impl schemars::JsonSchema for PortKey {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "PortKey".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({"type": "string"})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_as_istio_accepts_them() {
        let d = |s: &str| Duration::parse(s).map(|d| d.0);
        assert_eq!(d("30s"), Ok(StdDuration::from_secs(30)));
        assert_eq!(d("0.5s"), Ok(StdDuration::from_millis(500)));
        assert_eq!(d("1m30s"), Ok(StdDuration::from_secs(90)));
        assert_eq!(d("250ms"), Ok(StdDuration::from_millis(250)));
        assert_eq!(d("1h"), Ok(StdDuration::from_secs(3600)));
        assert_eq!(d("0s"), Ok(StdDuration::ZERO));
        assert!(d("10").is_err());
        assert!(d("3x").is_err());
        assert!(d("-1s").is_err());
        assert!(d("").is_err());
        assert_eq!(
            Duration(StdDuration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }
}
