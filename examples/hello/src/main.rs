//! The smallest useful WCGI function: a CGI response on stdout.
//!
//! `GREETING` comes from the manifest's `[env]`; everything else a request carries is in
//! the CGI environment (see the `echo` example).

fn main() {
    let greeting = std::env::var("GREETING").unwrap_or_else(|_| "Hello".to_string());
    let host = std::env::var("SERVER_NAME").unwrap_or_default();
    print!("Content-Type: text/plain; charset=utf-8\r\n\r\n{greeting} from Atoll on {host}!\n");
}
