//! What the isolate's test suites share: a plain request and a function loaded from a
//! module. Each test binary compiles this module separately and may use only part of it.
#![allow(dead_code)]

use atoll_isolate::{CgiRequest, Engine, FunctionConfig, LoadedFunction};

/// `GET /` on `example.com:80` over HTTP/1.1.
pub fn request() -> CgiRequest {
    CgiRequest {
        method: "GET".into(),
        raw_path: "/".into(),
        protocol: "HTTP/1.1".into(),
        scheme: "http".into(),
        server_name: "example.com".into(),
        server_port: 80,
        ..CgiRequest::default()
    }
}

/// `wasm` compiled on an engine of its own and loaded as function `name`, its configuration
/// adjusted by `configure`.
pub fn load(wasm: &[u8], name: &str, configure: impl FnOnce(&mut FunctionConfig)) -> LoadedFunction {
    let engine = Engine::new().unwrap();
    let module = engine.compile(wasm).unwrap();
    let mut config = FunctionConfig::new(name);
    configure(&mut config);
    LoadedFunction::new(engine, module, config)
}
