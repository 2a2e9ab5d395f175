//! Latency samples and their percentiles.

use std::time::Duration;

/// The `percentile`-th percentile (0–100) of `sorted` by the nearest-rank method: the
/// smallest sample with at least `percentile`% of all samples at or below it. No
/// interpolation, so the answer is always a latency that was actually measured.
///
/// Panics if `sorted` is empty.
pub fn percentile(sorted: &[Duration], percentile: f64) -> Duration {
    assert!(!sorted.is_empty(), "no samples");
    debug_assert!(sorted.is_sorted(), "samples must be sorted");
    let rank = (percentile / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// p50 and p99 of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Summary {
    pub fn of(mut samples: Vec<Duration>) -> Summary {
        samples.sort_unstable();
        let micros = |duration: Duration| duration.as_nanos() as f64 / 1_000.0;
        Summary {
            p50_us: micros(percentile(&samples, 50.0)),
            p99_us: micros(percentile(&samples, 99.0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn micros(values: impl IntoIterator<Item = u64>) -> Vec<Duration> {
        values.into_iter().map(Duration::from_micros).collect()
    }

    #[test]
    fn nearest_rank_percentiles() {
        let samples = micros(1..=100);
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
        assert_eq!(percentile(&samples, 0.0), Duration::from_micros(1));

        let odd = micros([10, 20, 30]);
        assert_eq!(percentile(&odd, 50.0), Duration::from_micros(20));
        assert_eq!(percentile(&odd, 99.0), Duration::from_micros(30));

        let single = micros([7]);
        assert_eq!(percentile(&single, 50.0), Duration::from_micros(7));
        assert_eq!(percentile(&single, 99.0), Duration::from_micros(7));
    }

    #[test]
    fn summary_sorts_its_samples() {
        let mut samples = micros(1..=1000);
        samples.reverse();
        samples.push(Duration::from_nanos(500));
        let summary = Summary::of(samples);
        assert_eq!(summary.p50_us, 500.0);
        assert_eq!(summary.p99_us, 990.0);
    }
}
