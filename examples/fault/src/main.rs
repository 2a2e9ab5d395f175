//! A function that misbehaves on purpose, one way per path, so operators (and Atoll's
//! tests) can see how the node answers each failure:
//!
//! - `/trap`      — aborts (a guest trap)                              → 502
//! - `/exit`      — exits with status 3 after writing to stderr       → 502
//! - `/garbage`   — writes output that is not a CGI response          → 502
//! - `/loop`      — loops forever                                     → 504 after `[limits] timeout`
//! - `/spin?ms=N` — keeps the CPU busy for N ms, then answers 200
//! - `/recurse`   — recurses until the stack overflows                → 502
//! - `/grow`      — allocates until `[limits] memory` refuses          → 502
//! - `/leak`      — reports whether anything a previous request left in memory is visible:
//!   `CLEAN` in a fresh instance (always, in Atoll), `LEAKED` otherwise
//! - `/status`    — a well-formed `Status: 418` response               → 418
//! - anything else answers 200 "ok".

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Set by `/leak`; a fresh instance always starts with zero.
static LEFT_BEHIND: AtomicU64 = AtomicU64::new(0);

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    let query = std::env::var("QUERY_STRING").unwrap_or_default();
    match path.as_str() {
        "/trap" => {
            eprintln!("fault: about to trap");
            std::process::abort();
        }
        "/exit" => {
            eprintln!("fault: exiting with status 3");
            std::process::exit(3);
        }
        "/garbage" => print!("this is not a cgi response"),
        "/loop" => {
            eprintln!("fault: looping forever");
            let mut counter: u64 = 0;
            loop {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
        }
        "/spin" => {
            let millis = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("ms="))
                .and_then(|value| value.parse().ok())
                .unwrap_or(100);
            let until = Instant::now() + Duration::from_millis(millis);
            let mut counter: u64 = 0;
            while Instant::now() < until {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
            print!("Content-Type: text/plain\n\nspun {millis} ms\n");
        }
        "/recurse" => {
            eprintln!("fault: recursing without end");
            print!("Content-Type: text/plain\n\n{}\n", recurse(std::hint::black_box(1)));
        }
        "/grow" => {
            eprintln!("fault: allocating without end");
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "/leak" => {
            let previous = LEFT_BEHIND.swap(0xA7011, Ordering::SeqCst);
            let heap_marker = Box::new([0x5Au8; 4096]);
            std::hint::black_box(&heap_marker);
            let verdict = if previous == 0 { "CLEAN" } else { "LEAKED" };
            print!("Content-Type: text/plain\n\n{verdict}\n");
        }
        "/status" => print!("Status: 418 I'm a teapot\nContent-Type: text/plain\n\nshort and stout\n"),
        _ => print!("Content-Type: text/plain\n\nok\n"),
    }
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    frame[0] + recurse(depth + 1)
}
