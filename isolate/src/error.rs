//! Errors of the isolate layer, shaped for what the caller does with them: a module that is
//! refused ([`IsolateError::Invalid`]) versus a cache or I/O problem on the node.

#[derive(Debug, thiserror::Error)]
pub enum IsolateError {
    #[error("invalid module: {0}")]
    Invalid(String),
    #[error("artifact cache: {0}")]
    Cache(#[from] std::io::Error),
    #[error("engine: {0}")]
    Engine(String),
}
