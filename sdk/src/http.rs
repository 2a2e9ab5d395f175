//! Outbound HTTP (`[outbound] allowed_hosts`) and service calls (`[services]`), through the
//! `wasi_experimental_http` host import — the ABI WAGI modules use.

/// Why a call failed: the host's code (7: not allowed, 11: request failed, 13: a limit;
/// the function's log says more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchError(pub i32);

impl std::fmt::Display for FetchError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.0 {
            7 => "the destination is not allowed",
            11 => "the request failed",
            13 => "a limit on outbound calls was reached",
            _ => "the call failed",
        };
        write!(formatter, "{what} (wasi_experimental_http error {})", self.0)
    }
}

impl std::error::Error for FetchError {}

/// A response, read whole.
#[derive(Debug, Clone)]
pub struct FetchResponse {
    pub status: u16,
    /// Lowercased names, as the host gives them.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl FetchResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[cfg(target_arch = "wasm32")]
mod raw {
    #[link(wasm_import_module = "wasi_experimental_http")]
    unsafe extern "C" {
        pub fn req(
            url: *const u8,
            url_len: usize,
            method: *const u8,
            method_len: usize,
            headers: *const u8,
            headers_len: usize,
            body: *const u8,
            body_len: usize,
            status: *mut u16,
            handle: *mut u32,
        ) -> i32;
        pub fn headers_get_all(handle: u32, buf: *mut u8, buf_len: usize, written: *mut usize) -> i32;
        pub fn body_read(handle: u32, buf: *mut u8, buf_len: usize, read: *mut usize) -> i32;
        pub fn close(handle: u32) -> i32;
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::too_many_arguments)]
mod raw {
    /// REQUEST_ERROR: there is no host off wasm.
    pub unsafe fn req(
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *const u8,
        _: usize,
        _: *mut u16,
        _: *mut u32,
    ) -> i32 {
        11
    }
    pub unsafe fn headers_get_all(_: u32, _: *mut u8, _: usize, _: *mut usize) -> i32 {
        1
    }
    pub unsafe fn body_read(_: u32, _: *mut u8, _: usize, _: *mut usize) -> i32 {
        1
    }
    pub unsafe fn close(_: u32) -> i32 {
        0
    }
}

/// Makes a request and reads the whole response. `headers` are `(name, value)` pairs.
pub fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<FetchResponse, FetchError> {
    let header_text: String = headers
        .iter()
        .map(|(name, value)| format!("{name}:{value}\n"))
        .collect();
    let (mut status, mut handle) = (0u16, 0u32);
    // SAFETY: every pointer is valid for its length, for the call.
    let code = unsafe {
        raw::req(
            url.as_ptr(),
            url.len(),
            method.as_ptr(),
            method.len(),
            header_text.as_ptr(),
            header_text.len(),
            body.as_ptr(),
            body.len(),
            &mut status,
            &mut handle,
        )
    };
    if code != 0 {
        return Err(FetchError(code));
    }
    let response = read_response(handle, status);
    // SAFETY: the handle came from `req`.
    unsafe { raw::close(handle) };
    response
}

fn read_response(handle: u32, status: u16) -> Result<FetchResponse, FetchError> {
    let mut capacity = 16 * 1024;
    let headers = loop {
        let mut buffer = vec![0u8; capacity];
        let mut written = 0usize;
        // SAFETY: the buffer is valid for its length.
        let code = unsafe { raw::headers_get_all(handle, buffer.as_mut_ptr(), buffer.len(), &mut written) };
        match code {
            0 => {
                buffer.truncate(written);
                break String::from_utf8_lossy(&buffer).into_owned();
            }
            // BUFFER_TOO_SMALL: the host does not say how much; double, up to 1 MiB.
            4 if capacity < 1 << 20 => capacity *= 2,
            code => return Err(FetchError(code)),
        }
    };
    let headers = headers
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    let mut body = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let mut read = 0usize;
        // SAFETY: the buffer is valid for its length.
        let code = unsafe { raw::body_read(handle, chunk.as_mut_ptr(), chunk.len(), &mut read) };
        if code != 0 {
            return Err(FetchError(code));
        }
        if read == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Ok(FetchResponse {
        status,
        headers,
        body,
    })
}

/// The base URL of a `[services]` binding (`ATOLL_SERVICE_<binding>`), e.g.
/// `http://todo.atoll.internal`; append the path.
pub fn service(binding: &str) -> Option<String> {
    std::env::var(format!("ATOLL_SERVICE_{binding}")).ok()
}
