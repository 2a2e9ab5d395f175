//! A function that misbehaves on purpose, one way per path, so operators (and Atoll's
//! tests) can see how the node answers each failure:
//!
//! - `/trap`    — executes `unreachable` (a guest trap)           → 502
//! - `/exit`    — exits with status 3 after writing to stderr      → 502
//! - `/garbage` — writes output that is not a CGI response         → 502
//! - `/status`  — a well-formed `Status: 418` response             → 418
//! - anything else answers 200 "ok".

fn main() {
    let path = std::env::var("PATH_INFO").unwrap_or_default();
    match path.as_str() {
        "/trap" => {
            eprintln!("fault: about to trap");
            std::process::abort();
        }
        "/exit" => {
            eprintln!("fault: exiting with status 3");
            std::process::exit(3);
        }
        "/garbage" => {
            print!("this is not a cgi response");
        }
        "/status" => {
            print!("Status: 418 I'm a teapot\nContent-Type: text/plain\n\nshort and stout\n");
        }
        _ => {
            print!("Content-Type: text/plain\n\nok\n");
        }
    }
}
