//! Latency percentiles for the demo and the benchmarks, from an HDR histogram
//! ([`hdrhistogram`]) instead of sorting every sample.
//!
//! The samples are microseconds; the histogram keeps [`SIGNIFICANT_DIGITS`] significant
//! digits, so a percentile is exact to 0.1 % — far below the noise of any run — and the
//! printed fields (`p50_ms`, `p99_ms`) keep their units: milliseconds, as floats.
//!
//! # Implementation caveats
//!
//! * A sample above [`LATENCY_US_MAX`] (one hour) counts as one hour.

use anyhow::Context;
use hdrhistogram::Histogram;

/// Significant decimal digits the histogram keeps.
pub const SIGNIFICANT_DIGITS: u8 = 3;
/// The longest latency recorded as itself, in microseconds (one hour).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// The distribution of a run's latencies.
pub struct Latencies {
    histogram: Histogram<u64>,
}

impl Latencies {
    /// The distribution of `samples_us` (microseconds).
    pub fn from_us(samples_us: &[u64]) -> anyhow::Result<Latencies> {
        let mut histogram = Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
            .context("create the latency histogram")?;
        for &sample in samples_us {
            histogram.saturating_record(sample.max(1));
        }
        Ok(Latencies { histogram })
    }

    /// The latency at `quantile` (0.5 for the median), in milliseconds; 0 without samples.
    pub fn percentile_ms(&self, quantile: f64) -> f64 {
        if self.histogram.is_empty() {
            return 0.0;
        }
        self.histogram.value_at_quantile(quantile) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_within_the_histograms_precision() {
        let samples: Vec<u64> = (1..=10_000).collect();
        let latencies = Latencies::from_us(&samples).unwrap();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(
            close(latencies.percentile_ms(0.50), 5.0),
            "{}",
            latencies.percentile_ms(0.5)
        );
        assert!(
            close(latencies.percentile_ms(0.99), 9.9),
            "{}",
            latencies.percentile_ms(0.99)
        );
        assert_eq!(Latencies::from_us(&[]).unwrap().percentile_ms(0.5), 0.0);
        let huge = Latencies::from_us(&[u64::MAX]).unwrap();
        assert!(huge.percentile_ms(0.5) >= 3_600_000.0 * 0.999);
    }
}
