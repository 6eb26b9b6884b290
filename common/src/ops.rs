//! What a daemon tells the world besides its peer: alerts and metrics, behind one handle both
//! agents share.
//!
//! A failing alert channel is logged (by [`Notifier::send`]) and counted in
//! `stackclone_alert_failures_total`, never returned as a cycle error: alerts must never fail
//! or delay the work they report on, so [`Ops::alert_in_background`] exists for callers that
//! must not wait.

use std::sync::{Arc, RwLock};

use crate::alert::{Alert, AlertConfig, Notifier};
use crate::metrics::Metrics;

/// Alerts and metrics of one running agent.
#[derive(Debug)]
pub struct Ops {
    /// This host's name (its certificate name), put in every alert.
    pub host: String,
    pub metrics: Arc<Metrics>,
    notifier: RwLock<Notifier>,
}

impl Ops {
    pub fn new(host: impl Into<String>, alerts: AlertConfig, metrics: Arc<Metrics>) -> Ops {
        Ops {
            host: host.into(),
            metrics,
            notifier: RwLock::new(Notifier::new(alerts)),
        }
    }

    /// Replaces the alert channels (a config reload). Alerts already being sent finish on the
    /// old ones.
    pub fn set_alerts(&self, alerts: AlertConfig) {
        let mut notifier = self.notifier.write().unwrap_or_else(|p| p.into_inner());
        if notifier.config() != &alerts {
            *notifier = Notifier::new(alerts);
        }
    }

    /// The current alert channels.
    pub fn alerts(&self) -> AlertConfig {
        self.notifier().config().clone()
    }

    fn notifier(&self) -> Notifier {
        self.notifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends `alert` to every configured channel and waits for them (each bounded by the
    /// notifier's timeout); failures are logged and counted, not returned.
    pub async fn alert(&self, alert: Alert) {
        let errors = self.notifier().send(&alert).await;
        self.metrics.record_alert_errors(&errors);
    }

    /// [`alert`](Self::alert) in a spawned task. Must be called inside a tokio runtime.
    pub fn alert_in_background(self: &Arc<Self>, alert: Alert) -> tokio::task::JoinHandle<()> {
        let ops = self.clone();
        tokio::spawn(async move { ops.alert(alert).await })
    }
}
