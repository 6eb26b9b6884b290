//! Text a peer sent, made safe to log and print.
//!
//! Every string that arrives from a peer (a refusal's reason, a stack name, a QUIC close
//! reason, a token id) ends up in a log line or on a terminal. A newline in it would forge a
//! log line ("cycle committed"), and a terminal escape could rewrite the operator's screen. So
//! such text is escaped where it is decoded: control characters (C0, DEL, C1) and the Unicode
//! bidirectional overrides become `\n`, `\u{1b}`, `\u{202e}`…, everything else stays as sent.
//! The message types in [`crate::msg`] apply it to every string field as they deserialize.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer};

/// Whether `c` must not reach a log or a terminal as is.
fn dangerous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character and bidirectional override escaped (`\n`, `\u{1b}`);
/// borrowed when there is none.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(dangerous) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if dangerous(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Deserializes a string and escapes it (see [`escape_controls`]).
pub(crate) fn escaped<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    Ok(match escape_controls(&s) {
        Cow::Borrowed(_) => s,
        Cow::Owned(clean) => clean,
    })
}

/// [`escaped`] for a list of strings.
pub(crate) fn escaped_all<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<String>::deserialize(d)?
        .into_iter()
        .map(|s| escape_controls(&s).into_owned())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{Phase, SourceMsg, TargetMsg};

    #[test]
    fn controls_and_bidi_overrides_are_escaped_and_the_rest_kept() {
        assert!(matches!(
            escape_controls("plain ünïcode ✓"),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            escape_controls("ok\n2026-12-05T00:00:00Z INFO cycle committed"),
            "ok\\n2026-12-05T00:00:00Z INFO cycle committed"
        );
        assert_eq!(
            escape_controls("\u{1b}[2Jx\r\t\u{7f}"),
            "\\u{1b}[2Jx\\r\\t\\u{7f}"
        );
        assert_eq!(escape_controls("a\u{202e}b\u{85}"), "a\\u{202e}b\\u{85}");
    }

    #[test]
    fn strings_in_peer_messages_arrive_escaped() {
        let forged = "disk full\n2026-12-05T21:00:00Z  INFO cycle committed generation=9";
        let frame = crate::wire::encode_frame(&SourceMsg::Abort {
            phase: Phase::Transfer,
            reason: forged.into(),
        })
        .unwrap();
        match crate::wire::decode::<SourceMsg>(&frame[crate::wire::HEADER_LEN..]).unwrap() {
            SourceMsg::Abort { reason, .. } => {
                assert!(!reason.contains('\n'), "{reason}");
                assert!(reason.contains("disk full\\n2026"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let frame = crate::wire::encode_frame(&TargetMsg::Abort {
            phase: Phase::Commit,
            reason: "\u{1b}]0;owned\u{7}".into(),
        })
        .unwrap();
        match crate::wire::decode::<TargetMsg>(&frame[crate::wire::HEADER_LEN..]).unwrap() {
            TargetMsg::Abort { reason, .. } => assert_eq!(reason, "\\u{1b}]0;owned\\u{7}"),
            other => panic!("{other:?}"),
        }
    }
}
