//! The small value languages of the config files: durations, percentages, bandwidths, addresses
//! and names. Each parser is public so the CLIs can accept the same spellings in flags; inside
//! the loader they run while TOML is being deserialised, so a bad value's error carries the
//! value's position.

use std::fmt;
use std::io;
use std::net::{Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroU64;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A `HOST:PORT` pair as written in the config: a host name, an IPv4 address or a bracketed
/// IPv6 address (`[::1]:4433`), and a port. Nothing is resolved when it is parsed; resolve with
/// [`ToSocketAddrs`] when connecting or binding.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// Host name or IP literal, IPv6 without brackets.
    pub host: String,
    pub port: u16,
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| Err(format!("invalid address {s:?}: {why} (expected HOST:PORT)"));
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let Some((host, port)) = rest.split_once("]:") else {
                return bad("a bracketed IPv6 address must be followed by `:PORT`");
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return bad("the part in brackets is not an IPv6 address");
            }
            (host, port)
        } else {
            let Some((host, port)) = s.rsplit_once(':') else {
                return bad("no port");
            };
            if host.contains(':') {
                return bad("an IPv6 address must be written in brackets, like `[::1]:4433`");
            }
            if host.is_empty() {
                return bad("no host (use `0.0.0.0` or `[::]` to listen on every address)");
            }
            if !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
            {
                return bad("the host may hold only letters, digits, `-`, `.` and `_`");
            }
            (host, port)
        };
        let Ok(port) = port.parse::<u16>() else {
            return bad("the port is not a number from 0 to 65535");
        };
        Ok(Address {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Address {
    /// The first address the host resolves to (a DNS name may give several; the first is what
    /// the system prefers). An error names the address.
    pub fn resolve(&self) -> io::Result<SocketAddr> {
        self.to_socket_addrs()
            .map_err(|e| io::Error::new(e.kind(), format!("resolving {self}: {e}")))?
            .next()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{self} resolves to no address"),
                )
            })
    }
}

impl ToSocketAddrs for Address {
    type Iter = std::vec::IntoIter<SocketAddr>;

    fn to_socket_addrs(&self) -> io::Result<Self::Iter> {
        (self.host.as_str(), self.port).to_socket_addrs()
    }
}

/// A share from 0 to 1 inclusive, written `0.5` or `"50%"` (`max_delete`). Displays as a
/// percentage.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fraction(f64);

/// `max_delete` when a stack file sets none: a cycle that would delete more than half of the
/// target's files stops.
pub const DEFAULT_MAX_DELETE: Fraction = Fraction(0.5);

impl Fraction {
    /// `None` unless `value` is a number from 0 to 1.
    pub fn new(value: f64) -> Option<Fraction> {
        (0.0..=1.0).contains(&value).then_some(Fraction(value))
    }

    pub fn get(self) -> f64 {
        self.0
    }
}

impl FromStr for Fraction {
    type Err = String;

    /// `"50%"`, `"12.5%"` or `"0.5"`.
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let value = match t.strip_suffix('%') {
            Some(pct) => pct.trim().parse::<f64>().ok().map(|p| p / 100.0),
            None => t.parse::<f64>().ok(),
        };
        match value {
            Some(v) if v.is_finite() => Fraction::new(v).ok_or_else(|| {
                format!("{s:?} is out of range: write a share from 0 to 1 (`0.5`) or 0% to 100%")
            }),
            _ => Err(format!(
                "{s:?} is not a share: write a number from 0 to 1 (`0.5`) or a percentage \
                 (`\"50%\"`)"
            )),
        }
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

/// Parses `"30s"`, `"5m"`, `"26h"`, `"1d"`, `"250ms"` or a sum of them (`"1h30m"`, `"1h 30m"`).
/// A bare number of seconds is written as a TOML integer (`30`), not as a string.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration: write e.g. \"30s\", \"5m\" or \"26h\"".to_owned());
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a whole number at {rest:?} (e.g. \"30s\", \
                 \"1h30m\")"
            ));
        }
        let (num, after) = rest.split_at(digits);
        let unit_len = after.bytes().take_while(u8::is_ascii_alphabetic).count();
        let (unit, after) = after.split_at(unit_len);
        let Ok(n) = num.parse::<u64>() else {
            return Err(format!("invalid duration {s:?}: {num} is too large"));
        };
        let part = match unit {
            "ms" => Some(Duration::from_millis(n)),
            "s" => Some(Duration::from_secs(n)),
            "m" => n.checked_mul(60).map(Duration::from_secs),
            "h" => n.checked_mul(3600).map(Duration::from_secs),
            "d" => n.checked_mul(86_400).map(Duration::from_secs),
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: {num} has no unit (write \"{num}s\", or the \
                     integer {num} without quotes for seconds)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        rest = after.trim_start();
    }
    Ok(total)
}

/// Parses a rate in bytes per second: `"20MiB/s"`, `"500 KB/s"`, `"1.5G"`, `"800000"`. The
/// `/s` is optional. `KiB`/`MiB`/`GiB`/`TiB` and the bare `K`/`M`/`G`/`T` (as rsync's
/// `--bwlimit` reads them) are powers of 1024; `KB`/`MB`/`GB`/`TB` are powers of 1000. Zero is
/// refused: no limit is written by leaving the key out.
pub fn parse_bandwidth(s: &str) -> Result<NonZeroU64, String> {
    let t = s.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    let num_len = t
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (num, unit) = t.split_at(num_len);
    let Ok(n) = num.parse::<f64>() else {
        return Err(format!(
            "invalid bandwidth {s:?}: expected a number and a unit, e.g. \"20MiB/s\""
        ));
    };
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(format!(
                "invalid bandwidth {s:?}: unknown unit {other:?} (use B, KiB, MiB, GiB, KB, MB \
                 or GB, optionally followed by /s)"
            ));
        }
    };
    let bytes = (n * scale).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("invalid bandwidth {s:?}: too large"));
    }
    // In range and finite, checked above; the cast cannot truncate.
    NonZeroU64::new(bytes as u64).ok_or_else(|| {
        format!(
            "invalid bandwidth {s:?}: must be more than 0 (leave bandwidth_limit out for no limit)"
        )
    })
}

/// Host (certificate) names, the same rule the certs crate enforces: 1 to 63 characters of
/// `a-z`, `0-9`, `-` and `.`, starting with a letter or digit.
pub fn check_host_name(name: &str) -> Result<(), String> {
    check_name(name, "host name", |b| b == b'-' || b == b'.')
}

/// Stack and Compose project names: 1 to 63 characters of `a-z`, `0-9`, `-` and `_`, starting
/// with a letter or digit (what Compose v2 accepts as a project name, and safe as a file name).
pub fn check_stack_name(name: &str) -> Result<(), String> {
    check_name(name, "stack name", |b| b == b'-' || b == b'_')
}

fn check_name(name: &str, what: &str, extra: impl Fn(u8) -> bool) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || extra(b));
    if ok {
        Ok(())
    } else {
        let allowed = if extra(b'.') {
            "`-` and `.`"
        } else {
            "`-` and `_`"
        };
        Err(format!(
            "invalid {what} {name:?}: use 1 to 63 lowercase letters, digits, {allowed}, \
             starting with a letter or digit"
        ))
    }
}

fn check_service_name(name: &str) -> Result<(), String> {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid service name {name:?}: use letters, digits, `-`, `_` and `.`"
        ))
    }
}

/// Environment variable names: a letter or `_`, then letters, digits and `_` (what a shell and
/// Compose's interpolation accept).
fn check_env_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let ok = bytes
        .next()
        .is_some_and(|b| b == b'_' || b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid variable name {name:?}: use letters, digits and `_`, not starting with a \
             digit"
        ))
    }
}

/// An absolute path without `..`, normalised (no `.` components, no trailing slash), so that
/// comparing two of them compares the directories they name (symlinks aside).
fn normalise_path(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!(
            "{s:?} is not an absolute path (paths in the config must start with `/`)"
        ));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                return Err(format!("{s:?} contains `..`; write the path it means"));
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    Ok(out)
}

/// A value the config accepts in several TOML shapes. Unimplemented shapes fall back to serde's
/// "invalid type … expected {EXPECTING}" error, which TOML places at the value.
trait ConfigValue: Sized {
    const EXPECTING: &'static str;
    fn from_toml_str(s: &str) -> Result<Self, String> {
        Err(format!(
            "invalid type: string {s:?}, expected {}",
            Self::EXPECTING
        ))
    }
    fn from_toml_int(i: i64) -> Result<Self, String> {
        Err(format!(
            "invalid type: integer `{i}`, expected {}",
            Self::EXPECTING
        ))
    }
    fn from_toml_float(f: f64) -> Result<Self, String> {
        Err(format!(
            "invalid type: float `{f}`, expected {}",
            Self::EXPECTING
        ))
    }
}

macro_rules! deserialize_via_config_value {
    ($($ty:ty),* $(,)?) => {$(
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(<$ty as ConfigValue>::EXPECTING)
                    }
                    fn visit_str<E: de::Error>(self, s: &str) -> Result<$ty, E> {
                        <$ty as ConfigValue>::from_toml_str(s).map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, i: i64) -> Result<$ty, E> {
                        <$ty as ConfigValue>::from_toml_int(i).map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, u: u64) -> Result<$ty, E> {
                        let i = i64::try_from(u).map_err(|_| E::custom("number too large"))?;
                        <$ty as ConfigValue>::from_toml_int(i).map_err(E::custom)
                    }
                    fn visit_f64<E: de::Error>(self, x: f64) -> Result<$ty, E> {
                        <$ty as ConfigValue>::from_toml_float(x).map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    )*};
}

deserialize_via_config_value!(
    Address,
    Fraction,
    Secs,
    BytesPerSec,
    StackName,
    HostName,
    ServiceName,
    EnvName,
    EnvValue,
    AbsPath,
);

impl ConfigValue for Address {
    const EXPECTING: &'static str = "an address string \"HOST:PORT\"";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        s.parse()
    }
}

impl ConfigValue for Fraction {
    const EXPECTING: &'static str = "a share from 0 to 1 (`0.5`) or a percentage (`\"50%\"`)";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        s.parse()
    }
    fn from_toml_int(i: i64) -> Result<Self, String> {
        match i {
            0 | 1 => Ok(Fraction(i as f64)),
            _ => Err(format!(
                "{i} is out of range: write a share from 0 to 1 (`0.5`) or a percentage \
                 (`\"{i}%\"`)"
            )),
        }
    }
    fn from_toml_float(f: f64) -> Result<Self, String> {
        Fraction::new(f).ok_or_else(|| {
            format!("{f} is out of range: write a share from 0 to 1 (`0.5`) or 0% to 100%")
        })
    }
}

/// A duration: a string for [`parse_duration`] or an integer number of seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Secs(pub(crate) Duration);

impl ConfigValue for Secs {
    const EXPECTING: &'static str =
        "a duration such as \"30s\", \"5m\", \"26h\" or an integer number of seconds";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        parse_duration(s).map(Secs)
    }
    fn from_toml_int(i: i64) -> Result<Self, String> {
        u64::try_from(i)
            .map(|s| Secs(Duration::from_secs(s)))
            .map_err(|_| format!("invalid duration {i}: must not be negative"))
    }
}

/// A rate for [`parse_bandwidth`], or an integer number of bytes per second.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BytesPerSec(pub(crate) NonZeroU64);

impl ConfigValue for BytesPerSec {
    const EXPECTING: &'static str = "a bandwidth such as \"20MiB/s\" or an integer of bytes/s";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        parse_bandwidth(s).map(BytesPerSec)
    }
    fn from_toml_int(i: i64) -> Result<Self, String> {
        u64::try_from(i)
            .ok()
            .and_then(NonZeroU64::new)
            .map(BytesPerSec)
            .ok_or_else(|| {
                format!(
                    "invalid bandwidth {i}: must be more than 0 (leave bandwidth_limit out for \
                     no limit)"
                )
            })
    }
}

macro_rules! string_value {
    ($ty:ident, $expecting:literal, $check:expr) => {
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
        pub(crate) struct $ty(pub(crate) String);

        impl ConfigValue for $ty {
            const EXPECTING: &'static str = $expecting;
            fn from_toml_str(s: &str) -> Result<Self, String> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(s).map(|()| $ty(s.to_owned()))
            }
        }
    };
}

string_value!(StackName, "a stack name string", check_stack_name);
string_value!(HostName, "a host name string", check_host_name);
string_value!(
    ServiceName,
    "a Compose service name string",
    check_service_name
);
string_value!(EnvName, "a variable name string", check_env_name);

/// The value of an environment variable: a string, or an integer written without quotes
/// (`HTTP_PORT = 18080`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EnvValue(pub(crate) String);

impl ConfigValue for EnvValue {
    const EXPECTING: &'static str = "a string (or an integer)";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        Ok(EnvValue(s.to_owned()))
    }
    fn from_toml_int(i: i64) -> Result<Self, String> {
        Ok(EnvValue(i.to_string()))
    }
}

/// See [`normalise_path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AbsPath(pub(crate) PathBuf);

impl ConfigValue for AbsPath {
    const EXPECTING: &'static str = "an absolute path string";
    fn from_toml_str(s: &str) -> Result<Self, String> {
        normalise_path(s).map(AbsPath)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_drops_dots_and_trailing_slash() {
        assert_eq!(normalise_path("/opt/./x/"), Ok(PathBuf::from("/opt/x")));
        assert!(normalise_path("/opt/../etc").is_err());
        assert!(normalise_path("opt/x").is_err());
    }

    #[test]
    fn fraction_display_is_a_percentage() {
        assert_eq!(Fraction(0.5).to_string(), "50%");
    }
}
