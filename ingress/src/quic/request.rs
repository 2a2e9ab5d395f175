//! One HTTP/3 connection's requests: each request stream gets its own task, which reads the
//! head (within the header timeout), applies the 421 check, runs the handler with the body
//! streamed from the stream, and sends the response as HTTP/3 (its body frame by frame; a
//! body that breaks off resets the stream). GOAWAY on shutdown, then a short linger so the
//! last responses are acknowledged before the connection closes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, Bytes};
use http::{HeaderValue, Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use quinn::crypto::rustls::HandshakeData;
use tokio::task::JoinSet;

use super::endpoint::{Shared, stopping};
use super::frame_limit::{GuardedConnection, GuardedRecv, max_frame_bytes};
use crate::server::{ConnectionInfo, Handler, HandlerBody, Transport, misdirected};

impl<H: Handler> Shared<H> {
    /// Serves the requests of one connection until the client closes it or shutdown drains it.
    pub(super) async fn serve_connection(self: Arc<Self>, connection: quinn::Connection) {
        let remote = connection.remote_address();
        let server_name: Option<Arc<str>> = connection
            .handshake_data()
            .and_then(|data| data.downcast::<HandshakeData>().ok())
            .and_then(|data| data.server_name)
            .map(Arc::from);
        let info = ConnectionInfo {
            local: SocketAddr::new(
                connection.local_ip().unwrap_or(self.local.ip()),
                self.local.port(),
            ),
            remote,
            transport: Transport::Quic { server_name },
        };
        let built = h3::server::builder()
            .max_field_section_size(self.limits.max_header_bytes as u64)
            .build::<_, Bytes>(GuardedConnection::new(
                h3_quinn::Connection::new(connection.clone()),
                max_frame_bytes(&self.limits),
            ))
            .await;
        let mut h3 = match built {
            Ok(h3) => h3,
            Err(error) => {
                tracing::debug!(%remote, %error, "HTTP/3 connection setup failed");
                return;
            }
        };
        let mut requests = JoinSet::new();
        let mut stop = self.stop.clone();
        let mut draining = *stop.borrow();
        let mut accepting = true;
        if draining {
            let _ = h3.shutdown(0).await;
        }
        loop {
            if draining && requests.is_empty() {
                break;
            }
            tokio::select! {
                accepted = h3.accept(), if accepting => match accepted {
                    Ok(Some(resolver)) => {
                        let this = Arc::clone(&self);
                        let info = info.clone();
                        requests.spawn(async move { this.serve_request(resolver, info).await });
                    }
                    // The client sent GOAWAY and its requests are done.
                    Ok(None) => break,
                    Err(error) => {
                        if !error.is_h3_no_error() {
                            tracing::debug!(%remote, %error, "HTTP/3 connection ended");
                        }
                        // The connection is gone: what still runs cannot answer anyway.
                        return;
                    }
                },
                () = stopping(&mut stop), if !draining => {
                    draining = true;
                    if let Err(error) = h3.shutdown(0).await {
                        tracing::debug!(%remote, %error, "HTTP/3 GOAWAY failed");
                        accepting = false;
                    }
                }
                Some(_) = requests.join_next(), if !requests.is_empty() => {}
            }
        }
        while requests.join_next().await.is_some() {}
        // Closing discards unacknowledged stream data: give the last responses a few round
        // trips to be acknowledged, unless the client closes first.
        let linger = connection.rtt() * 3 + Duration::from_millis(50);
        tokio::select! {
            _ = connection.closed() => {}
            () = tokio::time::sleep(linger) => {}
        }
        drop(h3);
    }

    /// Reads one request head, runs the handler and sends its response.
    async fn serve_request(
        &self,
        resolver: h3::server::RequestResolver<GuardedConnection, Bytes>,
        info: ConnectionInfo,
    ) {
        let remote = info.remote;
        let resolved =
            tokio::time::timeout(self.limits.header_read_timeout, resolver.resolve_request()).await;
        let (request, stream) = match resolved {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "HTTP/3 request head refused");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "HTTP/3 request head timed out");
                return;
            }
        };
        let (mut sender, receiver) = stream.split();
        let head_only = request.method() == Method::HEAD;
        let request = request.map(|()| RequestBody { stream: receiver });
        let response = match misdirected(&self.certificates, &request, &info) {
            Some(response) => response,
            None => self.handler.handle(request, info).await,
        };
        let (head, body) = into_h3_parts(response, head_only);
        // Pinned where it is: the handler's body is streamed without being boxed.
        let mut body = std::pin::pin!(body);
        let sent = async {
            sender.send_response(head).await?;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                        {
                            sender.send_data(data).await?;
                        }
                    }
                    Err(error) => {
                        // A body that broke off must not look complete: reset the stream.
                        tracing::debug!(%remote, %error, "HTTP/3 response body aborted");
                        sender.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                        return Ok(());
                    }
                }
            }
            sender.finish().await
        }
        .await;
        if let Err(error) = sent {
            tracing::debug!(%remote, %error, "HTTP/3 response not sent");
        }
    }
}

/// Header fields that are specific to an HTTP/1.1 connection and malformed in HTTP/3
/// (RFC 9114 §4.2).
const CONNECTION_SPECIFIC_HEADERS: [http::header::HeaderName; 5] = [
    http::header::CONNECTION,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
];

/// The response head for h3 (no connection-specific fields; `content-length` when the
/// body's length is known and `date`, as hyper adds them over TCP) and its body (empty for
/// HEAD and bodiless statuses).
fn into_h3_parts<T: HandlerBody>(response: Response<T>, head_only: bool) -> (Response<()>, T) {
    let (mut parts, body) = response.into_parts();
    for name in &CONNECTION_SPECIFIC_HEADERS {
        parts.headers.remove(name);
    }
    let bodiless = parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    if !parts.headers.contains_key(http::header::DATE) {
        parts
            .headers
            .insert(http::header::DATE, http_date(SystemTime::now()));
    }
    if !bodiless
        && !parts.headers.contains_key(http::header::CONTENT_LENGTH)
        && let Some(length) = body.size_hint().exact()
    {
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    let body = if head_only || bodiless { T::empty() } else { body };
    (Response::from_parts(parts, ()), body)
}

/// `time` as an HTTP date (IMF-fixdate, RFC 9110 §5.6.7): `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(time: SystemTime) -> HeaderValue {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, second_of_day) = (seconds / 86_400, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's `civil_from_days`).
    let shifted = days + 719_468;
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    let text = format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60,
    );
    HeaderValue::from_str(&text).expect("an HTTP date is a valid header value")
}

/// A request body streamed from the receive side of an h3 request stream.
struct RequestBody {
    stream: h3::server::RequestStream<GuardedRecv, Bytes>,
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h3::error::StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut().stream.poll_recv_data(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(mut data))) => {
                let bytes = data.copy_to_bytes(data.remaining());
                Poll::Ready(Some(Ok(Frame::data(bytes))))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::text_response;
    use crate::test_body::TestBody;

    #[tokio::test]
    async fn h3_responses_drop_connection_specific_fields_and_carry_a_length() {
        let mut response: Response<TestBody> = text_response(StatusCode::OK, "hi");
        response
            .headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        let (head, body) = into_h3_parts(response, false);
        assert!(head.headers().get(http::header::CONNECTION).is_none());
        assert_eq!(head.headers()[http::header::CONTENT_LENGTH], "3");
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hi\n");

        let (head, body) = into_h3_parts(text_response::<TestBody>(StatusCode::OK, "hi"), true);
        assert_eq!(
            head.headers()[http::header::CONTENT_LENGTH],
            "3",
            "HEAD keeps the length"
        );
        assert!(body.is_end_stream(), "HEAD has no body");

        // A streamed body has no length to announce.
        let (_writer, streamed) = TestBody::streamed();
        let streamed = Response::new(streamed);
        let (head, _) = into_h3_parts(streamed, false);
        assert!(head.headers().get(http::header::CONTENT_LENGTH).is_none());
    }

    #[test]
    fn http_dates_are_imf_fixdates() {
        let at = |seconds: u64| http_date(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds));
        assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(at(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(at(4_102_444_799), "Thu, 31 Dec 2099 23:59:59 GMT");
    }
}
