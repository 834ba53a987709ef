//! Metrics for `/metrics`, read at one moment. The server and the engine each describe their
//! families as a [`MetricFamilies`]; the server puts them into one `prometheus-client`
//! [`Registry`] per scrape, whose encoder is the only writer of the exposition text
//! (OpenMetrics: a counter's family is named without `_total`, its samples with it).
//!
//! Why a snapshot and not live counters: every number already lives in one place (a
//! stream's status, the upstream pool, the replica table); copying it into `prometheus-client`
//! atomics would be a second owner to keep in step. A scrape reads the owners instead.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
pub use prometheus_client::registry::Registry;

/// A sample's labels: name and value pairs (values are written as given: keep them free of
/// `"`, `\` and line breaks, or escape them first).
pub type Labels = Vec<(&'static str, String)>;

/// A sample's value. Whole numbers are written as such (`3`, not `3.0`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Whole(u64),
    Real(f64),
}

impl From<u64> for Value {
    fn from(v: u64) -> Value {
        Value::Whole(v)
    }
}

impl From<usize> for Value {
    fn from(v: usize) -> Value {
        Value::Whole(v as u64)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Whole(u64::from(v))
    }
}

impl From<f64> for Value {
    fn from(v: f64) -> Value {
        Value::Real(v)
    }
}

#[derive(Debug)]
enum Samples {
    Counter(Vec<(Labels, Value)>),
    Gauge(Vec<(Labels, Value)>),
    /// A sum and a count: written as a histogram with its one `+Inf` bucket, the closest
    /// type `prometheus-client` has to a summary without quantiles (`rate(_sum) /
    /// rate(_count)` reads the same).
    SumCount(Vec<(Labels, f64, u64)>),
}

#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    samples: Samples,
}

/// Metric families read at one moment, to register with [`MetricFamilies::register`].
#[derive(Debug, Default)]
pub struct MetricFamilies {
    families: Vec<Family>,
}

impl MetricFamilies {
    pub fn new() -> MetricFamilies {
        MetricFamilies::default()
    }

    /// A counter family; `name` without `_total` (the encoder adds it).
    pub fn counter<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) {
        let samples = samples.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.push(name, help, Samples::Counter(samples));
    }

    pub fn gauge<V: Into<Value>>(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, V)>,
    ) {
        let samples = samples.into_iter().map(|(l, v)| (l, v.into())).collect();
        self.push(name, help, Samples::Gauge(samples));
    }

    /// A family of sums and counts (`name_sum`, `name_count`).
    pub fn sum_count(
        &mut self,
        name: &'static str,
        help: &'static str,
        samples: impl IntoIterator<Item = (Labels, f64, u64)>,
    ) {
        let samples = samples.into_iter().collect();
        self.push(name, help, Samples::SumCount(samples));
    }

    fn push(&mut self, name: &'static str, help: &'static str, samples: Samples) {
        self.families.push(Family {
            name,
            help,
            samples,
        });
    }

    pub fn register(self, registry: &mut Registry) {
        registry.register_collector(Box::new(self));
    }
}

impl Collector for MetricFamilies {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let kind = match family.samples {
                Samples::Counter(_) => MetricType::Counter,
                Samples::Gauge(_) => MetricType::Gauge,
                Samples::SumCount(_) => MetricType::Histogram,
            };
            let metric = encoder.encode_descriptor(family.name, family.help, None, kind)?;
            encode_samples(kind, &family.samples, metric)?;
        }
        Ok(())
    }
}

fn encode_samples(
    kind: MetricType,
    samples: &Samples,
    mut metric: MetricEncoder,
) -> std::fmt::Result {
    match samples {
        Samples::Counter(samples) | Samples::Gauge(samples) => {
            for (labels, value) in samples {
                if labels.is_empty() {
                    // One sample without labels: `name value`, not `name{} value`.
                    return encode_value(kind, *value, metric);
                }
                encode_value(kind, *value, metric.encode_family(labels)?)?;
            }
        }
        Samples::SumCount(samples) => {
            for (labels, sum, count) in samples {
                metric
                    .encode_family(labels)?
                    .encode_histogram::<NoLabelSet>(
                        *sum,
                        *count,
                        &[(f64::INFINITY, *count)],
                        None,
                    )?;
            }
        }
    }
    Ok(())
}

fn encode_value(kind: MetricType, value: Value, sample: MetricEncoder) -> std::fmt::Result {
    match (kind, value) {
        (MetricType::Counter, Value::Whole(v)) => ConstCounter::new(v).encode(sample),
        (MetricType::Counter, Value::Real(v)) => ConstCounter::new(v).encode(sample),
        (_, Value::Whole(v)) => ConstGauge::new(v).encode(sample),
        (_, Value::Real(v)) => ConstGauge::new(v).encode(sample),
    }
}

/// `registry` as OpenMetrics text, ending in `# EOF`.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)
        .expect("writing into a String cannot fail");
    text
}

/// The OpenMetrics text format's content type, for the response.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_written_by_prometheus_client() {
        let mut families = MetricFamilies::new();
        let stream = |id: &str| vec![("stream", id.to_string())];
        families.counter(
            "kibitz_frames",
            "Frames.",
            [(stream("a"), 12u64), (stream("b"), 0)],
        );
        families.gauge("kibitz_delay_seconds", "Delay.", [(stream("a"), 1.5)]);
        families.gauge("kibitz_streams", "Streams.", [(Labels::new(), 2usize)]);
        families.sum_count(
            "kibitz_latency_seconds",
            "Latency.",
            [(stream("a"), 3.5, 7)],
        );
        let mut registry = Registry::default();
        families.register(&mut registry);
        let text = encode(&registry);
        for line in [
            "# HELP kibitz_frames Frames.",
            "# TYPE kibitz_frames counter",
            "kibitz_frames_total{stream=\"a\"} 12",
            "kibitz_frames_total{stream=\"b\"} 0",
            "# TYPE kibitz_delay_seconds gauge",
            "kibitz_delay_seconds{stream=\"a\"} 1.5",
            "kibitz_streams 2",
            "# TYPE kibitz_latency_seconds histogram",
            "kibitz_latency_seconds_sum{stream=\"a\"} 3.5",
            "kibitz_latency_seconds_count{stream=\"a\"} 7",
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in:\n{text}"
            );
        }
    }
}
