//! Clock, payloads and latency histograms shared by every scenario.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use hdrhistogram::Histogram;
use memchr::memmem;

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds since the process started. Publishers and subscribers live in this one
/// process, so a timestamp written into a payload is comparable with the receiver's clock.
pub fn now_us() -> u64 {
    epoch().elapsed().as_micros() as u64
}

/// Characters of padding in every payload, so that rows are about 100 bytes of `data`, the
/// size of a typical streamed token or progress event.
const PAD: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

/// An event's `data`: the send time (for latency), a counter and padding.
pub fn payload(ts: u64, n: u64) -> String {
    format!("{{\"ts\":{ts},\"n\":{n},\"pad\":\"{PAD}\"}}")
}

/// One event as the REST/WS append body expects it.
pub fn event_json(ts: u64, n: u64, id: Option<&str>) -> String {
    let data = payload(ts, n);
    match id {
        Some(id) => format!("{{\"type\":\"token\",\"id\":\"{id}\",\"data\":{data}}}"),
        None => format!("{{\"type\":\"token\",\"data\":{data}}}"),
    }
}

/// A JSON array of `n` events.
pub fn batch_json(n: usize, counter: u64) -> String {
    let ts = now_us();
    let mut s = String::with_capacity(n * 140);
    s.push('[');
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&event_json(ts, counter + i as u64, None));
    }
    s.push(']');
    s
}

/// The unsigned integer right after `key` (e.g. `"seq":`) in `hay`, if any.
pub fn u64_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let at = memmem::find(hay, key)? + key.len();
    parse_u64(&hay[at..])
}

/// Leading ASCII digits as a number.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let mut n: u64 = 0;
    let mut any = false;
    for &b in s {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        any = true;
    }
    any.then_some(n)
}

/// A latency histogram in microseconds, sharded so that thousands of subscriber tasks on
/// different worker threads rarely contend on one lock.
pub struct Latencies {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Latencies {
    pub fn new() -> Self {
        let shards = (0..16)
            .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")))
            .collect();
        Latencies { shards }
    }

    pub fn record(&self, shard: usize, us: u64) {
        let mut h = self.shards[shard % self.shards.len()].lock().expect("hist");
        h.saturating_record(us.max(1));
    }

    /// Adds every value of `h` (recorded elsewhere) to the first shard.
    pub fn add(&self, h: &Histogram<u64>) {
        self.shards[0]
            .lock()
            .expect("hist")
            .add(h)
            .expect("same bounds");
    }

    pub fn merged(&self) -> Histogram<u64> {
        let mut all = Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds");
        for s in &self.shards {
            all.add(&*s.lock().expect("hist")).expect("same bounds");
        }
        all
    }
}

/// p50/p99/max of a histogram in milliseconds.
pub fn percentiles_ms(h: &Histogram<u64>) -> (f64, f64, f64) {
    if h.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    (
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.99)),
        ms(h.max()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers_after_keys() {
        let env = br#"{"stream":"s","seq":17,"type":"token","data":{"ts":123,"n":4}}"#;
        assert_eq!(u64_after(env, b"\"seq\":"), Some(17));
        assert_eq!(u64_after(env, b"\"ts\":"), Some(123));
        assert_eq!(u64_after(env, b"\"nope\":"), None);
        assert_eq!(parse_u64(b"x1"), None);
    }

    #[test]
    fn payload_is_json_with_its_timestamp() {
        let p = payload(42, 7);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["ts"], 42);
        assert!((90..=120).contains(&p.len()), "{}", p.len());
        let b: serde_json::Value = serde_json::from_str(&batch_json(3, 0)).unwrap();
        assert_eq!(b.as_array().unwrap().len(), 3);
    }
}
