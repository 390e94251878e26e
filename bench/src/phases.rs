//! Where a suite's wall time goes: each phase's total (mesh up, quiet checks, warm-ups,
//! windows, finishing, memory runs, teardown, report), printed at the end and kept in the
//! report (`phases_s`).

use std::time::{Duration, Instant};

/// Totals per phase, in the order first seen.
#[derive(Debug, Default, Clone)]
pub struct Phases {
    totals: Vec<(&'static str, Duration)>,
}

impl Phases {
    pub fn add(&mut self, name: &'static str, d: Duration) {
        match self.totals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += d,
            None => self.totals.push((name, d)),
        }
    }

    /// Adds the time since `since` to `name` and returns now (the start of the next phase).
    pub fn lap(&mut self, name: &'static str, since: Instant) -> Instant {
        let now = Instant::now();
        self.add(name, now.saturating_duration_since(since));
        now
    }

    pub fn total(&self) -> Duration {
        self.totals.iter().map(|(_, d)| *d).sum()
    }

    /// `name 1.2s, name 3.4s, …` over `wall` (the rest, if any, as `other`).
    pub fn summary(&self, wall: Duration) -> String {
        let mut parts: Vec<String> = self
            .totals
            .iter()
            .map(|(n, d)| format!("{n} {:.1}s", d.as_secs_f64()))
            .collect();
        let rest = wall.saturating_sub(self.total());
        if rest >= Duration::from_millis(50) {
            parts.push(format!("other {:.1}s", rest.as_secs_f64()));
        }
        parts.join(", ")
    }

    /// Seconds per phase, rounded to ms.
    pub fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (n, d) in &self.totals {
            m.insert(
                (*n).to_string(),
                serde_json::json!((d.as_secs_f64() * 1000.0).round() / 1000.0),
            );
        }
        serde_json::Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up_and_keep_their_first_order() {
        let mut p = Phases::default();
        p.add("quiet", Duration::from_millis(200));
        p.add("window", Duration::from_millis(600));
        p.add("quiet", Duration::from_millis(300));
        assert_eq!(p.total(), Duration::from_millis(1100));
        assert_eq!(
            p.summary(Duration::from_millis(1500)),
            "quiet 0.5s, window 0.6s, other 0.4s"
        );
        assert_eq!(p.json(), serde_json::json!({"quiet": 0.5, "window": 0.6}));
        let t = Instant::now() - Duration::from_millis(5);
        let after = p.lap("window", t);
        assert!(after >= t);
        assert!(p.total() >= Duration::from_millis(1105));
    }
}
