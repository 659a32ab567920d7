//! Time as the scheduler sees it: the system clock in production, a manual one in tests, so
//! schedules, catch-up, retries and timeouts are tested without waiting.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use tally_model::time::now_micros;
use tokio::sync::watch;

#[async_trait]
pub trait Clock: Send + Sync + Debug {
    /// Microseconds since the Unix epoch.
    fn now(&self) -> i64;
    /// Returns once `now() >= t`.
    async fn sleep_until(&self, t: i64);
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

#[async_trait]
impl Clock for SystemClock {
    fn now(&self) -> i64 {
        now_micros()
    }

    async fn sleep_until(&self, t: i64) {
        let wait = t.saturating_sub(now_micros());
        if wait > 0 {
            tokio::time::sleep(Duration::from_micros(wait as u64)).await;
        }
    }
}

/// A clock that moves only when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: watch::Sender<i64>,
}

impl ManualClock {
    pub fn new(start: i64) -> Self {
        Self {
            now: watch::Sender::new(start),
        }
    }

    pub fn set(&self, t: i64) {
        self.now.send_replace(t);
    }

    pub fn advance(&self, d: Duration) {
        let d = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.now.send_modify(|t| *t = t.saturating_add(d));
    }
}

#[async_trait]
impl Clock for ManualClock {
    fn now(&self) -> i64 {
        *self.now.borrow()
    }

    async fn sleep_until(&self, t: i64) {
        let mut rx = self.now.subscribe();
        loop {
            if *rx.borrow_and_update() >= t {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
