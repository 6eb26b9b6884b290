//! Keeping a running agent's own certificate valid: decide whether it is due for renewal and,
//! where this host can, renew it.
//!
//! An agent calls [`renew_if_due`] at start and then periodically (the target daemon: hourly),
//! and acts on the [`Renewal`] it gets back: log, set its expiry metric, alert when the
//! certificate is due and could not be renewed, and after [`Renewal::Renewed`] give new
//! connections the new certificate (e.g. `quinn::Endpoint::set_server_config` with a fresh
//! [`server_config`](crate::server_config)). This module decides nothing about alerts or logs.
//!
//! # When a certificate is due
//!
//! A certificate valid from `not_before` to `not_after` is due once less than
//! **min(lifetime / 3, [`RENEW_WARN_DAYS`] days)** of it is left, where
//! `lifetime = not_after - not_before` ([`due_at`]):
//!
//! - the default 90-day certificate is due 30 days before it expires, the moment `show` and the
//!   agents start warning;
//! - a longer one (a year) is also due 30 days before: a month is plenty to notice a failing
//!   renewal, and renewing every four months would only churn keys;
//! - a shorter one is due when a third of its life is left, so a certificate issued for 10 days
//!   is not "due" from the moment it is installed.
//!
//! # How it is renewed
//!
//! - A host that enrolled over the network has the enrollment server's address in its state
//!   directory (`server`, written by `enroll`): it renews over mutual TLS with its current
//!   certificate ([`renew`](crate::renew)), with a fresh key made here.
//! - The CA host itself (its state directory holds `ca.key`) re-issues its own certificate
//!   locally ([`renew_local`](crate::renew_local)); no network is involved.
//! - Any other host (enrolled offline with `csr` / `sign` / `install`) cannot renew on its own:
//!   [`Renewal::DueButNoServer`]. A person runs `stackclone-certs renew --server HOST:PORT` or
//!   the offline path again.
//!
//! A certificate that already expired cannot be renewed over the network (the CA accepts a
//! renewal only from a valid certificate); that comes back as [`Renewal::Failed`].

use time::{Duration, OffsetDateTime};

use crate::error::TrustError;
use crate::files::StateDir;
use crate::identity::{Identity, PeerIdentity};
use crate::{DEFAULT_CERT_DAYS, RENEW_WARN_DAYS};

/// What [`renew_if_due`] found and did.
#[derive(Debug)]
pub enum Renewal {
    /// The certificate is valid and not yet due; it expires at `expires`.
    NotDue { expires: OffsetDateTime },
    /// It was due and has been renewed: the new identity is installed in the state directory
    /// (new key, new certificate; name, role and flag key unchanged).
    Renewed { identity: Box<Identity> },
    /// It is due, but this host has no enrollment server recorded and is not the CA host, so
    /// it cannot renew on its own. It expires at `expires`.
    DueButNoServer { expires: OffsetDateTime },
    /// It is due and renewing it failed; the current certificate (expiring at `expires`) stays
    /// in place.
    Failed {
        error: TrustError,
        expires: OffsetDateTime,
    },
}

impl Renewal {
    /// When the certificate in force after this outcome expires (the new one after a renewal).
    pub fn expires(&self) -> OffsetDateTime {
        match self {
            Renewal::NotDue { expires }
            | Renewal::DueButNoServer { expires }
            | Renewal::Failed { expires, .. } => *expires,
            Renewal::Renewed { identity } => identity.info().not_after,
        }
    }
}

/// The moment `cert` becomes due for renewal: `not_after - min(lifetime / 3, RENEW_WARN_DAYS)`
/// (see the module docs).
pub fn due_at(cert: &PeerIdentity) -> OffsetDateTime {
    let lifetime: Duration = (cert.not_after - cert.not_before).max(Duration::ZERO);
    let margin = (lifetime / 3_i32).min(Duration::days(RENEW_WARN_DAYS));
    cert.not_after - margin
}

/// Whether `cert` is due for renewal at `now` (an expired certificate is due).
pub fn is_due(cert: &PeerIdentity, now: OffsetDateTime) -> bool {
    now >= due_at(cert)
}

/// Loads this host's identity from `dir` and, if it is due at `now`, renews it (see the module
/// docs for how). An error means the current identity could not even be read; everything
/// that happens after that is in the [`Renewal`].
pub async fn renew_if_due(dir: &StateDir, now: OffsetDateTime) -> Result<Renewal, TrustError> {
    let current = Identity::load(dir)?;
    let expires = current.info().not_after;
    if !is_due(current.info(), now) {
        return Ok(Renewal::NotDue { expires });
    }
    let renewed = if dir.has(&dir.ca_key()) {
        crate::renew_local(dir, DEFAULT_CERT_DAYS)
    } else if dir.has(&dir.server()) {
        crate::renew(&crate::RenewOptions {
            dir: dir.clone(),
            server: None,
        })
        .await
    } else {
        return Ok(Renewal::DueButNoServer { expires });
    };
    Ok(match renewed {
        Ok(identity) => Renewal::Renewed {
            identity: Box::new(identity),
        },
        Err(error) => Renewal::Failed { error, expires },
    })
}

/// What [`refresh_deny_list`] did.
#[derive(Debug)]
pub enum DenyRefresh {
    /// This host is the CA host (its `revoke` writes the list here) or has no enrollment server
    /// recorded (enrolled offline: lists arrive by `install` or from peers).
    NoServer,
    /// Fetched; whether it was newer than the list in force here (and so written to `deny.json`,
    /// where the agents' next handshake reads it).
    Fetched { adopted: bool },
    /// The server could not be asked; the list in force stays.
    Failed(TrustError),
}

/// Asks the enrollment server recorded by `enroll` for the CA's newest deny list, over mutual
/// TLS, and adopts it if newer. Agents call it with their certificate check (hourly), so a
/// `revoke` reaches a host that no peer tells, such as a target whose only sources never
/// carry the new list. A failure is logged as a warning here; the caller needs to do nothing.
pub async fn refresh_deny_list(dir: &StateDir) -> DenyRefresh {
    let outcome = fetch_if_enrolled(dir).await;
    match &outcome {
        DenyRefresh::Failed(e) => {
            tracing::warn!(error = %e, "cannot fetch the deny list from the enrollment server; the one in force stays");
        }
        DenyRefresh::Fetched { adopted } => {
            tracing::debug!(adopted, "deny list fetched from the enrollment server");
        }
        DenyRefresh::NoServer => {}
    }
    outcome
}

async fn fetch_if_enrolled(dir: &StateDir) -> DenyRefresh {
    if dir.has(&dir.ca_key()) {
        return DenyRefresh::NoServer;
    }
    let server = match dir.read_optional(&dir.server()) {
        Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).trim().to_owned(),
        Ok(None) => return DenyRefresh::NoServer,
        Err(e) => return DenyRefresh::Failed(e),
    };
    match crate::fetch_deny_list(dir, &server).await {
        Ok(adopted) => DenyRefresh::Fetched { adopted },
        Err(e) => DenyRefresh::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Ca, CertProfile, Role};

    fn cert(from_now: Duration, to_now: Duration) -> PeerIdentity {
        let ca = Ca::create("test", 30).unwrap();
        let now = OffsetDateTime::now_utc();
        let profile = CertProfile {
            not_before: now + from_now,
            not_after: now + to_now,
            ..CertProfile::new("standby", Role::Target, None, 1)
        };
        ca.new_host(&profile).unwrap().identity.info().clone()
    }

    fn at(cert: &PeerIdentity, before_expiry: Duration) -> OffsetDateTime {
        cert.not_after - before_expiry
    }

    #[test]
    fn ninety_day_certificate_is_due_thirty_days_before_expiry() {
        let c = cert(Duration::ZERO, Duration::days(90));
        // X.509 times have whole seconds; allow for the truncation.
        assert!((due_at(&c) - (c.not_after - Duration::days(30))).abs() < Duration::seconds(2));
        assert!(!is_due(&c, at(&c, Duration::days(31))));
        assert!(is_due(&c, at(&c, Duration::days(29))));
    }

    #[test]
    fn long_certificate_is_due_thirty_days_before_expiry_not_a_third() {
        let c = cert(Duration::ZERO, Duration::days(365));
        // A third of a year (~122 days) left: not due yet.
        assert!(!is_due(&c, at(&c, Duration::days(100))));
        assert!(!is_due(&c, at(&c, Duration::days(31))));
        assert!(is_due(&c, at(&c, Duration::days(29))));
    }

    #[test]
    fn short_certificate_is_due_when_a_third_of_its_life_is_left() {
        let c = cert(Duration::ZERO, Duration::days(9));
        // 30 days would make it due from the start; a third (3 days) is the margin.
        assert!(!is_due(&c, c.not_before + Duration::hours(1)));
        assert!(!is_due(&c, at(&c, Duration::days(4))));
        assert!(is_due(&c, at(&c, Duration::hours(71))));
    }

    #[test]
    fn expired_certificate_is_due() {
        let c = cert(Duration::days(-10), Duration::days(-1));
        assert!(is_due(&c, OffsetDateTime::now_utc()));
    }

    #[test]
    fn renewed_outcome_reports_the_new_expiry() {
        let ca = Ca::create("test", 30).unwrap();
        let host = ca
            .new_host(&CertProfile::new("standby", Role::Target, None, 60))
            .unwrap();
        let not_after = host.identity.info().not_after;
        let r = Renewal::Renewed {
            identity: Box::new(host.identity),
        };
        assert_eq!(r.expires(), not_after);
    }

    #[tokio::test]
    async fn due_certificate_without_server_or_ca_key_is_reported_not_renewed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("id"));
        let ca = Ca::create("test", 30).unwrap();
        let now = OffsetDateTime::now_utc();
        let profile = CertProfile {
            not_before: now - Duration::days(20),
            not_after: now + Duration::days(2),
            ..CertProfile::new("standby", Role::Target, None, 1)
        };
        let host = ca.new_host(&profile).unwrap();
        host.save(&dir).unwrap();
        let before = std::fs::read(dir.host_cert()).unwrap();
        match renew_if_due(&dir, now).await.unwrap() {
            Renewal::DueButNoServer { expires } => {
                assert_eq!(expires, host.identity.info().not_after)
            }
            other => panic!("expected DueButNoServer, got {other:?}"),
        }
        // Nothing was touched.
        assert_eq!(std::fs::read(dir.host_cert()).unwrap(), before);
        // Not due: the same directory a month earlier.
        match renew_if_due(&dir, now - Duration::days(30)).await.unwrap() {
            Renewal::NotDue { expires } => assert_eq!(expires, host.identity.info().not_after),
            other => panic!("expected NotDue, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn due_certificate_on_the_ca_host_is_renewed_locally() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path().join("ca"));
        let first = crate::init(&dir, "primary", 5).unwrap();
        let now = OffsetDateTime::now_utc();
        // 5 days of life, a third is ~1.7 days: due from 2 days before expiry.
        assert!(matches!(
            renew_if_due(&dir, now).await.unwrap(),
            Renewal::NotDue { .. }
        ));
        let later = first.info().not_after - Duration::days(1);
        let renewed = match renew_if_due(&dir, later).await.unwrap() {
            Renewal::Renewed { identity } => identity,
            other => panic!("expected Renewed, got {other:?}"),
        };
        assert_eq!(renewed.name(), "primary");
        assert_eq!(renewed.role(), Role::Source);
        assert_eq!(renewed.info().flag_key, first.info().flag_key);
        assert_ne!(renewed.info().fingerprint, first.info().fingerprint);
        assert!(renewed.info().not_after - now > Duration::days(DEFAULT_CERT_DAYS - 1));
        // What is on disk is the new certificate.
        let on_disk = Identity::load(&dir).unwrap();
        assert_eq!(on_disk.info().fingerprint, renewed.info().fingerprint);
    }
}
