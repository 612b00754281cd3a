//! Scheduled rotation: every `rotation.check_interval`, each tenant whose newest key version
//! is older than its period (`rotation.tenants` override, else `rotation.period`) is
//! rotated. Safe with several daemons on one key store: the rotation is a compare-and-set on
//! the version the scheduler saw, so exactly one daemon creates the next version and the
//! others get `rotation_conflict` and change nothing. Audited like a manual rotation, under
//! the identity `phiseald:rotation-schedule`.

use std::sync::Arc;
use std::time::Duration;

use phiseal::{Actor, Caller, Error, Keyring, TenantId};

use crate::config::RotationConfig;
use crate::metrics::{Metrics, OpLabels};

/// Whether any tenant has a rotation period.
pub fn enabled(config: &RotationConfig) -> bool {
    config.period.is_some() || !config.tenants.is_empty()
}

fn period_of(config: &RotationConfig, tenant: &TenantId) -> Option<Duration> {
    config
        .tenants
        .get(tenant.as_str())
        .copied()
        .or(config.period)
}

fn scheduler_actor() -> Actor {
    crate::auth::daemon_actor("rotation-schedule")
}

/// One pass over every tenant; returns how many were rotated. Stops early (the remaining
/// tenants wait for the next pass) once `shutdown` turns true.
pub async fn run_once(
    keyring: &Keyring,
    config: &RotationConfig,
    metrics: &Metrics,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> usize {
    let tenants = match keyring.list_tenants().await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "rotation schedule: cannot list tenants; will retry");
            return 0;
        }
    };
    let mut rotated = 0;
    for tenant in tenants {
        if *shutdown.borrow() {
            tracing::info!("rotation schedule: shutting down; the rest of this pass is skipped");
            break;
        }
        let Some(period) = period_of(config, &tenant) else {
            continue;
        };
        let due = match keyring
            .rotation_due(&tenant, period, jiff::Timestamp::now())
            .await
        {
            Ok(Some(latest)) => latest,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "rotation schedule: cannot read key status");
                continue;
            }
        };
        let caller = Caller::new(scheduler_actor());
        let result = keyring.rotate_if_latest(&caller, &tenant, due).await;
        let label = match &result {
            Ok(version) => {
                rotated += 1;
                tracing::info!(tenant = %tenant, version, request_id = %caller.request_id, "scheduled rotation");
                "ok"
            }
            Err(Error::RotationConflict { .. }) => {
                tracing::info!(tenant = %tenant, "scheduled rotation: another daemon rotated first");
                "rotation_conflict"
            }
            Err(e) => {
                tracing::warn!(tenant = %tenant, error = %e, "scheduled rotation failed; will retry");
                e.kind()
            }
        };
        metrics
            .scheduled_rotations
            .get_or_create(&OpLabels {
                action: "rotate_key",
                result: label,
            })
            .inc();
    }
    rotated
}

/// Runs passes until `shutdown` turns true.
pub async fn run(
    keyring: Keyring,
    config: RotationConfig,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(config.check_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Shutdown first: after a long pass the next tick is ready at once too.
        tokio::select! {
            biased;
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        run_once(&keyring, &config, &metrics, &shutdown).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use phiseal::BackendError;
    use phiseal::audit::{Action, AuditEvent, AuditSink};

    /// An audit sink that keeps nothing and requests shutdown when the first rotation starts
    /// (at its `attempt` record): a test double, to stop a pass in its middle.
    #[derive(Debug)]
    struct ShutdownAtFirstRotation(Arc<tokio::sync::watch::Sender<bool>>);

    #[async_trait::async_trait]
    impl AuditSink for ShutdownAtFirstRotation {
        fn name(&self) -> &str {
            "shutdown-at-first-rotation"
        }
        async fn append(&self, events: &[AuditEvent]) -> Result<(), BackendError> {
            if events.iter().any(|e| e.action == Action::RotateKey) {
                self.0.send_replace(true);
            }
            Ok(())
        }
        async fn flush(&self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_pass_stops_between_tenants_at_shutdown_and_the_scheduler_stops_while_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stop = Arc::new(stop);
        let keyring = phiseal_embedded::builder(dir.path(), &Default::default())
            .unwrap()
            .audit(Arc::new(ShutdownAtFirstRotation(Arc::clone(&stop))))
            .build()
            .unwrap();
        let caller = Caller::new(scheduler_actor());
        for name in ["a", "b", "c"] {
            let tenant = TenantId::new(name).unwrap();
            keyring.create_tenant(&caller, &tenant).await.unwrap();
        }
        let config = RotationConfig {
            period: Some(Duration::from_secs(1)),
            ..RotationConfig::default()
        };
        let metrics = Metrics::new(&mut prometheus_client::registry::Registry::default());
        tokio::time::sleep(Duration::from_millis(1100)).await;
        // Three tenants are due; shutdown is requested while the first one rotates: that one
        // finishes, the others wait for the next start.
        assert_eq!(run_once(&keyring, &config, &metrics, &stopped).await, 1);
        // Already requested: nothing at all.
        assert_eq!(run_once(&keyring, &config, &metrics, &stopped).await, 0);
        run(
            keyring.clone(),
            config.clone(),
            Arc::clone(&metrics),
            stopped.clone(),
        )
        .await;

        // The scheduler waiting for its next check (an hour away) stops at once on shutdown.
        stop.send_replace(false);
        let idle = RotationConfig {
            period: Some(Duration::from_secs(3600)),
            check_interval: Duration::from_secs(3600),
            ..RotationConfig::default()
        };
        // (A fresh receiver: it has seen no change yet.)
        let scheduler = tokio::spawn(run(
            keyring.clone(),
            idle,
            Arc::clone(&metrics),
            stop.subscribe(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!scheduler.is_finished(), "stopped without a shutdown");
        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), scheduler)
            .await
            .expect("the scheduler did not stop at shutdown")
            .unwrap();
        // Without shutdown a due tenant rotates (this sink then requests shutdown again at
        // its attempt record, so the pass ends after it).
        stop.send_replace(false);
        assert_eq!(run_once(&keyring, &config, &metrics, &stopped).await, 1);
    }
}
