//! Durations as people write them, in two forms.
//!
//! - [`Human`]: for messages (errors, logs): `4.5s`, `250ms`, `90s`. Debug-printing a `Duration`
//!   gives `4.5s` too but `1.2000000s`-style noise for some values and `0ns` for zero; and a
//!   caller reading "retry after 4.5s" should not have to parse Rust's notation.
//! - [`exact`] and the `serde` module: for the configuration, where a value printed by
//!   `check-config` must read back as the same duration. One unit, the largest that divides the
//!   value exactly, so `90s` stays `90s` (humantime would print `1m 30s`) and `300s` is `5m`.

use std::{fmt, time::Duration};

/// A duration for a message: whole or fractional seconds from one second up (`4.5s`, `90s`),
/// milliseconds below (`250ms`, `0.5ms`), and `0s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Human(pub Duration);

impl fmt::Display for Human {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.is_zero() {
            return f.write_str("0s");
        }
        let (value, unit) = if d >= Duration::from_secs(1) {
            (d.as_secs_f64(), "s")
        } else {
            (d.as_secs_f64() * 1000.0, "ms")
        };
        // Three decimals at most, trailing zeros dropped: 4.5s, 1.25s, 0.001ms.
        let text = format!("{value:.3}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        write!(f, "{text}{unit}")
    }
}

/// The duration in the largest of h, m, s, ms, us, ns that divides it exactly: `90s`, `5m`,
/// `1h`, `250ms`, `0s`. Parses back (humantime) to the same value.
pub fn exact(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".into();
    }
    const UNITS: [(u128, &str); 6] = [
        (3_600_000_000_000, "h"),
        (60_000_000_000, "m"),
        (1_000_000_000, "s"),
        (1_000_000, "ms"),
        (1_000, "us"),
        (1, "ns"),
    ];
    for (size, unit) in UNITS {
        if nanos % size == 0 {
            return format!("{}{unit}", nanos / size);
        }
    }
    unreachable!("every duration is a whole number of nanoseconds")
}

/// `#[serde(with = "crate::config::durations::serde")]`: reads `"30s"`, `"1m 30s"`, `"250ms"` (humantime),
/// writes [`exact`].
pub mod serde {
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::exact(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        humantime_serde::deserialize(d)
    }
}

/// Parses a duration as the configuration does (`500ms`, `2s`, `1m 30s`), for flags.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime_serde::re::humantime::parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_like_people_write() {
        let cases = [
            (Duration::from_millis(4500), "4.5s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_micros(500), "0.5ms"),
            (Duration::from_millis(1250), "1.25s"),
            (Duration::ZERO, "0s"),
        ];
        for (d, text) in cases {
            assert_eq!(Human(d).to_string(), text);
        }
    }

    #[test]
    fn configuration_values_keep_one_unit_and_parse_back() {
        let cases = [
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(300), "5m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_millis(250), "250ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::ZERO, "0s"),
            (Duration::from_nanos(7), "7ns"),
        ];
        for (d, text) in cases {
            assert_eq!(exact(d), text);
            assert_eq!(parse(text).unwrap(), d);
        }
    }
}
