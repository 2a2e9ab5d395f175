//! Running `wrk` and reading its report.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// What one wrk run measured.
#[derive(Debug, Clone)]
pub struct WrkReport {
    pub requests_per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub errors: u64,
}

/// How to load a server.
#[derive(Debug, Clone)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
}

pub fn run(url: &str, host: &str, load: &Load) -> Result<WrkReport> {
    let output = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &load.threads.to_string(),
            "-c",
            &load.connections.to_string(),
            "-d",
            &format!("{}s", load.duration.as_secs().max(1)),
            "-H",
            &format!("Host: {host}"),
            url,
        ])
        .output()
        .context("running wrk (install it with `apt-get install wrk`)")?;
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    parse(&String::from_utf8_lossy(&output.stdout))
}

pub fn parse(report: &str) -> Result<WrkReport> {
    let mut requests_per_second = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut errors = 0;
    for line in report.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            ["Requests/sec:", value] => requests_per_second = value.parse().ok(),
            ["50%", value] => p50 = parse_duration(value),
            ["99%", value] => p99 = parse_duration(value),
            ["Non-2xx", "or", "3xx", "responses:", count] => errors += count.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|field| field.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    Ok(WrkReport {
        requests_per_second: requests_per_second.context("wrk printed no Requests/sec")?,
        p50: p50.context("wrk printed no 50% latency")?,
        p99: p99.context("wrk printed no 99% latency")?,
        errors,
    })
}

fn parse_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// One JSON object per named result, for `--json`.
pub fn print_json(bench: &str, connections: u32, rows: &[(&str, &WrkReport)]) {
    for (scenario, result) in rows {
        println!(
            "{}",
            serde_json::json!({
                "bench": bench,
                "scenario": scenario,
                "connections": connections,
                "rps": result.requests_per_second.round(),
                "p50_us": result.p50.as_micros(),
                "p99_us": result.p99.as_micros(),
                "errors": result.errors,
            })
        );
    }
}

/// A table of named results under a header whose first column is `first`.
pub fn print_table(first: &str, rows: &[(&str, &WrkReport)]) {
    let width = rows
        .iter()
        .map(|(name, _)| name.len())
        .chain([first.len()])
        .max()
        .unwrap_or(0)
        + 2;
    println!(
        "{first:<width$} {:>12} {:>10} {:>10} {:>7}",
        "req/s", "p50", "p99", "errors"
    );
    for (name, result) in rows {
        println!(
            "{name:<width$} {:>12.0} {:>10} {:>10} {:>7}",
            result.requests_per_second,
            format!("{:?}", result.p50),
            format!("{:?}", result.p99),
            result.errors
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_wrk_report() {
        let report = "Running 5s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n\
          Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   235.12us  100.00us   4.00ms   90.00%\n\
          Latency Distribution\n     50%  206.00us\n     75%  250.00us\n     90%  300.00us\n     99%    1.20ms\n\
          678901 requests in 5.00s, 80.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n\
          Requests/sec: 135780.20\nTransfer/sec:     16.00MB\n";
        let parsed = parse(report).unwrap();
        assert_eq!(parsed.requests_per_second, 135780.20);
        assert_eq!(parsed.p50, Duration::from_micros(206));
        assert_eq!(parsed.p99, Duration::from_micros(1200));
        assert_eq!(parsed.errors, 3);
    }
}
