//! [`StackPath`]: a path inside a stack, as it travels on the wire.
//!
//! Paths are bytes, not strings: a Linux file name is any byte sequence without `/` and NUL, and a
//! data dir may hold names that are not UTF-8 or that contain newlines. A `StackPath` exists only
//! for a path that was checked: relative, non-empty, no empty, `.` or `..` component, no NUL, within
//! length bounds. Whether it resolves through a symlink is the driver's concern (it opens every
//! component with `O_NOFOLLOW` relative to the stack root); this type guarantees the lexical part.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH_LEN: usize = 4096;
/// Longest single component accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT_LEN: usize = 255;

/// Why a byte string is not a valid [`StackPath`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("absolute path {0}")]
    Absolute(String),
    #[error("path {0} has an empty component")]
    EmptyComponent(String),
    #[error("path {0} has a `.` component")]
    DotComponent(String),
    #[error("path {0} has a `..` component")]
    ParentComponent(String),
    #[error("path {0} contains a NUL byte")]
    Nul(String),
    #[error("path of {len} bytes is longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("path {0} has a component longer than 255 bytes")]
    ComponentTooLong(String),
}

/// A validated relative path inside a stack's root, `/`-separated, as raw bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StackPath(Vec<u8>);

/// A byte string on the wire; decoding checks it like [`StackPath::new`].
impl Serialize for StackPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for StackPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = serde_bytes::ByteBuf::deserialize(d)?;
        StackPath::new(bytes.into_vec()).map_err(serde::de::Error::custom)
    }
}

impl StackPath {
    /// Checks `bytes` and wraps them. This is the only way to make a `StackPath`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, PathError> {
        let bytes = bytes.into();
        let shown = || String::from_utf8_lossy(&bytes).escape_debug().to_string();
        if bytes.is_empty() {
            return Err(PathError::Empty);
        }
        if bytes.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong {
                len: bytes.len(),
                max: MAX_PATH_LEN,
            });
        }
        if bytes.contains(&0) {
            return Err(PathError::Nul(shown()));
        }
        if bytes[0] == b'/' {
            return Err(PathError::Absolute(shown()));
        }
        for component in bytes.split(|&b| b == b'/') {
            match component {
                b"" => return Err(PathError::EmptyComponent(shown())),
                b"." => return Err(PathError::DotComponent(shown())),
                b".." => return Err(PathError::ParentComponent(shown())),
                c if c.len() > MAX_COMPONENT_LEN => {
                    return Err(PathError::ComponentTooLong(shown()));
                }
                _ => {}
            }
        }
        Ok(Self(bytes))
    }

    /// The raw bytes, `/`-separated.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The components, first to last. Each is non-empty, not `.`/`..`, without `/` or NUL.
    pub fn components(&self) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.0.split(|&b| b == b'/')
    }

    /// The last component.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|&b| b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// The parent directory, or `None` for a top-level entry.
    pub fn parent(&self) -> Option<StackPath> {
        let i = self.0.iter().rposition(|&b| b == b'/')?;
        Some(Self(self.0[..i].to_vec()))
    }

    /// `self/name`, if `name` is a valid single component.
    pub fn join(&self, name: &[u8]) -> Result<StackPath, PathError> {
        if name.contains(&b'/') {
            let mut shown = self.0.clone();
            shown.push(b'/');
            shown.extend_from_slice(name);
            return Err(PathError::EmptyComponent(
                String::from_utf8_lossy(&shown).escape_debug().to_string(),
            ));
        }
        let mut bytes = Vec::with_capacity(self.0.len() + 1 + name.len());
        bytes.extend_from_slice(&self.0);
        bytes.push(b'/');
        bytes.extend_from_slice(name);
        Self::new(bytes)
    }

    /// Number of components; a top-level entry has depth 1.
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|&&b| b == b'/').count() + 1
    }

    /// True if `self` is `other` or lies below it.
    pub fn starts_with(&self, other: &StackPath) -> bool {
        self.0.starts_with(&other.0)
            && (self.0.len() == other.0.len() || self.0[other.0.len()] == b'/')
    }
}

impl TryFrom<Vec<u8>> for StackPath {
    type Error = PathError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, PathError> {
        Self::new(bytes)
    }
}

impl From<StackPath> for Vec<u8> {
    fn from(p: StackPath) -> Vec<u8> {
        p.0
    }
}

impl fmt::Display for StackPath {
    /// Lossy and escaped: for messages a person reads, never for file system calls.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0).escape_debug())
    }
}

impl fmt::Debug for StackPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StackPath(\"{self}\")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_nested_and_non_utf8_names() {
        for ok in [
            &b"a"[..],
            b"a/b/c",
            b"data/\xff\xfe.bin",
            b"with\nnewline",
            b"...",
            b".hidden",
        ] {
            assert_eq!(StackPath::new(ok).unwrap().as_bytes(), ok);
        }
    }

    #[test]
    fn rejects_traversal_absolute_and_malformed_paths() {
        type Case = (&'static [u8], fn(&PathError) -> bool);
        let cases: &[Case] = &[
            (b"", |e| matches!(e, PathError::Empty)),
            (b"/etc/passwd", |e| matches!(e, PathError::Absolute(_))),
            (b"..", |e| matches!(e, PathError::ParentComponent(_))),
            (b"a/../../etc", |e| {
                matches!(e, PathError::ParentComponent(_))
            }),
            (b"a/..", |e| matches!(e, PathError::ParentComponent(_))),
            (b"./a", |e| matches!(e, PathError::DotComponent(_))),
            (b"a/./b", |e| matches!(e, PathError::DotComponent(_))),
            (b"a//b", |e| matches!(e, PathError::EmptyComponent(_))),
            (b"a/", |e| matches!(e, PathError::EmptyComponent(_))),
            (b"a\0b", |e| matches!(e, PathError::Nul(_))),
        ];
        for (bytes, is_expected) in cases {
            let err = StackPath::new(*bytes).unwrap_err();
            assert!(is_expected(&err), "{bytes:?} gave {err:?}");
        }
        assert!(matches!(
            StackPath::new(vec![b'a'; MAX_PATH_LEN + 1]),
            Err(PathError::TooLong { .. })
        ));
        assert!(matches!(
            StackPath::new(vec![b'a'; 256]),
            Err(PathError::ComponentTooLong(_))
        ));
    }

    #[test]
    fn a_traversal_path_from_the_wire_does_not_decode() {
        for bad in [&b"../etc/passwd"[..], b"/abs", b"a/../../b", b"a\0b", b""] {
            let encoded = crate::wire::canonical(&serde_bytes::Bytes::new(bad));
            assert!(
                crate::wire::decode::<StackPath>(&encoded).is_err(),
                "{bad:?} decoded"
            );
        }
        let good = crate::wire::canonical(&StackPath::new("a/b").unwrap());
        assert_eq!(
            crate::wire::decode::<StackPath>(&good).unwrap().as_bytes(),
            b"a/b"
        );
    }

    #[test]
    fn join_refuses_slash_and_dotdot() {
        let base = StackPath::new("a").unwrap();
        assert!(base.join(b"b/c").is_err());
        assert!(base.join(b"..").is_err());
        assert_eq!(base.join(b"b").unwrap().as_bytes(), b"a/b");
    }

    #[test]
    fn parent_file_name_and_prefix() {
        let p = StackPath::new("a/b/c").unwrap();
        assert_eq!(p.file_name(), b"c");
        assert_eq!(p.parent().unwrap().as_bytes(), b"a/b");
        assert_eq!(p.depth(), 3);
        assert!(p.starts_with(&StackPath::new("a/b").unwrap()));
        assert!(
            !StackPath::new("a/bc")
                .unwrap()
                .starts_with(&StackPath::new("a/b").unwrap())
        );
        assert!(StackPath::new("a").unwrap().parent().is_none());
    }
}
