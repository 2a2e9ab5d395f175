//! Names in a function's environment that are not the function's own: what each request
//! sets (CGI meta-variables and headers as `HTTP_*`), which a function's `[env]` and
//! secrets therefore cannot set, and what the node sets for bindings.

/// The variables a request sets in a function's environment besides `HTTP_*`
/// (`atoll_isolate::cgi::environment`).
const REQUEST_VARIABLES: [&str; 21] = [
    "GATEWAY_INTERFACE",
    "SERVER_SOFTWARE",
    "SERVER_PROTOCOL",
    "SERVER_NAME",
    "SERVER_PORT",
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "REQUEST_URI",
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "X_MATCHED_ROUTE",
    "X_FULL_URL",
    "X_RAW_PATH_INFO",
    "X_RELATIVE_PATH",
    "X_ATOLL_TRIGGER",
    "X_ATOLL_CRON_TICK",
    "HTTPS",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
];

/// Whether `name` is a variable a request may set, which a function's own `[env]` cannot.
pub fn is_request_variable(name: &str) -> bool {
    name.starts_with("HTTP_") || REQUEST_VARIABLES.contains(&name)
}

/// Whether `name` is set by the node for a function's bindings (`ATOLL_SERVICE_*`,
/// `ATOLL_ORIGIN`).
pub fn is_binding_variable(name: &str) -> bool {
    name.starts_with("ATOLL_SERVICE_") || name == "ATOLL_ORIGIN"
}
